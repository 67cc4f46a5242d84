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
from deblur.observe import quality
from deblur.run.engine import Engine
from deblur.config import JobConfig, parse_shape
from deblur.errors import ImageError, NotFoundError, PipelineError, StorageError
from deblur.job.ledger import RESULT_SCHEMA, Ledger
from deblur.io.local import link_problem
from deblur.io.storage import Storage, get_storage, is_s3, join, to_local_path
from deblur.job.manifest import is_manifest, overwrites_input, would_overwrite

log = logging.getLogger("deblur.run.worker")


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

    @property
    def pixels(self) -> np.ndarray:
        """The decoded pixels the engine batches (set before the item reaches it)."""
        assert self.image is not None
        return self.image.pixels


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


class ShardProcessor:
    """Runs shards through fetch -> decode -> batch -> model -> encode -> upload -> commit.

    Args:
        config: the job's configuration.
        infer: the model call (``Deblurrer.deblur`` or a stand-in such as an identity for
            measuring the pipeline's own overhead).
        worker_id: recorded in every result row.
        storage: defaults to the process-wide client for ``config.storage``.
        fp32_reruns: how many images the model has rerun in fp32 so far (reported per shard).
    """

    def __init__(self, config: JobConfig,
                 infer: Callable[[list[np.ndarray], tuple[int, int] | None], list[np.ndarray]],
                 worker_id: str, storage: Storage | None = None,
                 fp32_reruns: Callable[[], int] = lambda: 0) -> None:
        self.config = config
        self.fp32_reruns = fp32_reruns
        self.worker_id = worker_id
        self.storage = storage or get_storage(config.storage)
        threads = config.worker.io_threads
        self.decode_pool = ThreadPoolExecutor(threads, thread_name_prefix="fetch")
        self.encode_pool = ThreadPoolExecutor(threads, thread_name_prefix="upload")
        # Bounds decoded-but-not-uploaded images so a slow store cannot fill memory.
        self.encode_slots = threading.BoundedSemaphore(config.worker.prefetch + threads)
        # Pillow in-process or in a process pool, or nvJPEG on the GPU (io/codec.py make_codec).
        self.codec = codec.make_codec(config.codec, config.model.device,
                                      config.worker.cpus_per_worker)
        self.engine: Engine[Item] = Engine(infer, config, self._on_output, self._on_infer_error)

    # -- per shard -------------------------------------------------------------------------

    def process(self, job_root: str, shard_id: int, attempt: int) -> dict[str, Any]:
        """Process the shard's pending rows and commit its result; returns a small report."""
        start = time.perf_counter()
        busy_before = self.engine.busy_seconds
        retries_before = self.storage.retries
        reruns_before = self.fp32_reruns()
        ledger = Ledger(self.storage, job_root)
        pending, previous = ledger.pending(shard_id)
        planned_ids = pending["row_id"] if previous is None else None
        rows = pending.to_pylist()
        tries = {} if previous is None else dict(zip(previous["row_id"].to_pylist(),
                                                     previous["attempt"].to_pylist()))
        items = [self._start(row, attempt + (tries.get(row["row_id"]) or 0), job_root)
                 for row in rows]
        results = [item.done.result() for item in items]
        summary = ledger.commit(shard_id, pa.Table.from_pylist(results, schema=RESULT_SCHEMA),
                                planned_ids)
        ok = sum(r["status"] == "ok" for r in results)
        wall = time.perf_counter() - start
        batches, busy_after, queue_peak = self.engine.drain_stats()
        reasons: dict[str, int] = {}
        for r in results:
            if r["status"] != "ok":
                reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
        metrics = {
            "stages": {stage: [r[f"{stage}_ms"] for r in results if r[f"{stage}_ms"] is not None]
                       for stage in ("fetch", "decode", "infer", "encode", "upload")},
            "batches": batches, "busy_s": busy_after - busy_before, "wall_s": wall,
            "queue_peak": queue_peak, "reasons": reasons,
            "bytes_in": sum(r["bytes_in"] or 0 for r in results),
            "bytes_out": sum(r["bytes_out"] or 0 for r in results),
            "storage_retries": self.storage.retries - retries_before,
            "gpu_memory_bytes": _gpu_memory_bytes(),
            "fp32_reruns": self.fp32_reruns() - reruns_before,
        }
        return {"shard": shard_id, "rows": len(results), "ok": ok, "failed": len(results) - ok,
                "seconds": wall, "worker": self.worker_id, "attempt": attempt,
                "summary": summary, "metrics": metrics}

    def _start(self, row: dict[str, Any], attempt: int, job_root: str = "") -> Item:
        base = {name: None for name in RESULT_SCHEMA.names}
        base.update(row_id=row["row_id"], key=row["key"], output_key=row["output_key"],
                    attempt=attempt, worker=self.worker_id)
        item = Item(row=base, done=Future(), reference=row.get("reference"))
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
        self.decode_pool.submit(self._fetch_decode, item)
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
        future = self.encode_pool.submit(self._encode_upload, item, output)
        future.add_done_callback(lambda _: self.encode_slots.release())

    def _on_infer_error(self, item: Item, exc: Exception) -> None:
        self._fail(item, ImageError("inference_failed", f"{item.row['key']}: {exc}"))

    def _encode_upload(self, item: Item, output: np.ndarray) -> None:
        assert item.image is not None
        try:
            self._measure(item, output)
            start = time.perf_counter()
            data = self.codec.encode(item.image, output)
            item.timings["encode_ms"] = _ms(start)
            start = time.perf_counter()
            self.storage.put(item.row["output_key"], data)
            item.timings["upload_ms"] = _ms(start)
        except Exception as exc:  # noqa: BLE001
            if isinstance(exc, StorageError):
                exc = ImageError("upload_failed", f"{item.row['output_key']}: {exc}")
            self._fail(item, exc)
            return
        row = item.row
        row.update(status="ok", width=item.image.width, height=item.image.height,
                   bytes_in=item.bytes_in, bytes_out=len(data), finished_at=time.time(),
                   **item.timings)
        item.image = None  # free the pixels before the shard finishes
        item.done.set_result(row)

    def _measure(self, item: Item, output: np.ndarray) -> None:
        """Sharpness before/after (sampled per config) and PSNR/SSIM against a reference."""
        assert item.image is not None
        cfg = self.config.quality
        row = item.row
        if quality.sampled(row["row_id"], cfg.sharpness_sample_rate, cfg.seed):
            lap_in, ten_in = quality.sharpness(item.image.pixels)
            lap_out, ten_out = quality.sharpness(output)
            row.update(sharpness_in=lap_in, sharpness_out=lap_out, tenengrad_in=ten_in,
                       tenengrad_out=ten_out,
                       sharpness_ratio=lap_out / lap_in if lap_in > 0 else None)
        if item.reference:
            try:
                ref = self.codec.decode(self.storage.get(item.reference), item.reference)
                row.update(psnr=quality.psnr(output, ref.pixels),
                           ssim=quality.ssim(output, ref.pixels))
            except (PipelineError, ValueError) as exc:
                # The image itself is fine: keep it ok, leave the figures empty, say why.
                log.warning("%s: no PSNR/SSIM against reference %s: %s", row["key"],
                            item.reference, exc)

    def _fail(self, item: Item, exc: BaseException) -> None:
        reason, message = describe_failure(item.row["key"], exc)
        row = item.row
        row.update(status="failed", reason=reason, error=message, bytes_in=item.bytes_in or None,
                   finished_at=time.time(), **item.timings)
        if item.image is not None:
            row.update(width=item.image.width, height=item.image.height)
            item.image = None
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
    from deblur.model import load_model

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
                          fp32_reruns=lambda: deblurrer.fp32_reruns)


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class WorkerActor:
    """Ray actor body (decorated in ``scheduler``): one replica, several shards in flight."""

    def __init__(self, config: dict[str, Any]) -> None:
        from deblur.config import from_dict

        logging.basicConfig(level=logging.INFO)
        self.processor = build_processor(from_dict(config), worker_name())

    def ready(self) -> str:
        return self.processor.worker_id

    def process(self, job_root: str, shard_id: int, attempt: int) -> dict[str, Any]:
        return self.processor.process(job_root, shard_id, attempt)
