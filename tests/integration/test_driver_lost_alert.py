"""DeblurDriverLost: a job whose driver died before the job ended alerts, although the dead
driver's series are gone; a job that finished, was resumed elsewhere or is still running does
not. The rule is the chart's own file (helm/deblur/files/alerts.yml), evaluated by Prometheus
itself: `promtool test rules` over hours of synthetic series, and a real Prometheus scraping a
real `deblur run` that is killed and then resumed."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from deblur.io.storage import Storage
from deblur.job.ledger import Ledger
from tests.test_metrics import ALERTS

from .helpers import kill_group, run_cli, start_driver, wait_for_results, write_inputs
from .test_prometheus import _api, _binary, prometheus  # noqa: F401 - the fixture

pytestmark = pytest.mark.integration

RULE = "DeblurDriverLost"


def _rule() -> dict:
    rules = [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]
    return next(r for r in rules if r.get("alert") == RULE)


def _firing(job: str, last_progress: str) -> dict:
    """The alert promtool should see for ``job`` (annotations rendered as Prometheus does)."""
    annotations = {k: v.replace("{{ $labels.job_id }}", job)
                   .replace("{{ $value | humanizeTimestamp }}", last_progress)
                   for k, v in _rule()["annotations"].items()}
    return {"exp_labels": {"job_id": job, **_rule()["labels"]},
            "exp_annotations": annotations}


def _series(job: str, instance: str, progress: str, finished: str) -> list[dict]:
    labels = f'job_id="{job}", instance="{instance}"'
    return [{"series": f"deblur_last_progress_timestamp_seconds{{{labels}}}", "values": progress},
            {"series": f"deblur_job_finished_timestamp_seconds{{{labels}}}", "values": finished}]


def test_rule_fires_only_for_a_job_whose_last_driver_died_unfinished(tmp_path: Path) -> None:
    # One sample a minute; a sample's value is its own time in seconds (minute m -> 60*m), as
    # the driver sets it. "stale" is what Prometheus records when a target stops answering.
    series = [
        # dead: progress until 10m, then the driver is gone without ending.
        *_series("dead", "h1", "0+60x10 stale", "0x10 stale"),
        # done: ended at 10m (finished = last progress), then its endpoint closed.
        *_series("done", "h1", "0+60x10 stale", "0x9 600 stale"),
        # resumed: died at 5m, a driver on another pod resumed it at 7m and ended at 12m.
        *_series("resumed", "h1", "0+60x5 stale", "0x5 stale"),
        *_series("resumed", "h2", "_x6 420+60x5 stale", "_x6 0x4 720 stale"),
        # rerun-died: finished at 5m; rerun on another pod at 30m, which died at 35m.
        *_series("rerun-died", "h1", "0+60x5 stale", "0x4 300 stale"),
        *_series("rerun-died", "h2", "_x30 1800+60x5 stale", "_x30 0x5 stale"),
        # hiccup: 3 failed scrapes of a live driver (under the rule's 5m), then back.
        *_series("hiccup", "h1", "0+60x5 stale _x2 540+60x30", "0x5 stale _x2 0x30"),
        # alive: a driver still running, with no progress for an hour (DeblurStalled's case).
        *_series("alive", "h1", "0x60", "0x60"),
    ]
    checks = [
        {"eval_time": "15m", "alertname": RULE, "exp_alerts": []},  # 'dead' pending only
        {"eval_time": "17m", "alertname": RULE,
         "exp_alerts": [_firing("dead", "1970-01-01 00:10:00 +0000 UTC")]},
        {"eval_time": "45m", "alertname": RULE,
         "exp_alerts": [_firing("dead", "1970-01-01 00:10:00 +0000 UTC"),
                        _firing("rerun-died", "1970-01-01 00:35:00 +0000 UTC")]},
    ]
    tests = tmp_path / "driver_lost_test.yml"
    tests.write_text(yaml.safe_dump({
        "rule_files": [str(ALERTS)], "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": checks}]}))
    out = subprocess.run([_binary("promtool"), "test", "rules", str(tests)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def _query(base: str, expr: str) -> list[dict]:
    return _api(base, "query", query=expr)["result"]


def _wait_for(what: str, check, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


@pytest.mark.slow
def test_killed_driver_alerts_and_resumed_finished_job_does_not(prometheus,  # noqa: F811
                                                                tmp_path: Path) -> None:
    base, metrics_port = prometheus
    storage = Storage()
    src, root = str(tmp_path / "src"), str(tmp_path / "job")
    write_inputs(storage, src, 24, size=(96, 80))
    config = tmp_path / "job.yaml"
    config.write_text("scheduler:\n  lease_ttl_s: 4\n")
    args = ["run", src, str(tmp_path / "out"), "--random-weights", "--shard-size", "2",
            "--job-root", root, "--config", str(config), "--metrics-port", str(metrics_port),
            "-q"]
    expr = _rule()["expr"]

    driver = start_driver(*args)
    try:
        wait_for_results(storage, root, 2, proc=driver)
        job_id = Ledger.open(storage, root).job()["job_id"]
        # Prometheus has scraped this driver's progress before it dies.
        _wait_for("a scrape of the running driver", lambda: _query(
            base, f'deblur_last_progress_timestamp_seconds{{job_id="{job_id}"}}'))
        assert not _query(base, expr), "the rule fired for a live driver"
    finally:
        kill_group(driver)  # SIGKILL, Ray included: nothing gets to say goodbye

    lost = _wait_for("the rule's expression to find the dead driver's job",
                     lambda: _query(base, expr))
    assert [r["metric"]["job_id"] for r in lost] == [job_id]
    pending = _wait_for(f"{RULE} to be pending", lambda: [
        a for a in _api(base, "alerts")["alerts"]
        if a["labels"]["alertname"] == RULE and a["labels"]["job_id"] == job_id])
    assert pending[0]["state"] in ("pending", "firing")

    # No wait for the killed driver's lease: it ran on this host and its process is gone, so
    # the resume takes it over at once (tests/integration/test_driver_restart.py holds that).
    resumed = run_cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    # The resumed driver's end was scraped before its endpoint closed: finished == last
    # progress, so the job is done as far as the rule can tell.
    ended = _query(base, f'max_over_time(deblur_job_finished_timestamp_seconds'
                         f'{{job_id="{job_id}"}}[10m])')
    last = _query(base, f'max_over_time(deblur_last_progress_timestamp_seconds'
                        f'{{job_id="{job_id}"}}[10m])')
    assert float(ended[0]["value"][1]) > 0
    assert float(ended[0]["value"][1]) == float(last[0]["value"][1])
    assert not _query(base, expr), "the rule still finds a job that finished"
    summary = json.loads((Path(root) / "summary.json").read_text())
    assert summary["ok"] == 24
