"""A driver that is killed or cancelled leaves a job that resumes or reruns to completion.

Each driver is a real `deblur run` process with its own in-process Ray, killed as a process
group (Ray's own processes included) the way a lost driver pod or a Ctrl-C would leave it.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from deblur.job.ledger import Ledger
from deblur.io.storage import Storage

from .helpers import (assert_each_row_once, kill_group, run_cli, start_driver,
                      wait_for_results, write_inputs)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


LEASE_TTL_S = 15.0  # short, so the killed driver's lease expires within the test


def test_killed_driver_resumes_without_redoing_finished_shards(tmp_path: Path) -> None:
    storage = Storage()
    src, root = str(tmp_path / "src"), str(tmp_path / "job")
    write_inputs(storage, src, 40, size=(96, 80))
    config = tmp_path / "job.yaml"
    config.write_text(f"scheduler:\n  lease_ttl_s: {LEASE_TTL_S}\n")
    args = ["run", src, str(tmp_path / "out"), "--random-weights", "--shard-size", "2",
            "--job-root", root, "--config", str(config), "-q"]
    driver = start_driver(*args)
    try:
        done = wait_for_results(storage, root, 2, proc=driver)
    finally:
        kill_group(driver)
    ledger = Ledger.open(storage, root)
    lease = ledger.read_lease()
    assert lease is not None, "the killed driver held no lease"
    finished = ledger.done_shards()
    assert len(finished) < len(ledger.shard_ids()), "the job ended before the kill"
    before = {}
    for shard in finished:
        for row in ledger.read_result(shard).to_pylist():  # type: ignore[union-attr]
            before[row["output_key"]] = Path(row["output_key"]).stat().st_mtime_ns
    assert done >= 2 and before
    again = run_cli(*args)
    assert "a job already exists" in again.stderr and again.returncode == 2
    # Resumed at once: the dead driver's lease is still live, but nobody renews it, so the
    # resume waits it out and takes over instead of refusing (a live driver's renewal would
    # refuse it: tests/test_job_root_safety.py).
    resumed = run_cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert time.time() >= lease.expires_at
    assert_each_row_once(ledger, 40)
    assert ledger.read_lease() is None, "the resumed driver did not release its lease"
    for output, mtime in before.items():
        assert Path(output).stat().st_mtime_ns == mtime, f"{output} was redone"


def test_cancel_stops_dispatch_and_rerun_completes(tmp_path: Path) -> None:
    storage = Storage()
    src, root = str(tmp_path / "src"), str(tmp_path / "job")
    write_inputs(storage, src, 30, size=(96, 80))
    driver = start_driver("run", src, str(tmp_path / "out"), "--random-weights",
                          "--shard-size", "2", "--job-root", root)
    try:
        wait_for_results(storage, root, 1, proc=driver)
        cancelled = run_cli("cancel", root)
        assert cancelled.returncode == 0, cancelled.stderr
        assert "live driver" in cancelled.stdout, cancelled.stdout  # cancel is for live jobs
        output, _ = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            kill_group(driver)
    assert driver.returncode == 3, output
    assert "deblur rerun" in output
    status = Ledger.open(storage, root).status()
    assert status.pending > 0
    assert Ledger.open(storage, root).read_lease() is None, "the stopped driver kept its lease"
    finished = run_cli("rerun", root, "-q")
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert_each_row_once(Ledger.open(storage, root), 30)
