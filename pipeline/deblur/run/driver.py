"""The driver: plan or open a job, start Ray, run its shards on the actor pool, summarise.

It does no image work: planning streams the manifest into the ledger, the pool hands shards to
worker actors, and the summary is computed from the ledger's index and bounded metric state,
so a driver restarted on the same job root resumes where the last one stopped.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from deblur.cluster import start_ray
from deblur.config import JobConfig
from deblur.errors import PipelineError
from deblur.job.ledger import Ledger
from deblur.job.results import quality_means
from deblur.run.pool import ActorPool, Progress

log = logging.getLogger("deblur.run.driver")


@dataclass
class JobOutcome:
    """What a finished (or stopped) driver run leaves: the job root and the ledger's totals."""

    job_root: str
    progress: Progress
    status: Any  # ledger.JobStatus

    @property
    def complete(self) -> bool:
        return self.status.pending == 0


class StopSignals(threading.Event):
    """SIGINT and SIGTERM (what Kubernetes sends a pod) ask the driver to stop: the pool
    leaves its loop at the next turn, kills its actors, and the driver writes the index and
    summary.json and exits 3, leaving the job resumable. A flag, not an exception, so no
    ledger write is cut in half. A second signal raises KeyboardInterrupt (stop harder).

    Installed after Ray starts: ``ray.init`` replaces the SIGTERM handler with one that
    calls ``sys.exit(15)``, which left no summary.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        super().__init__()
        self.reason = ""
        self.previous: dict[int, Any] = {}

    def install(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                previous = signal.signal(sig, self._handle)
                self.previous.setdefault(sig, previous)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.is_set():
            raise KeyboardInterrupt
        self.reason = signal.Signals(signum).name
        log.warning("%s received: stopping after this step (again to stop harder)", self.reason)
        self.set()

    def restore(self) -> None:
        for sig, previous in self.previous.items():
            signal.signal(sig, previous)
        self.previous.clear()


def open_or_plan(config: JobConfig, storage: Any, *, resume: bool,
                 job_id: str | None = None, force: bool = False, wait: bool = True,
                 on_wait: Callable[[float | None], None] | None = None) -> Ledger:
    """Plan a new job, or (with ``resume``) reopen the one already at ``config.job_root``.

    ``job_id`` names a new job (``deblur submit`` picks it so the job root is known before the
    cluster starts); default: UTC time + random. The returned ledger holds the job's lease
    (``execute`` keeps renewing it). Resuming takes over a lease whose driver is gone from
    this host at once, and waits out another live one (``wait``; ``on_wait`` shows the
    countdown): taken over if nobody renews it, refused if renewed, refused at once without
    ``wait``. A new job whose destination overlaps that of a live job is refused unless
    ``force``.
    """
    from deblur.errors import ConfigError
    from deblur.model.weights import provenance
    from deblur.job.ledger import (JOB_NAME, check_job_id, default_job_root,
                                   live_jobs_overlapping, new_job_id)
    from deblur.job.manifest import check_destination

    ttl = config.scheduler.lease_ttl_s
    if config.job_root and storage.exists(config.job_root.rstrip("/") + "/" + JOB_NAME):
        if not resume:
            raise ConfigError(
                f"a job already exists at {config.job_root}: pass --resume to finish it, or "
                f"`deblur rerun {config.job_root}` to retry its failed rows")
        ledger = Ledger.open(storage, config.job_root)
        check_model(ledger)  # before the lease: a bad model writes nothing
        ledger.acquire_lease(ttl, wait=wait, on_wait=on_wait)
        ledger.clear_cancel()  # resuming is the operator's answer to an earlier cancel
        return ledger
    if resume and config.job_root is None:
        raise ConfigError("--resume needs --job-root: the job to resume")
    # Source and destination together (a destination inside a folder source) need the
    # manifest's rules, so this check is the planner's, not the config's: still before Ray and
    # before anything is read or written.
    check_destination(config.source, config.destination)
    job_id = check_job_id(job_id) if job_id else new_job_id()
    if config.job_root is None:
        from dataclasses import replace

        config = replace(config, job_root=default_job_root(config.destination, job_id))
    live = live_jobs_overlapping(storage, config.destination, config.job_root)
    if live:
        root, lease = live[0]
        message = (f"job {lease.job_id} ({root}) is running on {lease.destination}, which "
                   f"overlaps {config.destination}: held by {lease.describe()}")
        if not force:
            raise ConfigError(f"{message}; wait for it, `deblur cancel {root}`, or pass "
                              f"--force to write into the same destination anyway")
        log.warning("--force: %s", message)
    model_info = provenance(config.model)  # before the claim: a bad model writes nothing
    return Ledger.create(storage, config, job_id=job_id, model_info=model_info,
                         hold_lease=True)


def check_model(ledger: Ledger, config: JobConfig | None = None) -> dict[str, Any]:
    """Check, before Ray starts, that the job's model loads its weights (``provenance``) and
    that they are the ones the job was planned with: a job whose outputs came from two
    different networks could not be told apart afterwards. ``config``: the job's config as
    this run will use it (default: the stored one)."""
    from deblur.errors import ConfigError
    from deblur.model.weights import provenance

    model = (config or ledger.config()).model
    info = provenance(model)
    planned = (ledger.job().get("model") or {}).get("weights_sha256")
    if planned and info["weights_sha256"] and planned != info["weights_sha256"]:
        raise ConfigError(
            f"weights {model.weights!r} changed since job {ledger.job()['job_id']} was planned "
            f"(sha256 {info['weights_sha256'][:12]}…, job.json has {planned[:12]}…): restore "
            f"the original file, or plan a new job for the new weights")
    return info


def _record_failure(ledger: Ledger, exc: PipelineError, model: dict[str, Any]) -> None:
    """summary.json for a run that ended on an error, so `status` and `list` say why instead
    of showing the job as merely pending: ``failed_to_start`` when no worker could start."""
    from deblur.errors import WorkerStartError, one_line

    state = "failed_to_start" if isinstance(exc, WorkerStartError) else "failed"
    try:
        summary = ledger.status().to_dict()
        summary.update(state=state, error=one_line(exc), ended_at=time.time(), model=model)
        ledger.write_summary(summary)
    except Exception as write_exc:  # noqa: BLE001 - the store may be what failed
        log.warning("could not record the run's %s in summary.json: %s", state,
                    one_line(write_exc))


def execute(config: JobConfig, ledger: Ledger, shards: list[int], rows: int,
            on_progress: Callable[[Progress], None] | None = None,
            actor_class: Any | None = None, *, verbose: bool = False) -> JobOutcome:
    """Run ``shards`` (about ``rows`` images) on Ray, then write summary.json from the ledger.

    Metrics are served on ``config.metrics`` while it runs and snapshotted under the job root.
    ``verbose``: Ray workers' output is copied to this process's stdout.
    """
    from deblur.observe.metrics import JobMetrics, SnapshotWriter, latency_percentiles

    job = ledger.job()
    model = job.get("model") or {}
    metrics = JobMetrics(job["job_id"], config.model.name, model.get("weights_sha256"))
    # The whole job's progress outlives a resume: the images not in this run are done.
    metrics.set_job_scope(int(job.get("rows") or rows), rows)
    if config.metrics.enabled:
        port = metrics.serve(config.metrics.host, config.metrics.port)
        if port is not None:
            log.info("metrics: http://%s:%d/metrics", config.metrics.host, port)
    snapshots = SnapshotWriter(ledger, metrics, config.metrics.snapshot_interval_s)

    workers_since: list[float] = []  # when a worker was first ready: throughput's clock

    def progressed(progress: Progress) -> None:
        if not workers_since and progress.workers_active:
            workers_since.append(time.monotonic())
        snapshots.maybe_write(progress)
        if on_progress is not None:
            on_progress(progress)

    lease = ledger.keep_lease(config.scheduler.lease_ttl_s)  # refuses another live driver
    stop = StopSignals().install()
    try:
        start_ray(config, verbose=verbose)
        stop.install()  # again: ray.init replaced the SIGTERM handler
        pool = ActorPool(config, ledger, progressed, actor_class, metrics, lease=lease)
        pool.stop = stop
        progress = pool.run(shards, rows)
        snapshots.maybe_write(progress, force=True)
        index = ledger.index()  # the index just written, checked against one listing
        status = ledger.status(index)
        summary = status.to_dict()
        summary["state"] = ("stopped" if progress.cancelled or status.pending
                            else "finished")
        final = metrics.snapshot(progress)
        ended = time.monotonic()
        summary["run"] = {"seconds": ended - progress.started,
                          # For run_throughput: this run's images over the wall time from
                          # its first ready worker to its end (start-up excluded).
                          "images": progress.rows_done,
                          "worker_seconds": ended - workers_since[0] if workers_since else None,
                          "images_per_s": progress.images_per_s, "retries": progress.retries,
                          "cancelled": progress.cancelled,
                          "mean_batch_size": final["mean_batch_size"],
                          "mean_batch_fill": final["mean_batch_fill"],
                          "storage_retries": final["storage_retries"],
                          "bytes_in": final["bytes_in"], "bytes_out": final["bytes_out"],
                          "images_per_s_over_time": snapshots.series}
        # Both from bounded state (a latency sample, the index's sums): no result is re-read.
        summary["latency_ms"] = latency_percentiles(metrics.latency.values)
        summary["quality"] = quality_means(index.values())
        summary["model"] = model
        ledger.write_summary(summary)
        # Finished (DeblurDriverLost stays quiet) when nothing is left or a cancel asked for it.
        metrics.end(finished=status.pending == 0 or ledger.cancel_requested())
    except PipelineError as exc:
        _record_failure(ledger, exc, model)
        raise
    finally:
        stop.restore()
        lease.stop()
        metrics.close()
    return JobOutcome(job_root=ledger.job_root, progress=progress, status=status)
