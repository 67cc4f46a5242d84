"""A real Prometheus (Debian's package) scrapes a real job; every dashboard query and alert
rule is evaluated through its HTTP API."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from deblur import config as config_mod
from deblur.run.driver import execute, open_or_plan
from deblur.io.storage import Storage
from tests.test_metrics import ALERTS, alert_exprs, dashboard_exprs

from .helpers import jpeg

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary(name: str) -> str:
    path = shutil.which(name) or f"/usr/bin/{name}"
    assert Path(path).exists(), f"{name} not found: scripts/install_tools.sh installs it"
    return path


def _api(base: str, path: str, **params: object) -> dict:
    url = f"{base}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as response:
        data = json.loads(response.read())
    assert data["status"] == "success", data
    return data["data"]


@pytest.fixture()
def prometheus(tmp_path: Path):
    metrics_port, web_port = _free_port(), _free_port()
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(tmp_path / "alerts.yml")],
        "scrape_configs": [{"job_name": "deblur",
                            "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}]}))
    proc = subprocess.Popen([
        _binary("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{web_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{web_port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            urllib.request.urlopen(f"{base}/-/ready", timeout=1)
            break
        except OSError:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(0.2)
    yield base, metrics_port
    proc.terminate()
    proc.wait(20)


def _nvml_readable() -> bool:
    import importlib.util

    import torch

    return torch.cuda.is_available() and importlib.util.find_spec("pynvml") is not None


def test_promtool_checks_the_rules() -> None:
    out = subprocess.run([_binary("promtool"), "check", "rules", str(ALERTS)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dashboard_queries_return_data_for_a_real_job(shared_ray, prometheus,
                                                      tmp_path: Path) -> None:
    base, metrics_port = prometheus
    src = tmp_path / "in"
    src.mkdir()
    for i in range(10):
        (src / f"{i}.jpg").write_bytes(jpeg(160, 120, i))
    (src / "broken.jpg").write_bytes(b"not an image")
    # An evaluation job (a reference per row) so that the dashboard's reference panels have
    # their series too.
    refs = src / "refs"
    refs.mkdir()
    for i in range(10):
        (refs / f"{i}.jpg").write_bytes(jpeg(160, 120, i + 100))
    keys = [f"{i}.jpg" for i in range(10)] + ["broken.jpg"]
    pq.write_table(pa.table({"key": keys,
                             "reference": [str(refs / k) for k in keys[:10]] + [None]}),
                   src / "eval.parquet")
    job = config_mod.load(None, {
        "source": str(src / "eval.parquet"), "destination": str(tmp_path / "out"), "shard_size": 3,
        "model.random_weights": True, "metrics.port": metrics_port,
        "metrics.snapshot_interval_s": 1.0, "batch.max_batch": 2})
    ledger = open_or_plan(job, Storage(), resume=False)
    job_id = ledger.job()["job_id"]
    started = time.time()

    # A scrape of the finished job must happen before the endpoint closes: slow the last
    # step a little by keeping the driver alive through one progress callback.
    def linger(progress) -> None:
        if progress.shards_done == progress.shards_total:
            time.sleep(2.5)

    outcome = execute(ledger.config(), ledger, ledger.shard_ids(), 11, linger)
    ended = time.time()
    assert outcome.status.ok == 10 and outcome.status.failed == 1
    time.sleep(1.5)  # let the rule evaluation catch up

    empty = []
    for expr in dashboard_exprs():
        if "deblur_gpu_utilization_ratio" in expr and not _nvml_readable():
            continue  # NVML's figure: absent by design without a GPU and nvidia-ml-py
        query = (expr.replace("$job_id", job_id).replace("$__rate_interval", "10s")
                 .replace("$__range", "1h"))
        result = _api(base, "query_range", query=query, start=started, end=ended + 1, step=1)
        values = [float(v) for series in result["result"] for _, v in series["values"]]
        if not [v for v in values if v == v]:  # all NaN or nothing at all
            empty.append(expr)
    assert not empty, f"dashboard queries with no data for job {job_id}: {empty}"

    for expr in alert_exprs():
        _api(base, "query", query=expr)  # valid PromQL, evaluates on live data
    groups = _api(base, "rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == len(alert_exprs()) and all(r["health"] == "ok" for r in rules), rules

    snapshots = list((Path(ledger.job_root) / "metrics").glob("*.json"))
    assert snapshots
    summary = json.loads((Path(ledger.job_root) / "summary.json").read_text())
    assert summary["ok"] == 10 and summary["latency_ms"]["infer"]["p50_ms"] > 0
    assert 0 < summary["run"]["mean_batch_fill"] <= 1
