"""Prometheus metrics for a job, served by the driver, and snapshots kept in storage.

Where the numbers come from: each worker returns, with every finished shard, what it measured
(per-image stage latencies, batch sizes and fill, engine busy time, GPU memory, queue peak,
storage retries). The driver feeds those into prometheus-client metrics and serves them on
``metrics.host:metrics.port`` (default 127.0.0.1:9464; ``0.0.0.0`` on a cluster so Prometheus
can scrape the head pod). One scrape target per job, whatever the number of GPU nodes, and the
same code path on a laptop and on KubeRay. Worker-level series carry a ``worker`` label.
Granularity is one shard (about a thousand images), which is what a rate over a minute needs.

Snapshots of the same figures go to ``<job_root>/metrics/`` every ``snapshot_interval_s`` and
at the end, so a finished job's performance outlives its cluster (``deblur status`` reads the
last one).

A dead driver takes its series with it, so "no progress" cannot be told from "no driver" by
the gauges above alone: ``deblur_last_progress_timestamp_seconds`` (run start, every shard that
finished, run end) and ``deblur_job_finished_timestamp_seconds`` (set to the same time when the
run ended with nothing left to do or on a cancel request; 0 while it runs) let an alert
(``DeblurDriverLost``) fire on a job whose newest progress is later than its last end while no
driver is scraped for it. So that Prometheus sees that end, ``close`` waits (bounded) for one
more scrape after ``end`` when a scraper has been seen.

Every name below is in ``METRIC_NAMES``; a test checks that the Grafana dashboard and the alert
rules query only these, so a rename cannot silently break a panel.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("deblur.observe.metrics")

STAGES = ("fetch", "decode", "infer", "encode", "upload")
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
_FILL_BUCKETS = (0.25, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)

METRIC_NAMES = (
    "deblur_job_info", "deblur_images_total", "deblur_failures_total", "deblur_bytes_total",
    "deblur_stage_seconds", "deblur_batch_size", "deblur_batch_fill_ratio",
    "deblur_shard_queue_depth", "deblur_decode_queue_peak_images",
    "deblur_shards", "deblur_images_pending", "deblur_images_expected",
    "deblur_job_images_planned", "deblur_job_images_finished", "deblur_workers",
    "deblur_engine_busy_ratio", "deblur_gpu_utilization_ratio",
    "deblur_gpu_memory_peak_bytes", "deblur_storage_retries_total",
    "deblur_shard_retries_total", "deblur_fp32_reruns_total",
    "deblur_last_progress_timestamp_seconds", "deblur_job_finished_timestamp_seconds",
    "deblur_reference_psnr_db", "deblur_reference_ssim", "deblur_reference_psnr_gain_db",
    "deblur_reference_ssim_gain",
)

# The longest ``close`` waits for the scrape that records the run's end. A run that ended is
# otherwise invisible to Prometheus if it ended between two scrapes (the default interval is
# 15 s), and DeblurDriverLost would page for a job that finished.
FINAL_SCRAPE_WAIT_MAX_S = 60.0


class ScrapeClock:
    """A collector that yields nothing and notes when the registry was collected (scraped)."""

    def __init__(self) -> None:
        self.times: deque[float] = deque(maxlen=4)
        self.cond = threading.Condition()

    def collect(self) -> list[Any]:
        with self.cond:
            self.times.append(time.monotonic())
            self.cond.notify_all()
        return []

    def wait_for_scrape_after(self, moment: float, max_s: float) -> bool:
        """Wait until a collect later than ``moment`` (monotonic), at most ~2.5 scrape
        intervals (as measured) or ``max_s``; at once False if nothing ever scraped."""
        with self.cond:
            if not self.times:
                return False
            times = list(self.times)
            gaps = [b - a for a, b in zip(times, times[1:])]
            limit = min(max_s, 2.5 * max(gaps)) if gaps else max_s
            return self.cond.wait_for(lambda: self.times[-1] > moment,
                                      timeout=max(0.0, moment + limit - time.monotonic()))


class JobMetrics:
    """The job's Prometheus metrics (their own registry: one job per driver process)."""

    def __init__(self, job_id: str, model: str, weights_sha256: str | None = None) -> None:
        self.job_id, self.model = job_id, model
        self.registry = CollectorRegistry()
        r, job = self.registry, ["job_id"]
        self.info = Gauge("deblur_job_info", "Always 1; labels describe the job",
                          ["job_id", "model", "weights_sha256"], registry=r)
        self.info.labels(job_id, model, weights_sha256 or "random").set(1)
        self.images = Counter("deblur_images", "Images finished, by status",
                              ["job_id", "model", "worker", "status"], registry=r)
        self.failures = Counter("deblur_failures", "Failed images by reason",
                                ["job_id", "reason"], registry=r)
        self.bytes = Counter("deblur_bytes", "Image bytes read (in) and written (out)",
                             ["job_id", "direction"], registry=r)
        self.stage = Histogram("deblur_stage_seconds", "Per-image latency of each stage",
                               ["job_id", "stage"], buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("deblur_batch_size", "Images per forward pass", job,
                                    buckets=_BATCH_BUCKETS, registry=r)
        # Names follow Prometheus' guidance: a 0-1 value ends in _ratio, a unit in its unit.
        self.batch_fill = Histogram("deblur_batch_fill_ratio",
                                    "Useful pixels / padded pixels of each batch", job,
                                    buckets=_FILL_BUCKETS, registry=r)
        # Two queues, two metrics: one counts shards at the driver, the other images in a
        # worker; summed under one name they meant nothing.
        self.shard_queue = Gauge("deblur_shard_queue_depth",
                                 "Shards waiting at the driver for a worker", job, registry=r)
        self.decode_queue = Gauge("deblur_decode_queue_peak_images",
                                  "Peak of decoded images waiting for the model during the "
                                  "worker's last shard", ["job_id", "worker"], registry=r)
        self.shards = Gauge("deblur_shards", "Shards by state", ["job_id", "state"],
                            registry=r)
        self.pending = Gauge("deblur_images_pending", "Images not finished yet", job,
                             registry=r)
        self.expected = Gauge("deblur_images_expected", "Images this run will finish", job,
                              registry=r)
        # The whole job, across resumes (the two above are this run's): what the ledger had
        # finished when the run started plus what this run finished since.
        self.job_planned = Gauge("deblur_job_images_planned", "Images in the job's manifest",
                                 job, registry=r)
        self.job_finished = Gauge("deblur_job_images_finished",
                                  "Images of the job with a final result (ok or failed), "
                                  "earlier runs included", job, registry=r)
        self.workers = Gauge("deblur_workers", "Worker actors: active (ready) or pending "
                             "(waiting for a GPU node or loading)", ["job_id", "state"],
                             registry=r)
        # What the engine measures is its own busy share, not the device's: a GPU shared
        # with other work, or kernels that leave the device idle, differ from it.
        self.engine_busy = Gauge("deblur_engine_busy_ratio", "Share of wall time the model "
                                 "ran (engine busy fraction over the worker's last shard)",
                                 ["job_id", "worker"], registry=r)
        # Scene jobs (--model deblurgs): each worker's last fitted scene.
        self.scene_steps = Gauge("deblur_scene_steps_per_second", "Optimisation steps per "
                                 "second of the worker's last scene fit (scene jobs)",
                                 ["job_id", "worker"], registry=r)
        self.scene_gaussians = Gauge("deblur_scene_gaussians", "Gaussians in the worker's "
                                     "last fitted scene (scene jobs)", ["job_id", "worker"],
                                     registry=r)
        # The device's own figure, from NVML; only workers that could read it have a series.
        self.gpu_util = Gauge("deblur_gpu_utilization_ratio", "Device utilisation from NVML "
                              "(share of time a kernel ran, sampled when a shard ends)",
                              ["job_id", "worker"], registry=r)
        self.gpu_memory = Gauge("deblur_gpu_memory_peak_bytes", "Peak CUDA memory allocated "
                                "by the worker's process (0 on CPU)", ["job_id", "worker"],
                                registry=r)
        self.storage_retries = Counter("deblur_storage_retries",
                                       "Object-store requests retried (throttles, resets)",
                                       job, registry=r)
        self.shard_retries = Counter("deblur_shard_retries",
                                     "Shards re-dispatched after a worker or node was lost",
                                     job, registry=r)
        self.fp32_reruns = Counter("deblur_fp32_reruns",
                                   "Images rerun in fp32 after a non-finite reduced-precision "
                                   "output", job, registry=r)
        self.last_progress = Gauge("deblur_last_progress_timestamp_seconds",
                                   "Unix time of the run's last progress: its start, a shard "
                                   "finished (ok or failed for good), its end", job, registry=r)
        self.finished = Gauge("deblur_job_finished_timestamp_seconds",
                              "Unix time the run ended with nothing left to do or on a cancel "
                              "request; 0 while it runs", job, registry=r)
        # Evaluation jobs (a reference column): before (the inputs) and after (the outputs)
        # against the references, means over the shards committed so far, and the gain. No
        # series without references.
        self.reference_psnr = Gauge("deblur_reference_psnr_db", "Mean PSNR against the "
                                    "references of the inputs (image=input) and the outputs "
                                    "(image=output)", ["job_id", "image"], registry=r)
        self.reference_ssim = Gauge("deblur_reference_ssim", "Mean SSIM against the "
                                    "references of the inputs (image=input) and the outputs "
                                    "(image=output)", ["job_id", "image"], registry=r)
        self.psnr_gain = Gauge("deblur_reference_psnr_gain_db", "Mean output PSNR minus mean "
                               "input PSNR against the references", job, registry=r)
        self.ssim_gain = Gauge("deblur_reference_ssim_gain", "Mean output SSIM minus mean "
                               "input SSIM against the references", job, registry=r)
        self._reference: dict[str, list[float]] = {}  # psnr, psnr_in, …: [sum, count]
        self.scrapes = ScrapeClock()
        r.register(self.scrapes)
        self.last_progress.labels(job_id).set(time.time())
        self.finished.labels(job_id).set(0)
        self._rows_seen = 0
        self._ended: float | None = None
        # Initialise label sets so every series exists from the first scrape (a panel shows
        # 0, not "no data", and `rate()` has a starting point).
        for status in ("ok", "failed"):
            self.images.labels(job_id, model, "driver", status)
        for direction in ("in", "out"):
            self.bytes.labels(job_id, direction)
        for state in ("done", "running", "queued"):
            self.shards.labels(job_id, state)
        for state in ("active", "pending"):
            self.workers.labels(job_id, state)
        # The histograms too: a short job's shards can all land between two scrapes, and a
        # series whose first sample is already its final count has no increase for `rate()`,
        # so the latency and batch panels would stay empty for exactly the jobs that ran fast.
        for stage in STAGES:
            self.stage.labels(job_id, stage)
        self.batch_size.labels(job_id)
        self.batch_fill.labels(job_id)
        self.storage_retries.labels(job_id)
        self.fp32_reruns.labels(job_id)
        self.shard_retries.labels(job_id)
        self.pending.labels(job_id)
        self.expected.labels(job_id)
        self.shard_queue.labels(job_id)
        self._done_before = 0
        self.latency = LatencySample()
        self.totals: dict[str, Any] = {"ok": 0, "failed": 0, "bytes_in": 0, "bytes_out": 0,
                                       "batches": 0, "batch_images": 0, "fill_sum": 0.0,
                                       "storage_retries": 0, "failures": {}}
        self.server: Any = None
        self.port: int | None = None

    def serve(self, host: str, port: int) -> int | None:
        """Start the /metrics endpoint; a busy port is a warning, never a failed job."""
        try:
            self.server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            log.warning("metrics endpoint %s:%d not started (%s); the job goes on, snapshots "
                        "still go to storage", host, port, exc.strerror)
            return None
        self.port = self.server.server_address[1]
        return self.port

    def end(self, finished: bool) -> None:
        """The run is over: ``finished`` when nothing is left to do or a cancel asked for it
        (an operator needs to do nothing); False for a run stopped early (a signal, a lost
        lease), which DeblurDriverLost then reports once its driver is gone."""
        now = time.time()
        self.last_progress.labels(self.job_id).set(now)
        if finished:
            self.finished.labels(self.job_id).set(now)
        self._ended = time.monotonic()

    def close(self) -> None:
        """Stop serving; after ``end``, first give a scraper (if any ever came) the chance to
        record the end (see ``FINAL_SCRAPE_WAIT_MAX_S``)."""
        if self.server is not None and self._ended is not None:
            self.scrapes.wait_for_scrape_after(self._ended, FINAL_SCRAPE_WAIT_MAX_S)
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    # -- feeding -------------------------------------------------------------------------------

    def observe_shard(self, report: dict[str, Any]) -> None:
        """Fold one finished shard's report (from ``ShardProcessor.process``) in."""
        job, worker = self.job_id, report.get("worker", "unknown")
        m = report.get("metrics") or {}
        self.images.labels(job, self.model, worker, "ok").inc(report["ok"])
        self.images.labels(job, self.model, worker, "failed").inc(report["failed"])
        self.totals["ok"] += report["ok"]
        self.totals["failed"] += report["failed"]
        for reason, count in (m.get("reasons") or {}).items():
            self.failures.labels(job, reason).inc(count)
            self.totals["failures"][reason] = self.totals["failures"].get(reason, 0) + count
        for direction in ("in", "out"):
            amount = m.get(f"bytes_{direction}", 0)
            self.bytes.labels(job, direction).inc(amount)
            self.totals[f"bytes_{direction}"] += amount
        for stage, values in (m.get("stages") or {}).items():
            self.latency.add(stage, values)
            child = self.stage.labels(job, stage)
            for ms in values:
                child.observe(ms / 1000.0)
        for size, fill in m.get("batches") or ():
            self.batch_size.labels(job).observe(size)
            self.batch_fill.labels(job).observe(fill)
            self.totals["batches"] += 1
            self.totals["batch_images"] += size
            self.totals["fill_sum"] += fill
        if m.get("wall_s"):
            # The engine's busy share over the shard's wall time (a gauge: shards in flight
            # together may share it); busy_s is the shard's own part of it.
            busy = m.get("engine_busy_s", m.get("busy_s", 0.0))
            self.engine_busy.labels(job, worker).set(min(1.0, busy / m["wall_s"]))
        if m.get("gpu_utilization") is not None:
            self.gpu_util.labels(job, worker).set(m["gpu_utilization"])
        scene = m.get("scene") or {}
        if scene.get("seconds"):
            self.scene_steps.labels(job, worker).set(scene["steps"] / scene["seconds"])
            self.scene_gaussians.labels(job, worker).set(scene["gaussians"])
        self.gpu_memory.labels(job, worker).set(m.get("gpu_memory_bytes", 0))
        self.decode_queue.labels(job, worker).set(m.get("queue_peak", 0))
        self.fp32_reruns.labels(job).inc(m.get("fp32_reruns", 0))
        retries = m.get("storage_retries", 0)
        self.storage_retries.labels(job).inc(retries)
        self.totals["storage_retries"] += retries
        self._observe_reference(getattr(report.get("summary"), "quality", ""))

    def _observe_reference(self, quality: str) -> None:
        """Fold a shard's quality sums (its index row's JSON) into the reference gauges."""
        sums = json.loads(quality) if quality else {}
        for name in ("psnr", "psnr_in", "ssim", "ssim_in"):
            if name in sums:
                acc = self._reference.setdefault(name, [0.0, 0])
                acc[0] += sums[name][0]
                acc[1] += sums[name][1]
        means = {name: total / count for name, (total, count) in self._reference.items()
                 if count}
        for name, gauge, gain in (("psnr", self.reference_psnr, self.psnr_gain),
                                  ("ssim", self.reference_ssim, self.ssim_gain)):
            for image, key in (("output", name), ("input", f"{name}_in")):
                if key in means:
                    gauge.labels(self.job_id, image).set(means[key])
            if name in means and f"{name}_in" in means:
                gain.labels(self.job_id).set(means[name] - means[f"{name}_in"])

    def observe_progress(self, progress: Any, queued: int, running: int) -> None:
        job = self.job_id
        if progress.rows_done != self._rows_seen:  # called every loop: only real progress
            self._rows_seen = progress.rows_done
            self.last_progress.labels(job).set(time.time())
        self.shards.labels(job, "done").set(progress.shards_done)
        self.shards.labels(job, "running").set(running)
        self.shards.labels(job, "queued").set(queued)
        self.shard_queue.labels(job).set(queued)
        self.pending.labels(job).set(max(0, progress.rows_total - progress.rows_done))
        self.job_finished.labels(job).set(self._done_before + progress.rows_done)
        self.expected.labels(job).set(progress.rows_total)
        self.workers.labels(job, "active").set(progress.workers_active)
        self.workers.labels(job, "pending").set(progress.workers_pending)

    def set_job_scope(self, planned: int, run_rows: int) -> None:
        """The job's size and, from it, what earlier runs finished: every image not in this
        run (``run_rows``) already has its final result row."""
        self._done_before = max(0, planned - run_rows)
        self.job_planned.labels(self.job_id).set(planned)
        self.job_finished.labels(self.job_id).set(self._done_before)

    def observe_retry(self) -> None:
        self.shard_retries.labels(self.job_id).inc()

    def snapshot(self, progress: Any) -> dict[str, Any]:
        """The figures worth keeping after the cluster is gone."""
        totals = self.totals
        return {"time": time.time(), "job_id": self.job_id, "model": self.model,
                "elapsed_s": time.monotonic() - progress.started,
                "images_ok": totals["ok"], "images_failed": totals["failed"],
                "images_per_s": progress.images_per_s, "rows_total": progress.rows_total,
                "rows_done": progress.rows_done, "shards_done": progress.shards_done,
                "shards_total": progress.shards_total, "retries": progress.retries,
                "workers_active": progress.workers_active,
                "workers_pending": progress.workers_pending,
                # What a pending worker waits for (e.g. "GPU: 1"): demand the cluster lacks.
                "waiting_for": getattr(progress, "waiting_for", ""),
                "bytes_in": totals["bytes_in"], "bytes_out": totals["bytes_out"],
                "batches": totals["batches"],
                "mean_batch_size": (totals["batch_images"] / totals["batches"]
                                    if totals["batches"] else None),
                "mean_batch_fill": (totals["fill_sum"] / totals["batches"]
                                    if totals["batches"] else None),
                "storage_retries": totals["storage_retries"],
                "failures_by_reason": dict(totals["failures"])}


class SnapshotWriter:
    """Writes ``metrics/<unix-ms>.json`` under the job root at most every ``interval_s``."""

    def __init__(self, ledger: Any, metrics: JobMetrics, interval_s: float) -> None:
        self.ledger, self.metrics, self.interval_s = ledger, metrics, interval_s
        self.last = 0.0
        self.series: list[dict[str, Any]] = []

    def maybe_write(self, progress: Any, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.interval_s:
            return
        self.last = now
        snap = self.metrics.snapshot(progress)
        self.series.append({k: snap[k] for k in ("time", "elapsed_s", "rows_done",
                                                 "images_per_s", "workers_active")})
        try:
            self.ledger.write_snapshot(snap)
        except Exception as exc:  # noqa: BLE001 - a lost snapshot must not stop the job
            log.warning("metrics snapshot not written: %s", exc)


class LatencySample:
    """A fixed-size uniform sample of each stage's latencies (reservoir sampling, seeded).

    summary.json's percentiles come from here, so the driver's memory does not grow with the
    number of images; they are exact while a stage has at most ``size`` values.
    """

    def __init__(self, size: int = 50_000, seed: int = 0) -> None:
        import random

        self.size = size
        self.random = random.Random(seed)
        self.values: dict[str, list[float]] = {}
        self.seen: dict[str, int] = {}

    def add(self, stage: str, values: Any) -> None:
        kept = self.values.setdefault(stage, [])
        seen = self.seen.get(stage, 0)
        for value in values:
            seen += 1
            if len(kept) < self.size:
                kept.append(value)
            else:
                slot = self.random.randrange(seen)
                if slot < self.size:
                    kept[slot] = value
        self.seen[stage] = seen


def latency_percentiles(sample: dict[str, Any]) -> dict[str, dict[str, float]]:
    """p50/p95/p99 per stage (ms) for summary.json, from ``{stage: values in ms}``."""
    import numpy as np

    out: dict[str, dict[str, float]] = {}
    for stage in STAGES:
        values = np.asarray(sample.get(stage) or (), dtype=np.float64)
        if len(values):
            p50, p95, p99 = np.percentile(values, [50, 95, 99])
            out[stage] = {"p50_ms": float(p50), "p95_ms": float(p95), "p99_ms": float(p99)}
    return out
