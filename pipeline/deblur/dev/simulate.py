"""A simulated GPU worker for scale benchmarks and tests of the driver.

``SimulatedWorker`` has the real worker's Ray interface (``ready``, ``process``) and does the
real ledger I/O of a shard (read its rows, commit a result through ``Ledger.commit``, hand the
index row back), but its "model" sleeps for the time a GPU would take at ``rate`` images/s and
it fetches and uploads nothing. One lock per actor stands for its GPU: two shards in flight
overlap their ledger I/O but not their compute, as on a real worker.

Each report carries the shard's GPU interval and the storage requests it made, so the bench can
tell how long GPUs waited between shards and what a shard costs in requests.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pyarrow as pa

from deblur.job.ledger import Ledger
from deblur.job.results import result_table
from deblur.io.storage import Storage


class SimulatedWorker:
    """Ray actor body: the driver's view of a worker, with a sleeping model.

    Args:
        config: the job config dict (as the real worker gets it); ``rate`` comes from
            ``DEBLUR_SIM_RATE`` (images/s per GPU, default 300: 720p on a large GPU).
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self.rate = float(os.environ.get("DEBLUR_SIM_RATE", "300"))
        self.gpu = threading.Lock()
        self.worker_id = f"sim:{os.getpid()}"

    def ready(self) -> str:
        return self.worker_id

    def process(self, job_root: str, shard_id: int, attempt: int) -> dict[str, Any]:
        storage = Storage()  # one per call: its request counts are this shard's alone
        ledger = Ledger(storage, job_root)
        rows, previous = ledger.pending(shard_id)
        with self.gpu:
            gpu_start = time.time()
            time.sleep(rows.num_rows / self.rate)
            gpu_end = time.time()
        n = rows.num_rows
        valid = [not e for e in rows["error"].to_pylist()]
        results = result_table(
            rows, attempt=attempt, worker=self.worker_id, error=rows["error"],
            status=pa.array(["ok" if v else "failed" for v in valid], pa.string()),
            reason=pa.array([None if v else "invalid_key" for v in valid], pa.string()),
            finished_at=pa.array([gpu_end] * n, pa.float64()))
        summary = ledger.commit(shard_id, results, rows["row_id"] if previous is None else None)
        return {"shard": shard_id, "rows": n, "ok": summary.ok, "failed": summary.failed,
                "seconds": gpu_end - gpu_start, "worker": self.worker_id, "attempt": attempt,
                "summary": summary, "gpu": (gpu_start, gpu_end),
                "requests": dict(storage.ops), "metrics": {"reasons": summary.reason_counts()}}


class Recorder:
    """Stands in the actor pool's ``metrics`` slot: keeps every shard report and when the pool
    was first fully up, which is all the simulation's figures need."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.reports: list[dict[str, Any]] = []
        self.all_ready_at: float | None = None
        self.retries = 0

    def observe_shard(self, report: dict[str, Any]) -> None:
        self.reports.append(report)

    def observe_progress(self, progress: Any, queued: int, running: int) -> None:
        if self.all_ready_at is None and progress.workers_active >= self.workers:
            self.all_ready_at = time.time()

    def observe_retry(self) -> None:
        self.retries += 1


def plan_job(root: str, images: int, shard_size: int, storage: Storage,
             config_overrides: dict[str, Any]) -> Ledger:
    """A job of ``images`` synthetic keys (never fetched) planned through the real ledger."""
    import pyarrow.parquet as pq

    from deblur import config as config_mod

    os.makedirs(root, exist_ok=True)
    manifest = os.path.join(root, "manifest.parquet")
    keys = pa.array([f"photos/{i // 1000:06d}/img{i:09d}.jpg" for i in range(images)])
    pq.write_table(pa.table({"key": keys}), manifest)
    config = config_mod.load(None, {"source": manifest, "destination": f"{root}/out",
                                    "job_root": f"{root}/out/_deblur/sim/",
                                    "shard_size": shard_size, "model.random_weights": True,
                                    "metrics.enabled": False, **config_overrides})
    return Ledger.create(storage, config, job_id="sim", model_info={"name": "simulated"})


def figures(recorder: Recorder, wall: tuple[float, float]) -> dict[str, float]:
    """Dispatch rate, GPU busy share and idle gaps over the window with every worker up.

    The window runs from the moment all workers were ready to the last shard's start: after
    that the queue is empty and idle GPUs are the job ending, not the driver being slow.
    """
    import statistics

    start = recorder.all_ready_at or wall[0]
    spans = sorted(r["gpu"] for r in recorder.reports)
    last_start = max(s for s, _ in spans)
    window = max(last_start - start, 1e-9)
    in_window = [r for r in recorder.reports if start <= r["gpu"][0] <= last_start]
    by_worker: dict[str, list[tuple[float, float]]] = {}
    for report in recorder.reports:
        by_worker.setdefault(report["worker"], []).append(report["gpu"])
    gaps: list[float] = []
    busy = 0.0
    for intervals in by_worker.values():
        intervals.sort()
        for (_, end), (nxt, _) in zip(intervals, intervals[1:]):
            if start <= end and nxt <= last_start:
                gaps.append(max(0.0, nxt - end))
        for s, e in intervals:
            busy += max(0.0, min(e, last_start) - max(s, start))
    gaps.sort()
    return {
        "dispatches_per_s": len(in_window) / window,
        "window_s": window,
        "gpu_busy_share": busy / (recorder.workers * window),
        "idle_gap_p50_ms": 1000 * statistics.median(gaps) if gaps else 0.0,
        "idle_gap_p99_ms": 1000 * gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))] if gaps
        else 0.0,
        "idle_gap_max_ms": 1000 * gaps[-1] if gaps else 0.0,
    }
