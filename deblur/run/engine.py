"""The engine: the one thread that owns the model (and so the GPU).

It takes decoded images from a bounded inbox, groups them with the dynamic batcher (same
bucket shape and dtype, up to the batch and pixel limits, or when the oldest has waited
``max_wait_ms``) and runs each batch through the model. A batch that fails is retried image by
image, so one bad image fails alone. The worker talks to it through four calls: ``expect``
(images are being decoded: worth waiting for before running a partial batch), ``submit``
(blocks while the inbox is full: backpressure on fetching), ``withdraw`` (an expected image
failed before it arrived) and ``drain_stats``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar

import numpy as np

from deblur.config import JobConfig
from deblur.run.batcher import Batch, DynamicBatcher

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


class Engine(Generic[T]):
    """The thread that owns the model: batches decoded items and runs them.

    Args:
        infer: same-dtype pixels (and the bucket shape) -> deblurred pixels.
        config: job configuration (batching and tiling).
        on_output: called with (item, output pixels, its share of the batch's milliseconds)
            for each finished image.
        on_error: called with (item, exception) when inference failed for it.
    """

    def __init__(self, infer: Callable[[list[np.ndarray], tuple[int, int] | None],
                                       list[np.ndarray]],
                 config: JobConfig,
                 on_output: Callable[[T, np.ndarray, float], None],
                 on_error: Callable[[T, Exception], None]) -> None:
        self._infer = infer
        self._inbox: queue.Queue[T] = queue.Queue(maxsize=config.worker.prefetch)
        self._batcher: DynamicBatcher[T] = DynamicBatcher(config.batch, config.model.tile_pixels)
        self._on_output, self._on_error = on_output, on_error
        self._decoding = 0  # items submitted for decode but not yet in the inbox
        self._lock = threading.Lock()
        self._busy_s = 0.0
        self._batch_log: list[tuple[int, float]] = []  # (size, fill) since the last drain
        self._queue_peak = 0
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def drain_stats(self) -> tuple[list[tuple[int, float]], float, int]:
        """(batches since the last call, busy seconds so far, queue peak since last call)."""
        with self._lock:
            log_, self._batch_log = self._batch_log, []
            peak, self._queue_peak = self._queue_peak, 0
            return log_, self._busy_s, peak

    def expect(self, count: int) -> None:
        """``count`` more items are being decoded: worth waiting for before a partial batch."""
        with self._lock:
            self._decoding += count

    def submit(self, item: T) -> None:
        """Hand over one expected item; blocks while the inbox is full (backpressure)."""
        self._inbox.put(item)
        self.withdraw()

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
        while True:
            deadline = self._batcher.next_deadline()
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                item = self._inbox.get(timeout=timeout)
            except queue.Empty:
                item = None
            ready: list[Batch[T]] = []
            self._queue_peak = max(self._queue_peak, self._inbox.qsize() + (item is not None))
            if item is not None:
                pixels = item.pixels
                ready += self._batcher.add(item, pixels.shape[0], pixels.shape[1],
                                           str(pixels.dtype))
            ready += self._batcher.poll()
            with self._lock:
                starving = self._decoding == 0 and self._inbox.empty()
            if starving:  # nothing more is coming soon: do not sit on a partial batch
                ready += self._batcher.flush()
            for batch in ready:
                self._run(batch)

    def _run(self, batch: Batch[T]) -> None:
        start = time.perf_counter()
        images = [item.pixels for item in batch.items]
        try:
            outputs = self._infer(images, None if batch.tiled else batch.shape)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory: retry images alone
            if len(batch.items) == 1:
                self._on_error(batch.items[0], exc)
                return
            log.warning("batch of %d failed (%s); retrying one by one", len(batch.items), exc)
            for item in batch.items:
                self._run(Batch(items=[item], shape=batch.shape, dtype=batch.dtype,
                                tiled=batch.tiled, created=batch.created,
                                closed_reason="retry"))
            return
        elapsed = (time.perf_counter() - start) * 1000.0
        with self._lock:
            self._busy_s += elapsed / 1000.0
            self._batch_log.append((len(batch.items), _fill(batch)))
        for item, output in zip(batch.items, outputs):
            self._on_output(item, output, elapsed / len(batch.items))


