"""Metric names: what the dashboard and alert rules query is what the pipeline exports."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest

from deblur.observe.metrics import METRIC_NAMES, JobMetrics, LatencySample, latency_percentiles

ROOT = Path(__file__).resolve().parents[1]
# The only copies: the Helm chart ships them, the compose stack and scripts/monitor.sh mount them.
DASHBOARD = ROOT / "helm" / "deblur" / "files" / "deblur-dashboard.json"
ALERTS = ROOT / "helm" / "deblur" / "files" / "alerts.yml"
_SUFFIXES = ("_bucket", "_sum", "_count", "_total", "_created")


def dashboard_exprs() -> list[str]:
    data = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in data["panels"] for t in p.get("targets", [])]


def alert_exprs() -> list[str]:
    data = yaml.safe_load(ALERTS.read_text())
    return [r["expr"] for g in data["groups"] for r in g["rules"]]


@dataclass
class _Summary:
    quality: str  # the one field of deblur.job.results.ShardSummary the metrics read


def _fed_metrics() -> JobMetrics:
    from deblur.run.pool import Progress

    metrics = JobMetrics("job-1", "mimo-unet", "abc")
    metrics.set_job_scope(planned=10, run_rows=6)  # a resumed run: 4 images done before it
    metrics.observe_shard({"worker": "w1", "ok": 3, "failed": 1, "metrics": {
        "stages": {"fetch": [1.0, 2.0], "infer": [30.0]}, "batches": [(2, 0.9), (1, 1.0)],
        "busy_s": 0.5, "wall_s": 1.0, "queue_peak": 4, "reasons": {"corrupt": 1},
        "bytes_in": 100, "bytes_out": 80, "storage_retries": 2, "gpu_memory_bytes": 0,
        "fp32_reruns": 3, "gpu_utilization": 0.75},
        # An evaluation job's shard: its index row's quality sums (PSNR/SSIM before, after).
        "summary": _Summary(json.dumps({"psnr": [60.0, 2], "psnr_in": [50.0, 2],
                                        "ssim": [1.8, 2], "ssim_in": [1.6, 2]}))})
    metrics.observe_progress(Progress(shards_total=2, rows_total=6, rows_done=4), queued=1,
                             running=1)
    return metrics


def exported_series_names() -> set[str]:
    text = generate_latest(_fed_metrics().registry).decode()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines()
            if line and not line.startswith("#")}


def test_every_queried_metric_is_exported() -> None:
    exported = exported_series_names()
    queried = set()
    for expr in dashboard_exprs() + alert_exprs():
        queried |= set(re.findall(r"\bdeblur_[a-z_]+", expr))
    assert queried, "no deblur metric found in the dashboard"
    missing = queried - exported
    assert not missing, f"dashboard/alerts query metrics the pipeline does not export: {missing}"


def test_metric_names_list_matches_the_registry() -> None:
    def base(name: str) -> str:
        for suffix in _SUFFIXES:
            name = name.removesuffix(suffix)
        return name

    exported = {base(n) for n in exported_series_names()}
    assert exported == {base(n) for n in METRIC_NAMES}


def test_dashboard_has_datasource_and_job_variables_and_every_panel_filters_by_job() -> None:
    data = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in data["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert "deblur_job_info" in variables["job_id"]["query"]
    for expr in dashboard_exprs():
        assert 'job_id=~"$job_id"' in expr, expr


# Renamed by Prometheus' naming guidance (a 0-1 value ends in _ratio, a peak says so, one
# metric per queue); nothing may export or query the old names.
RENAMED = {
    "deblur_batch_fill": "deblur_batch_fill_ratio",
    "deblur_gpu_utilization": "deblur_engine_busy_ratio",
    "deblur_gpu_memory_bytes": "deblur_gpu_memory_peak_bytes",
    "deblur_queue_depth": "deblur_shard_queue_depth",
}


def test_old_metric_names_are_gone_from_metrics_dashboard_and_rules() -> None:
    text = generate_latest(_fed_metrics().registry).decode()
    exported = exported_series_names()
    for old, new in RENAMED.items():
        assert not any(re.fullmatch(rf"{old}(_bucket|_sum|_count|_created)?", n)
                       for n in exported), old
        assert any(n.startswith(new) for n in exported), new
        assert not re.search(rf"\b{old}\b(?!_ratio|_peak)", text), old
        for expr in dashboard_exprs() + alert_exprs():
            assert not re.search(rf"\b{old}\b(?!_ratio)", expr), (old, expr)
        assert old not in METRIC_NAMES


def test_ratios_and_the_two_queues() -> None:
    metrics = _fed_metrics()
    value = metrics.registry.get_sample_value
    # the engine's busy share and the device's own figure are two series
    assert value("deblur_engine_busy_ratio", {"job_id": "job-1", "worker": "w1"}) == 0.5
    assert value("deblur_gpu_utilization_ratio", {"job_id": "job-1", "worker": "w1"}) == 0.75
    assert value("deblur_batch_fill_ratio_sum", {"job_id": "job-1"}) == pytest.approx(1.9)
    # shards at the driver (no worker label) and images in a worker: separate metrics
    assert value("deblur_shard_queue_depth", {"job_id": "job-1"}) == 1
    assert value("deblur_decode_queue_peak_images", {"job_id": "job-1", "worker": "w1"}) == 4
    assert value("deblur_gpu_memory_peak_bytes", {"job_id": "job-1", "worker": "w1"}) == 0


def test_every_rated_series_exists_at_zero_before_the_first_shard() -> None:
    """A job whose shards all finish between two scrapes must still give `rate()` an
    increase: the counters and histograms the dashboard rates exist at 0 from the start."""
    metrics = JobMetrics("job-1", "mimo-unet")
    value = metrics.registry.get_sample_value
    for stage in ("fetch", "decode", "infer", "encode", "upload"):
        assert value("deblur_stage_seconds_count", {"job_id": "job-1", "stage": stage}) == 0
    assert value("deblur_batch_size_count", {"job_id": "job-1"}) == 0
    assert value("deblur_batch_fill_ratio_count", {"job_id": "job-1"}) == 0
    rated = set()
    for expr in dashboard_exprs() + alert_exprs():
        rated |= set(re.findall(r"rate\((deblur_[a-z_]+)", expr))
    text = generate_latest(metrics.registry).decode()
    # Failures by reason are the exception: a reason's series cannot exist before its first
    # failure (the set of reasons is open), and a job with none rightly shows none.
    missing = {name for name in rated - {"deblur_failures_total"} if f"\n{name}{{" not in text}
    assert not missing, f"rated series absent until the first shard: {sorted(missing)}"


def test_device_utilization_is_absent_without_nvml_reading() -> None:
    """A worker that reports no NVML figure (CPU, no nvidia-ml-py) has no series."""
    metrics = JobMetrics("job-1", "mimo-unet")
    metrics.observe_shard({"worker": "w1", "ok": 1, "failed": 0, "metrics": {
        "busy_s": 0.2, "wall_s": 1.0, "gpu_utilization": None}})
    text = generate_latest(metrics.registry).decode()
    assert "deblur_gpu_utilization_ratio{" not in text
    assert 'deblur_engine_busy_ratio{job_id="job-1",worker="w1"} 0.2' in text


def test_job_progress_gauges_count_earlier_runs() -> None:
    """A resumed run's gauges start from what the ledger had, so the job's progress does not
    drop back to zero (the run's own gauges do)."""
    metrics = _fed_metrics()  # 10 images, 4 done before this run, 4 of its 6 done since
    assert _gauge(metrics, "deblur_job_images_planned") == 10
    assert _gauge(metrics, "deblur_job_images_finished") == 8
    assert _gauge(metrics, "deblur_images_expected") == 6
    assert _gauge(metrics, "deblur_images_pending") == 2


def test_shard_reports_fold_into_snapshot() -> None:
    from deblur.run.pool import Progress

    metrics = _fed_metrics()
    snap = metrics.snapshot(Progress(shards_total=2, rows_total=8, rows_done=4))
    assert snap["images_ok"] == 3 and snap["images_failed"] == 1
    assert snap["mean_batch_size"] == 1.5 and abs(snap["mean_batch_fill"] - 0.95) < 1e-9
    assert snap["failures_by_reason"] == {"corrupt": 1} and snap["storage_retries"] == 2


def test_latency_percentiles_from_the_driver_sample() -> None:
    sample = LatencySample(size=1000)
    for start in range(0, 101, 10):  # shards report their latencies in pieces
        sample.add("infer", [float(i) for i in range(start, min(start + 10, 101))])
    figures = latency_percentiles(sample.values)
    assert figures["infer"] == {"p50_ms": 50.0, "p95_ms": 95.0, "p99_ms": 99.0}
    assert "fetch" not in figures


def test_latency_sample_memory_is_bounded_and_stays_uniform() -> None:
    sample = LatencySample(size=2000, seed=1)
    sample.add("decode", (float(i % 1000) for i in range(200_000)))
    assert len(sample.values["decode"]) == 2000 and sample.seen["decode"] == 200_000
    p50 = latency_percentiles(sample.values)["decode"]["p50_ms"]
    assert 450 < p50 < 550  # a uniform 0..999 stream keeps its median


def test_fp32_reruns_are_counted_per_job() -> None:
    text = generate_latest(_fed_metrics().registry).decode()
    assert 'deblur_fp32_reruns_total{job_id="job-1"} 3.0' in text


def _gauge(metrics: JobMetrics, name: str) -> float:
    value = metrics.registry.get_sample_value(name, {"job_id": metrics.job_id})
    assert value is not None, name
    return value


def test_last_progress_moves_on_progress_only_and_end_marks_finished() -> None:
    from deblur.run.pool import Progress

    metrics = JobMetrics("job-1", "mimo-unet")
    assert _gauge(metrics, "deblur_last_progress_timestamp_seconds") > 0  # the run's start
    assert _gauge(metrics, "deblur_job_finished_timestamp_seconds") == 0
    metrics.last_progress.labels("job-1").set(0)
    progress = Progress(shards_total=2, rows_total=4)
    metrics.observe_progress(progress, queued=2, running=0)  # a loop turn, nothing done
    assert _gauge(metrics, "deblur_last_progress_timestamp_seconds") == 0
    progress.rows_done = 2
    metrics.observe_progress(progress, queued=1, running=1)
    assert _gauge(metrics, "deblur_last_progress_timestamp_seconds") > 0

    stopped = JobMetrics("job-2", "mimo-unet")
    stopped.end(finished=False)  # a signal or a lost lease: not finished
    assert _gauge(stopped, "deblur_job_finished_timestamp_seconds") == 0
    metrics.end(finished=True)
    assert _gauge(metrics, "deblur_job_finished_timestamp_seconds") == \
        _gauge(metrics, "deblur_last_progress_timestamp_seconds") > 0


def test_close_waits_for_the_scrape_that_records_the_end() -> None:
    """A run ending between two scrapes would otherwise look, to Prometheus, like a driver
    that died unfinished (DeblurDriverLost)."""
    import threading
    import time
    import urllib.request

    metrics = JobMetrics("job-1", "mimo-unet")
    port = metrics.serve("127.0.0.1", 0)
    assert port is not None
    url = f"http://127.0.0.1:{port}/metrics"
    assert metrics.scrapes.wait_for_scrape_after(time.monotonic(), 60.0) is False  # no scraper
    urllib.request.urlopen(url, timeout=10).read()  # a scraper exists
    metrics.end(finished=True)
    closer = threading.Thread(target=metrics.close)
    closer.start()
    closer.join(1.0)
    assert closer.is_alive(), "close() did not wait for the final scrape"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    closer.join(30)
    assert not closer.is_alive()
    finished = re.search(r'^deblur_job_finished_timestamp_seconds\{job_id="job-1"\} (\S+)$',
                         text, re.M)
    assert finished and float(finished.group(1)) > 0, text


def test_nvml_is_not_imported_without_cuda() -> None:
    """On a CPU worker the device figure is None (series absent) and pynvml is never loaded."""
    import sys

    from deblur.observe.gpu import device_utilization

    assert device_utilization() is None
    assert "pynvml" not in sys.modules


def test_evaluation_jobs_export_before_after_and_the_gain() -> None:
    value = _fed_metrics().registry.get_sample_value
    assert value("deblur_reference_psnr_db", {"job_id": "job-1", "image": "input"}) == 25.0
    assert value("deblur_reference_psnr_db", {"job_id": "job-1", "image": "output"}) == 30.0
    assert value("deblur_reference_psnr_gain_db", {"job_id": "job-1"}) == 5.0
    assert value("deblur_reference_ssim_gain", {"job_id": "job-1"}) == pytest.approx(0.1)
    plain = JobMetrics("job-2", "mimo-unet")  # no references: no such series at all
    plain.observe_shard({"ok": 1, "failed": 0})
    samples = [line for line in generate_latest(plain.registry).decode().splitlines()
               if not line.startswith("#")]
    assert not [line for line in samples if line.startswith("deblur_reference")]
