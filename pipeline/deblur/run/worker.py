"""The worker: one model replica and the per-shard I/O + compute pipeline.

    shard rows ─► fetch+decode pool ─► bounded queue ─► engine thread ─► encode+upload pool
                  (io_threads)         (prefetch)       batcher+model     (io_threads)
                                                                            │ per-row result
    shard result (ledger.commit) ◄── every row of the shard has a result ◄──┘

The engine thread is the only code that touches the model (and so the GPU). It batches images
from every shard in flight, so while batch k runs, batch k+1 is being decoded and k-1 encoded,
and a second shard dispatched to the same actor fills the pipeline while the first drains: the
GPU does not idle at shard boundaries. A bad image is a failed result row, never an exception
out of ``process``; a shard's result is committed only after all its uploads finished.

Memory is bounded in bytes, not only in counts: before an image is decoded, the size its header
declares is charged twice (its pixels and its output) against ``worker.max_buffered_bytes``
and released when its row is done, so a shard of 150 MP photos waits for room instead of
decoding 32 of them at once.

If the engine thread dies (a CUDA fault, a bug), every image it held fails its shard with
``WorkerUnhealthyError`` instead of a result row, and ``WorkerActor`` exits its process: the
pool sees the actor lost and retries its shards on another one.

``ShardProcessor`` is plain Python (tests run it without Ray); ``WorkerActor`` wraps it.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from deblur.io import codec
from deblur.io.codec_choice import make_codec
from deblur.observe import quality
from deblur.observe.gpu import device_utilization
from deblur.run.engine import Engine
from deblur.config import JobConfig, parse_shape
from deblur.errors import (ImageError, NotFoundError, PipelineError, StorageError,
                           StoreUnavailableError, WorkerStartError, WorkerUnhealthyError,
                           is_outage, one_line)
from deblur.job.ledger import Ledger
from deblur.job.results import RESULT_SCHEMA
from deblur.io.local import link_problem
from deblur.io.storage import (Storage, get_storage, is_s3, join, retries_counted_by,
                               to_local_path)
from deblur.job.manifest import is_manifest, overwrites_input, would_overwrite

log = logging.getLogger("deblur.run.worker")


class ShardTally:
    """What one ``process`` call alone caused, when several run on one worker at once: its
    storage retries (counted in the threads doing its requests) and, as the engine's owner
    key, its batches and busy seconds. A process-wide counter's delta would be claimed by every
    shard in flight."""

    def __init__(self) -> None:
        self.storage_retries = 0
        self._lock = threading.Lock()

    def retried(self) -> None:
        with self._lock:
            self.storage_retries += 1

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` with its retried storage requests counted here."""
        with retries_counted_by(self.retried):
            return fn(*args)


@dataclass
class Item:
    """One image on its way through the pipeline (and, at the end, its result row)."""

    row: dict[str, Any]
    done: Future[dict[str, Any]]
    image: codec.DecodedImage | None = None
    timings: dict[str, float] = field(default_factory=dict)
    bytes_in: int = 0
    reference: str | None = None  # sharp ground truth URI (evaluation jobs)
    original: str | None = None  # in-place rows: where the input's original is kept
    charge: int = 0  # bytes held against the processor's ByteBudget until the row is done
    outage: bool = False  # failed because the store was unreachable, not for the image
    tally: ShardTally = field(default_factory=ShardTally)  # what its shard call alone caused

    @property
    def pixels(self) -> np.ndarray:
        """The decoded pixels the engine batches (set before the item reaches it)."""
        assert self.image is not None
        return self.image.pixels


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


class ByteBudget:
    """Bytes of decoded pixels a worker may hold; ``acquire`` blocks until they fit.

    One charge larger than the whole budget is let in when nothing else is held, so a valid
    image bigger than the budget runs alone instead of failing or waiting forever.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.peak = 0
        """Most bytes held at once since the processor started (reported per shard)."""
        self._cond = threading.Condition()

    def acquire(self, size: int) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.used == 0 or self.used + size <= self.limit)
            self.used += size
            self.peak = max(self.peak, self.used)

    def release(self, size: int) -> None:
        with self._cond:
            self.used -= size
            self._cond.notify_all()


def auto_buffer_bytes() -> int:
    """A quarter of the memory this process may use (its cgroup limit, else the machine's),
    within 256 MiB .. 8 GiB: the rest is for the model, the codec and the I/O buffers."""
    total = 0
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = open(path).read().strip()  # noqa: SIM115 - one short read
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:  # v1 says "no limit" with a huge number
            total = int(text)
            break
    if not total:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            total = 8 << 30
    return min(8 << 30, max(256 << 20, total // 4))


def pixel_charge(data: bytes) -> int:
    """Bytes an image's pixels and its output will take, from its header (0 if unreadable:
    decoding it fails anyway). RGB at 1 byte per sample, 2 for 16-bit sources."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            deep = img.mode.startswith("I;16") or img.mode in ("I", "F")
    except Exception:  # noqa: BLE001 - the decoder gives the verdict and the message
        return 0
    return 2 * width * height * 3 * (2 if deep else 1)


class ShardProcessor:
    """Runs shards through fetch -> decode -> batch -> model -> encode -> upload -> commit.

    Args:
        config: the job's configuration.
        infer: the model call (``Deblurrer.deblur`` or a stand-in such as an identity for
            measuring the pipeline's own overhead).
        worker_id: recorded in every result row.
        storage: defaults to the process-wide client for ``config.storage``.
        fp32_reruns: how many images the model has rerun in fp32 so far (reported per shard).
        infer_tiled: (pixels, tile_pixels) -> output in tiles of at most that size: the
            engine's last resort for an image that ran out of memory (``Deblurrer.deblur_tiled``).
        launch: ``Deblurrer.launch`` on CUDA: the engine queues the next batch on the device
            before collecting the last one. None (CPU, stand-ins): each batch runs to the end.
        device_pixels: ``infer``/``launch`` take torch tensors (``Deblurrer`` does) and give
            tensor outputs for them: a codec that decodes on the device (nvJPEG) then keeps
            its pixels there, so only compressed bytes cross the bus. Quality figures copy
            the sampled images they need to the host.
        codec_backend: the codec (default: ``make_codec``'s choice for the config).
    """

    def __init__(self, config: JobConfig,
                 infer: Callable[[list[np.ndarray], tuple[int, int] | None], list[np.ndarray]],
                 worker_id: str, storage: Storage | None = None,
                 fp32_reruns: Callable[[], int] = lambda: 0,
                 infer_tiled: Callable[[np.ndarray, int], np.ndarray] | None = None,
                 launch: Callable[[list[np.ndarray], tuple[int, int] | None],
                                  Callable[[], list[np.ndarray]]] | None = None,
                 device_pixels: bool = False,
                 codec_backend: codec.Codec | None = None) -> None:
        self.config = config
        self.fp32_reruns = fp32_reruns
        self.worker_id = worker_id
        self.storage = storage or get_storage(config.storage)
        threads = config.worker.io_threads
        self.decode_pool = ThreadPoolExecutor(threads, thread_name_prefix="fetch")
        self.encode_pool = ThreadPoolExecutor(threads, thread_name_prefix="upload")
        # Bounds decoded-but-not-uploaded images so a slow store cannot fill memory.
        self.encode_slots = threading.BoundedSemaphore(config.worker.prefetch + threads)
        # ... and in bytes, so a few huge images cannot take what 32 small ones would not.
        self.buffer = ByteBudget(config.worker.max_buffered_bytes or auto_buffer_bytes())
        # Pillow in-process or in a process pool, or nvJPEG on the GPU (io/codec_choice.py).
        self.codec = codec_backend or make_codec(config.codec, config.model.device,
                                                 config.worker.cpus_per_worker)
        if device_pixels and hasattr(self.codec, "keep_on_device"):
            self.codec.keep_on_device = True  # nvJPEG: decoded pixels stay on the GPU
        self.engine: Engine[Item] = Engine(infer, config, self._on_output, self._on_infer_error,
                                           infer_tiled=infer_tiled,
                                           on_abort=self._on_engine_abort,
                                           owner=lambda item: item.tally, launch=launch)

    @property
    def unhealthy(self) -> str | None:
        """Why this processor can run nothing more (its engine thread died), or None."""
        if self.engine.healthy:
            return None
        fatal = self.engine.fatal
        return (f"{type(fatal).__name__}: {one_line(fatal)}" if fatal is not None
                else "the engine thread is gone")

    # -- per shard -------------------------------------------------------------------------

    def process(self, job_root: str, shard_id: int, attempt: int) -> dict[str, Any]:
        """Process the shard's pending rows and commit its result; returns a small report."""
        start = time.perf_counter()
        if self.unhealthy:
            raise WorkerUnhealthyError(f"worker {self.worker_id} is unhealthy: {self.unhealthy}")
        busy_before = self.engine.busy_seconds
        tally = ShardTally()
        reruns_before = self.fp32_reruns()
        ledger = Ledger(self.storage, job_root)
        pending, previous = tally.run(ledger.pending, shard_id)
        planned_ids = pending["row_id"] if previous is None else None
        rows = pending.to_pylist()
        tries = {} if previous is None else dict(zip(previous["row_id"].to_pylist(),
                                                     previous["attempt"].to_pylist()))
        items = [self._start(row, attempt + (tries.get(row["row_id"]) or 0), job_root, tally)
                 for row in rows]
        results = [item.done.result() for item in items]
        self._refuse_outage(items, shard_id, attempt)
        summary = tally.run(ledger.commit, shard_id,
                            pa.Table.from_pylist(results, schema=RESULT_SCHEMA), planned_ids)
        ok = sum(r["status"] == "ok" for r in results)
        wall = time.perf_counter() - start
        # This shard's own batches and busy seconds (each counted for one shard only), and the
        # engine's busy time over the shard's wall time (shared: the utilisation gauge).
        batches, busy_s, queue_peak = self.engine.drain_stats(tally)
        engine_busy_s = self.engine.busy_seconds - busy_before
        reasons: dict[str, int] = {}
        for r in results:
            if r["status"] != "ok":
                reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
        metrics = {
            "stages": {stage: [r[f"{stage}_ms"] for r in results if r[f"{stage}_ms"] is not None]
                       for stage in ("fetch", "decode", "infer", "encode", "upload")},
            "batches": batches, "busy_s": busy_s, "engine_busy_s": engine_busy_s,
            "wall_s": wall,
            "queue_peak": queue_peak, "reasons": reasons,
            "bytes_in": sum(r["bytes_in"] or 0 for r in results),
            "bytes_out": sum(r["bytes_out"] or 0 for r in results),
            "storage_retries": tally.storage_retries,
            "gpu_memory_bytes": _gpu_memory_bytes(),
            "gpu_utilization": device_utilization(),  # None without CUDA or NVML
            "fp32_reruns": self.fp32_reruns() - reruns_before,
            "buffered_peak_bytes": self.buffer.peak,
        }
        return {"shard": shard_id, "rows": len(results), "ok": ok, "failed": len(results) - ok,
                "seconds": wall, "worker": self.worker_id, "attempt": attempt,
                "summary": summary, "metrics": metrics}

    def process_rows(self, job_root: str, shard_id: int, attempt: int,
                     row_ids: list[int]) -> list[dict[str, Any]]:
        """Process only these rows of the shard (those still pending) and return their result
        rows uncommitted: the driver runs a shard that kept killing its workers image by
        image this way, and commits the rows itself once every image has an answer."""
        if self.unhealthy:
            raise WorkerUnhealthyError(f"worker {self.worker_id} is unhealthy: {self.unhealthy}")
        wanted = set(row_ids)
        pending = Ledger(self.storage, job_root).pending_rows(shard_id)
        items = [self._start(row, attempt, job_root) for row in pending.to_pylist()
                 if row["row_id"] in wanted]
        results = [item.done.result() for item in items]
        self._refuse_outage(items, shard_id, attempt)
        return results

    def _refuse_outage(self, items: list[Item], shard_id: int, attempt: int) -> None:
        """Raise instead of committing rows that failed only because the store was down: the
        driver pauses and retries the shard without spending an attempt. On the shard's last
        attempt they are committed as failed rows like any other (a rerun retries them)."""
        outages = sum(item.outage for item in items)
        if outages and attempt < self.config.scheduler.max_attempts:
            raise StoreUnavailableError(
                f"shard {shard_id}: {outages} of {len(items)} images failed on an unreachable "
                f"store; not committed (the driver retries the shard)")

    def _start(self, row: dict[str, Any], attempt: int, job_root: str = "",
               tally: ShardTally | None = None) -> Item:
        base = {name: None for name in RESULT_SCHEMA.names}
        base.update(row_id=row["row_id"], key=row["key"], output_key=row["output_key"],
                    attempt=attempt, worker=self.worker_id)
        item = Item(row=base, done=Future(), reference=row.get("reference"),
                    tally=tally or ShardTally())
        if row.get("error"):  # a planning-time problem (hostile key, duplicate, collision)
            reason, _, message = row["error"].partition(": ")
            self._fail(item, ImageError(reason, message or row["error"]))
            return item
        problem = self._source_problem(row)
        if problem:
            reason, _, message = problem.partition(": ")
            self._fail(item, ImageError(reason, message))
            return item
        if overwrites_input(row["key"], row["output_key"]):
            # Replaced in place: keep the original first, and on a rerun read it back, so an
            # input already replaced by an earlier attempt is never deblurred twice.
            item.original = join(job_root, f"originals/{row['row_id']}")
        self.engine.expect(1)
        self.decode_pool.submit(item.tally.run, self._fetch_decode, item)
        return item

    def _source_problem(self, row: dict[str, Any]) -> str | None:
        """Re-check, just before reading, what planning checks (a job planned without these
        settings, or a link changed since): in-place rows and links out of a local SOURCE."""
        key, source = row["key"], self.config.source
        if not self.config.overwrite_inputs and overwrites_input(key, row["output_key"]):
            return would_overwrite(key, row["output_key"])
        if not is_s3(key) and source and not is_s3(source) and not is_manifest(source):
            return link_problem(to_local_path(key), to_local_path(source),
                                self.config.follow_links)
        return None

    def _read_input(self, item: Item) -> bytes:
        key = item.row["key"]
        if item.original is None:
            return self.storage.get(key)
        try:
            return self.storage.get(item.original)
        except NotFoundError:
            data = self.storage.get(key)
            self.storage.put(item.original, data)  # before the output can replace the input
            return data

    # -- stages ----------------------------------------------------------------------------

    def _fetch_decode(self, item: Item) -> None:
        key = item.row["key"]
        try:
            start = time.perf_counter()
            data = self._read_input(item)
            item.timings["fetch_ms"] = _ms(start)
            item.bytes_in = len(data)
            charge = pixel_charge(data)
            self.buffer.acquire(charge)  # blocks while decoded pixels fill the budget
            item.charge = charge
            start = time.perf_counter()
            item.image = self.codec.decode(data, key)
            item.timings["decode_ms"] = _ms(start)
        except Exception as exc:  # noqa: BLE001 - every failure becomes this row's reason
            self.engine.withdraw()
            self._fail(item, exc)
            return
        self.engine.submit(item)  # blocks when the engine is behind: backpressure

    def _on_output(self, item: Item, output: np.ndarray, infer_ms: float) -> None:
        item.timings["infer_ms"] = infer_ms
        self.encode_slots.acquire()
        future = self.encode_pool.submit(item.tally.run, self._encode_upload, item, output)
        future.add_done_callback(lambda _: self.encode_slots.release())

    def _on_infer_error(self, item: Item, exc: Exception) -> None:
        if not isinstance(exc, ImageError):
            exc = ImageError("inference_failed", f"{item.row['key']}: {exc}")
        self._fail(item, exc)

    def _on_engine_abort(self, item: Item, exc: BaseException) -> None:
        """The engine died holding this image: fail its shard, not the image (it is fine)."""
        item.image = None
        self._release(item)
        item.done.set_exception(WorkerUnhealthyError(
            f"worker {self.worker_id} is unhealthy ({type(exc).__name__}: {one_line(exc)}); "
            f"its shards go to another worker"))

    def _release(self, item: Item) -> None:
        charge, item.charge = item.charge, 0
        if charge:
            self.buffer.release(charge)

    def _encode_upload(self, item: Item, output: np.ndarray) -> None:
        assert item.image is not None
        try:
            self._measure(item, output)
            start = time.perf_counter()
            data = self.codec.encode(item.image, output)
            item.timings["encode_ms"] = _ms(start)
            start = time.perf_counter()
            self.storage.put(item.row["output_key"], data,
                             codec.content_type(item.image.source_format, self.config.codec))
            item.timings["upload_ms"] = _ms(start)
        except Exception as exc:  # noqa: BLE001
            item.outage = is_outage(exc)
            if isinstance(exc, StorageError):
                exc = ImageError("upload_failed", f"{item.row['output_key']}: {exc}")
            self._fail(item, exc)
            return
        row = item.row
        row.update(status="ok", width=item.image.width, height=item.image.height,
                   bytes_in=item.bytes_in, bytes_out=len(data), finished_at=time.time(),
                   **item.timings)
        item.image = None  # free the pixels before the shard finishes
        self._release(item)
        item.done.set_result(row)

    def _measure(self, item: Item, output: np.ndarray) -> None:
        """Sharpness before/after (sampled per config) and PSNR/SSIM of the output and of the
        input against a reference."""
        assert item.image is not None
        cfg = self.config.quality
        row = item.row
        if quality.sampled(row["row_id"], cfg.sharpness_sample_rate, cfg.seed):
            # Pixels kept on the GPU (nvJPEG) come to the host for the sampled rows only.
            lap_in, ten_in = quality.sharpness(codec.host_pixels(item.image.pixels))
            output = codec.host_pixels(output)
            lap_out, ten_out = quality.sharpness(output)
            row.update(sharpness_in=lap_in, sharpness_out=lap_out, tenengrad_in=ten_in,
                       tenengrad_out=ten_out,
                       sharpness_ratio=lap_out / lap_in if lap_in > 0 else None)
        if item.reference:
            try:
                ref = self.codec.decode(self.storage.get(item.reference), item.reference)
                output, sharp = codec.host_pixels(output), codec.host_pixels(ref.pixels)
                blurry = codec.host_pixels(item.image.pixels)
                # The input too, decoded here anyway: whether deblurring helped is the gain.
                row.update(psnr=quality.psnr(output, sharp), ssim=quality.ssim(output, sharp),
                           psnr_in=quality.psnr(blurry, sharp), ssim_in=quality.ssim(blurry, sharp))
            except (PipelineError, ValueError) as exc:
                # The image itself is fine: keep it ok, leave the figures empty, say why.
                log.warning("%s: no PSNR/SSIM against reference %s: %s", row["key"],
                            item.reference, exc)

    def _fail(self, item: Item, exc: BaseException) -> None:
        item.outage = item.outage or is_outage(exc)
        reason, message = describe_failure(item.row["key"], exc)
        row = item.row
        row.update(status="failed", reason=reason, error=message, bytes_in=item.bytes_in or None,
                   finished_at=time.time(), **item.timings)
        if item.image is not None:
            row.update(width=item.image.width, height=item.image.height)
            item.image = None
        self._release(item)
        item.done.set_result(row)


def _gpu_memory_bytes() -> int:
    """Peak CUDA memory this process allocated (0 without CUDA).

    Looks torch up instead of importing it: a worker without a model (the pipeline-overhead
    bench) must not pay a second of torch import on its first shard.
    """
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return 0
    return int(torch.cuda.max_memory_allocated())


def describe_failure(key: str, exc: BaseException) -> tuple[str, str]:
    """(reason class, one-line message naming the image) for a failed row."""
    if isinstance(exc, ImageError):
        reason = exc.reason
        message = str(exc.args[0])
    elif isinstance(exc, NotFoundError):
        reason, message = "not_found", f"{key}: input object does not exist"
    elif isinstance(exc, StorageError):
        reason, message = "fetch_failed", str(exc)
    elif isinstance(exc, PipelineError):
        reason, message = type(exc).__name__, str(exc)
    else:
        reason, message = "internal_error", f"{type(exc).__name__}: {exc}"
    message = " ".join(message.split())  # one line, whatever the exception carried
    return reason, message if key in message else f"{key}: {message}"


def build_processor(config: JobConfig, worker_id: str) -> ShardProcessor:
    """Load the model once and wrap it in a processor (the actor's constructor body)."""
    from deblur.run.inference import Deblurrer
    from deblur.model.weights import load_model

    deblurrer = Deblurrer(load_model(config.model), config.model)
    if deblurrer.device.type == "cpu":
        # Ray sets OMP_NUM_THREADS=1 in actors; on a CPU the model should use the cores the
        # actor reserved (worker.cpus_per_worker), no more and no fewer.
        import torch

        torch.set_num_threads(max(1, int(config.worker.cpus_per_worker)))
    for text in config.model.warm_shapes:  # compile before the first shard, not during it
        shape = parse_shape(text, "model.warm_shapes")
        started = time.perf_counter()
        deblurrer.warm(shape, list(range(1, config.batch.max_batch + 1)))
        log.info("warmed %dx%d in %.1f s%s", *shape, time.perf_counter() - started,
                 f" (eager: {deblurrer.compile_error})" if deblurrer.compile_error else "")
    return ShardProcessor(config, deblurrer.deblur, worker_id,
                          fp32_reruns=lambda: deblurrer.fp32_reruns,
                          infer_tiled=deblurrer.deblur_tiled,
                          # On a CPU nothing runs asynchronously: pipelining would only delay.
                          launch=deblurrer.launch if deblurrer.device.type == "cuda" else None,
                          # On CUDA, nvJPEG's pixels go to the engine without a host bounce.
                          device_pixels=deblurrer.device.type == "cuda")


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class WorkerActor:
    """Ray actor body (decorated in ``scheduler``): one replica, several shards in flight."""

    # A class default: subclasses that build their own processor (benches, tests) need not set
    # it.
    start_error: WorkerStartError | None = None

    def __init__(self, config: dict[str, Any]) -> None:
        from deblur.config import from_dict
        from deblur.console import PrintableFormatter

        # Keys in log lines are shown escaped: with -v these lines reach the terminal.
        handler = logging.StreamHandler()
        handler.setFormatter(PrintableFormatter(logging.BASIC_FORMAT))
        logging.basicConfig(level=logging.INFO, handlers=[handler])
        self.start_error: WorkerStartError | None = None
        try:
            self.processor = build_processor(from_dict(config), worker_name())
        except Exception as exc:  # noqa: BLE001 - reported by ready(), with where it happened
            # Not raised here: Ray would print the traceback and keep only its text; ready()
            # hands the driver the node (to retry elsewhere) and the traceback (for the log).
            import traceback

            import ray

            self.start_error = WorkerStartError(
                one_line(exc), node_id=ray.get_runtime_context().get_node_id(),
                host=socket.gethostname(), trace=traceback.format_exc())

    def ready(self) -> str:
        if self.start_error is not None:
            raise self.start_error
        return self.processor.worker_id

    def health(self) -> str | None:
        """None while healthy, else why not (the actor exits on its next shard)."""
        return self.processor.unhealthy

    def process(self, job_root: str, shard_id: int, attempt: int) -> dict[str, Any]:
        try:
            return self.processor.process(job_root, shard_id, attempt)
        except WorkerUnhealthyError as exc:
            exit_unhealthy(self.processor.worker_id, exc)
            raise  # not reached

    def process_rows(self, job_root: str, shard_id: int, attempt: int,
                     row_ids: list[int]) -> list[dict[str, Any]]:
        try:
            return self.processor.process_rows(job_root, shard_id, attempt, row_ids)
        except WorkerUnhealthyError as exc:
            exit_unhealthy(self.processor.worker_id, exc)
            raise  # not reached


UNHEALTHY_EXIT_CODE = 75
"""The exit status of a worker that stopped itself after a device fault (EX_TEMPFAIL)."""


def exit_unhealthy(worker_id: str, exc: BaseException) -> None:
    """End this actor's process now. Its CUDA context may be unusable (a device fault), so no
    clean-up runs on it: Ray reports the actor dead to the driver, which requeues every shard
    it held to another actor, and none of them is committed from here."""
    log.error("worker %s exits: %s", worker_id, one_line(exc))
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    os._exit(UNHEALTHY_EXIT_CODE)
