"""Stopping a running driver: SIGTERM (what Kubernetes sends) and SIGINT exit 3 with a
summary and a job that resumes; `deblur cancel` lets the shards in flight finish first.

The signal tests run a real `deblur run` process with its own in-process Ray, random weights
and many small images, and signal the driver process alone (not Ray's processes).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from deblur.io.storage import Storage
from deblur.job.ledger import Ledger
from tests.conftest import job_config

from .helpers import (assert_each_row_once, kill_group, run_cli, start_driver,
                      wait_for_results, write_inputs)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

IMAGES = 40


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signalled_driver_exits_3_with_a_summary_and_resumes(tmp_path: Path,
                                                               sig: signal.Signals) -> None:
    storage = Storage()
    src, root = str(tmp_path / "src"), str(tmp_path / "job")
    write_inputs(storage, src, IMAGES, size=(96, 80))
    args = ["run", src, str(tmp_path / "out"), "--random-weights", "--shard-size", "2",
            "--job-root", root, "--metrics-port", "0"]
    driver = start_driver(*args)
    try:
        wait_for_results(storage, root, 1, proc=driver)
        os.kill(driver.pid, sig)
        output, _ = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            kill_group(driver)
    assert driver.returncode == 3, output
    assert "Traceback" not in output, output
    ledger = Ledger.open(storage, root)
    summary = json.loads(Path(root, "summary.json").read_text())
    assert summary["run"]["cancelled"] is True
    assert summary["pending"] > 0, "the job ended before the signal"
    assert summary["ok"] + summary["failed"] + summary["pending"] == IMAGES
    assert ledger.read_lease() is None, "the stopped driver kept its lease"

    resumed = run_cli(*args, "--resume", "-q")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert_each_row_once(ledger, IMAGES)


def test_cancel_lets_the_shards_in_flight_finish(shared_ray: Any, tmp_path: Path) -> None:
    from deblur.dev.simulate import SimulatedWorker
    from deblur.run.driver import execute

    storage = Storage()
    src, root = str(tmp_path / "src"), str(tmp_path / "job")
    write_inputs(storage, src, 24)
    job = job_config(src, str(tmp_path / "out"), root, shard_size=2,
                     **{"metrics.enabled": False, "scheduler.shards_per_worker": 2})
    ledger = Ledger.create(storage, job, job_id="cancel", model_info={})
    started = tmp_path / "started"
    started.mkdir()

    class SlowWorker(SimulatedWorker):  # defined here: Ray ships it to the actor by value
        def __init__(self, config: dict[str, Any]) -> None:
            super().__init__(config)
            self.rate = 2.0  # images/s: a 2-image shard takes a second

        def process(self, job_root: str, shard_id: int, attempt: int) -> dict[str, Any]:
            (started / str(shard_id)).touch()
            return super().process(job_root, shard_id, attempt)

    def cancel_after_the_first(progress: Any) -> None:
        if progress.shards_done >= 1 and not ledger.cancel_requested():
            ledger.request_cancel()

    outcome = execute(ledger.config(), ledger, ledger.shard_ids(), 24,
                      on_progress=cancel_after_the_first, actor_class=shared_ray.remote(SlowWorker))
    assert outcome.progress.cancelled
    done = ledger.done_shards()
    assert 1 <= len(done) < len(ledger.shard_ids())
    # Every shard a worker started has its result: none was abandoned half done.
    assert {int(p.name) for p in started.iterdir()} == done
    assert ledger.read_summary() is not None
