"""The engine: the one thread that owns the model (and so the GPU).

It takes decoded images from a bounded inbox, groups them with the dynamic batcher (same
bucket shape and dtype, up to the batch and pixel limits, or when the oldest has waited
``max_wait_ms``) and runs each batch through the model. A batch that fails is retried image by
image, so one bad image fails alone. The worker talks to it through four calls: ``expect``
(images are being decoded: worth waiting for before running a partial batch), ``submit``
(blocks while the inbox is full: backpressure on fetching), ``withdraw`` (an expected image
failed before it arrived) and ``drain_stats``.

Faults, in the order the engine tries them:

- out of memory (``torch.cuda.OutOfMemoryError``, a RuntimeError saying "out of memory", or a
  host MemoryError): the device cache is freed and the batch is split in halves, down to single
  images; a single image then runs tiled with tiles a quarter the size each time, and only then
  is it a failed row. An OOM says nothing about the image, so it must not fail its batch-mates.
- a device fault ("CUDA error", device-side assert, illegal address, ECC): the process's CUDA
  context is unusable, so nothing more can run here. It is raised out of the engine thread.
- any exception out of the engine thread (a device fault, or a bug): the watchdog marks the
  engine dead (``fatal``), hands every image it holds and every image submitted later to
  ``on_abort``, and never blocks a submitter again. The worker then reports itself unhealthy
  and exits, so its shards are retried elsewhere instead of hanging on futures no one resolves.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

import numpy as np

from deblur.config import JobConfig
from deblur.errors import DeviceFaultError, ImageError, one_line
from deblur.run.batcher import Batch, DynamicBatcher, NET_MULTIPLE, bucket_shape

log = logging.getLogger("deblur.run.engine")


class EngineItem(Protocol):
    """What the engine needs of an image: its decoded pixels (H x W x 3)."""

    @property
    def pixels(self) -> np.ndarray: ...


T = TypeVar("T", bound=EngineItem)


def _fill(batch: Batch[T]) -> float:
    """Useful pixels / padded pixels: how much of the forward pass was real image."""
    if batch.tiled:
        return 1.0
    useful = sum(i.pixels.shape[0] * i.pixels.shape[1] for i in batch.items)
    return useful / max(1, batch.padded_pixels)


# Messages of CUDA faults after which the process's context is unusable (torch raises them as
# RuntimeError, or AcceleratorError in newer releases: the text is what is stable).
_DEVICE_FAULTS = ("cuda error", "device-side assert", "illegal memory access",
                  "uncorrectable ecc", "ecc error", "cublas_status_execution_failed",
                  "cudnn_status_execution_failed", "unspecified launch failure")

MIN_TILE_PIXELS = 64 * 64
"""The smallest tile the out-of-memory fallback tries (the tile grid's own minimum side)."""


def is_out_of_memory(exc: BaseException) -> bool:
    """The device (or the host) ran out of memory: worth retrying with less at once."""
    torch = sys.modules.get("torch")  # looked up, not imported: the engine runs without it
    oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        isinstance(exc, MemoryError) or "out of memory" in str(exc).lower())


def is_device_fault(exc: BaseException) -> bool:
    """A CUDA error other than out of memory: nothing more can run in this process."""
    if is_out_of_memory(exc):
        return False
    text = str(exc).lower()
    return any(mark in text for mark in _DEVICE_FAULTS)


def free_device_cache() -> None:
    """Give the CUDA caching allocator's free blocks back before a smaller retry."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class Engine(Generic[T]):
    """The thread that owns the model: batches decoded items and runs them.

    Args:
        infer: same-dtype pixels (and the bucket shape) -> deblurred pixels.
        config: job configuration (batching and tiling).
        on_output: called with (item, output pixels, its share of the batch's milliseconds)
            for each finished image.
        on_error: called with (item, exception) when inference failed for it.
        infer_tiled: (pixels, tile_pixels) -> deblurred pixels, run in tiles of at most that
            many padded pixels: the last resort for an image that ran out of memory. None:
            such an image fails.
        on_abort: called with (item, exception) for every item the engine held or is handed
            after its thread died (default: ``on_error``).
        launch: like ``infer`` but returns at once with a function that waits for and
            returns the outputs (``Deblurrer.launch``): the engine then queues batch k+1 on
            the device before collecting batch k. None: every batch runs to completion.
        owner: item -> whom its share of the stats belongs to (the worker: the shard call it
            came from). Each batch is logged once, for the owner of its first item, and its busy
            time is split between owners by image count, so shards in flight together never
            both claim one batch or one second (``drain_stats(owner)``).
    """

    def __init__(self, infer: Callable[[list[np.ndarray], tuple[int, int] | None],
                                       list[np.ndarray]],
                 config: JobConfig,
                 on_output: Callable[[T, np.ndarray, float], None],
                 on_error: Callable[[T, Exception], None],
                 infer_tiled: Callable[[np.ndarray, int], np.ndarray] | None = None,
                 on_abort: Callable[[T, BaseException], None] | None = None,
                 owner: Callable[[T], object] | None = None,
                 launch: Callable[[list[np.ndarray], tuple[int, int] | None],
                                  Callable[[], list[np.ndarray]]] | None = None) -> None:
        self._infer = infer
        self._launch = launch
        # The batch queued on the device whose outputs are not collected yet: (batch, collect,
        # launched at). With ``launch`` the next batch is prepared and queued before this one
        # is waited for, so the device never idles while the host packs and unpacks.
        self._pending: tuple[Batch[T], Callable[[], list[np.ndarray]], float] | None = None
        self._last_done = 0.0  # when the previous batch's outputs were collected
        self._owner = owner or (lambda item: None)
        self._infer_tiled = infer_tiled
        self._tile_pixels = config.model.tile_pixels
        self._on_abort = on_abort or on_error
        self._held: dict[int, T] = {}  # id -> item taken from the inbox, no outcome yet
        self.fatal: BaseException | None = None
        """Why the engine thread died (None while it runs)."""
        self.oom_retries = 0
        """Times a batch or image was retried smaller after running out of memory."""
        self._inbox: queue.Queue[T] = queue.Queue(maxsize=config.worker.prefetch)
        self._batcher: DynamicBatcher[T] = DynamicBatcher(config.batch, config.model.tile_pixels)
        self._on_output, self._on_error = on_output, on_error
        self._decoding = 0  # items submitted for decode but not yet in the inbox
        self._lock = threading.Lock()
        self._busy_s = 0.0
        # (size, fill) of each batch since its owner's last drain, and owners' busy seconds.
        self._batch_log: dict[object, list[tuple[int, float]]] = {}
        self._busy_by: dict[object, float] = {}
        self._queue_peak = 0
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def drain_stats(self, owner: object = None) -> tuple[list[tuple[int, float]], float, int]:
        """(batches, busy seconds, queue peak since the last call). With ``owner``: the batches
        and busy seconds attributed to it since its last drain; without: every batch not drained
        yet and the busy seconds since the engine started."""
        with self._lock:
            peak, self._queue_peak = self._queue_peak, 0
            if owner is not None:
                return self._batch_log.pop(owner, []), self._busy_by.pop(owner, 0.0), peak
            log_ = [batch for batches in self._batch_log.values() for batch in batches]
            self._batch_log.clear()
            self._busy_by.clear()
            return log_, self._busy_s, peak

    def expect(self, count: int) -> None:
        """``count`` more items are being decoded: worth waiting for before a partial batch."""
        with self._lock:
            self._decoding += count

    def submit(self, item: T) -> None:
        """Hand over one expected item; blocks while the inbox is full (backpressure).

        A dead engine aborts the item at once (and its thread keeps draining the inbox, so a
        submitter already blocked is released too)."""
        if self.fatal is not None:
            self.withdraw()
            self._abort(item, self.fatal)
            return
        self._inbox.put(item)
        self.withdraw()

    @property
    def healthy(self) -> bool:
        """False once the engine thread died: nothing submitted will run."""
        return self.fatal is None and self._thread.is_alive()

    def withdraw(self) -> None:
        """One expected item will not come (it failed before decoding finished)."""
        with self._lock:
            self._decoding -= 1

    @property
    def busy_seconds(self) -> float:
        """Seconds the model has spent on batches since the engine started."""
        with self._lock:
            return self._busy_s

    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # noqa: BLE001 - the watchdog: any death is reported
            self._die(exc)

    def _die(self, exc: BaseException) -> None:
        """Fail every held and every later item instead of leaving their futures unresolved."""
        with self._lock:
            self.fatal = exc
        log.error("engine thread stopped; this worker is unhealthy: %s: %s",
                  type(exc).__name__, one_line(exc), exc_info=exc)
        held, self._held = list(self._held.values()), {}
        for item in held:
            self._abort(item, exc)
        while True:  # a dead engine still empties its inbox, so no submitter blocks forever
            self._abort(self._inbox.get(), exc)

    def _abort(self, item: T, exc: BaseException) -> None:
        try:
            self._on_abort(item, exc)
        except Exception:  # noqa: BLE001 - one failing callback must not strand the others
            log.exception("aborting an item failed")

    def _serve(self) -> None:
        while True:
            deadline = self._batcher.next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            if self._pending is not None:
                timeout = 0.0  # a batch is in flight: look, but do not sleep on the inbox
            try:
                item = self._inbox.get(timeout=timeout)
            except queue.Empty:
                item = None
            ready: list[Batch[T]] = []
            self._queue_peak = max(self._queue_peak, self._inbox.qsize() + (item is not None))
            if item is not None:
                self._held[id(item)] = item
                pixels = item.pixels
                ready += self._batcher.add(item, pixels.shape[0], pixels.shape[1],
                                           str(pixels.dtype))
            ready += self._batcher.poll()
            with self._lock:
                starving = self._decoding == 0 and self._inbox.empty()
            if starving:  # nothing more is coming soon: do not sit on a partial batch
                ready += self._batcher.flush()
            for batch in ready:
                if self._launch is not None and not batch.tiled:
                    self._run_pipelined(batch)
                else:
                    self._collect_pending()  # outputs leave in the order batches ran
                    self._run(batch)
            if not ready and item is None:
                self._collect_pending()  # nothing to queue behind it: wait for it now

    def _run_pipelined(self, batch: Batch[T]) -> None:
        """Queue ``batch`` on the device, then collect the batch queued before it."""
        start = time.perf_counter()
        try:
            collect = self._launch(  # type: ignore[misc] - only called when set
                [item.pixels for item in batch.items], batch.shape)
        except Exception as exc:  # noqa: BLE001 - e.g. OOM at allocation: as in _run
            self._collect_pending()
            self._handle(batch, exc)
            return
        previous, self._pending = self._pending, (batch, collect, start)
        if previous is not None:
            self._collect(previous)

    def _collect_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            self._collect(pending)

    def _collect(self, pending: tuple[Batch[T], Callable[[], list[np.ndarray]], float]) -> None:
        batch, collect, launched = pending
        try:
            outputs = collect()
        except Exception as exc:  # noqa: BLE001 - a fault surfaces when the batch is awaited
            self._handle(batch, exc)
            return
        # Busy from when the device could start this batch (launched, or once the batch
        # before it finished) to now: batches queued back to back are not counted twice.
        now = time.perf_counter()
        start = max(launched, self._last_done)
        self._last_done = now
        self._deliver(batch.items, outputs, (now - start) * 1000.0, _fill(batch))

    def _run(self, batch: Batch[T]) -> None:
        """Run ``batch`` to completion (retries and tiles, or without ``launch``)."""
        start = time.perf_counter()
        images = [item.pixels for item in batch.items]
        try:
            outputs = self._infer(images, None if batch.tiled else batch.shape)
        except Exception as exc:  # noqa: BLE001 - classified: OOM, device fault, or the images
            self._handle(batch, exc)
            return
        self._last_done = time.perf_counter()
        self._deliver(batch.items, outputs, (self._last_done - start) * 1000.0,
                      _fill(batch))

    def _handle(self, batch: Batch[T], exc: Exception) -> None:
        """A batch failed: classified as out of memory, device fault, or the images."""
        if is_out_of_memory(exc):
            self._retry_smaller(batch, exc)
            return
        if is_device_fault(exc):
            raise DeviceFaultError(f"device fault in a batch of {len(batch.items)}: "
                                   f"{one_line(exc)}") from exc
        if len(batch.items) == 1:
            self._fail(batch.items[0], exc)
            return
        log.warning("batch of %d failed (%s); retrying one by one", len(batch.items), exc)
        for item in batch.items:
            self._run(Batch(items=[item], shape=batch.shape, dtype=batch.dtype,
                            tiled=batch.tiled, created=batch.created,
                            closed_reason="retry"))

    def _retry_smaller(self, batch: Batch[T], exc: Exception) -> None:
        """Out of memory: halves of the batch, then the single image in smaller tiles."""
        free_device_cache()
        with self._lock:
            self.oom_retries += 1
        items = batch.items
        if len(items) > 1:
            half = len(items) // 2
            log.warning("out of memory on a batch of %d; retrying as %d + %d: %s", len(items),
                        half, len(items) - half, one_line(exc))
            for part in (items[:half], items[half:]):
                self._run(Batch(items=part, shape=batch.shape, dtype=batch.dtype,
                                tiled=batch.tiled, created=batch.created,
                                closed_reason="oom_split"))
            return
        self._run_tiled(items[0], exc)

    def _run_tiled(self, item: T, exc: Exception) -> None:
        """The last resort for one image: tiles a quarter of the size each time it OOMs."""
        height, width = item.pixels.shape[:2]
        padded_h, padded_w = bucket_shape(height, width, NET_MULTIPLE)
        tile = min(self._tile_pixels, padded_h * padded_w) // 4
        tried = 0  # the smallest tile tried
        while self._infer_tiled is not None and tile >= MIN_TILE_PIXELS:
            tried = tile
            log.warning("out of memory on one %dx%d image; retrying in tiles of %d pixels",
                        width, height, tile)
            start = time.perf_counter()
            try:
                output = self._infer_tiled(item.pixels, tile)
            except Exception as again:  # noqa: BLE001 - classified as in _run
                if is_device_fault(again):
                    raise DeviceFaultError(f"device fault in a tiled image: "
                                           f"{one_line(again)}") from again
                if not is_out_of_memory(again):
                    break  # e.g. tiles too small for the overlap: report the OOM below
                free_device_cache()
                with self._lock:
                    self.oom_retries += 1
                exc, tile = again, tile // 4
                continue
            self._deliver([item], [output], (time.perf_counter() - start) * 1000.0, 1.0)
            return
        if not tried:
            self._fail(item, exc)
            return
        self._fail(item, ImageError("inference_failed", (
            f"out of memory even alone and in tiles of {tried} pixels: {one_line(exc)}")))

    def _deliver(self, items: list[T], outputs: list[np.ndarray], elapsed_ms: float,
                 fill: float) -> None:
        with self._lock:
            self._busy_s += elapsed_ms / 1000.0
            owners = [self._owner(item) for item in items]
            self._batch_log.setdefault(owners[0], []).append((len(items), fill))
            share = elapsed_ms / 1000.0 / len(items)
            for owner in owners:  # noted before any output goes on, so before its shard ends
                self._busy_by[owner] = self._busy_by.get(owner, 0.0) + share
        for item, output in zip(items, outputs):
            self._on_output(item, output, elapsed_ms / len(items))
            self._held.pop(id(item), None)

    def _fail(self, item: T, exc: Exception) -> None:
        self._on_error(item, exc)
        self._held.pop(id(item), None)
