"""A driver that is killed or cancelled leaves a job that resumes or reruns to completion.

Each driver is a real `deblur run` process with its own in-process Ray, killed as a process
group (Ray's own processes included) the way a lost driver pod or a Ctrl-C would leave it.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from deblur.job.ledger import Ledger
from deblur.io.storage import Storage, is_s3, join

from .helpers import (assert_each_row_once, kill_group, run_cli, start_driver,
                      wait_for_results, write_inputs)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


LEASE_TTL_S = 120.0  # long: a driver killed on this host is taken over well before it ends


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
    # Resumed at once: the dead driver's lease is still live, but its process on this host is
    # gone, so the resume takes it over without waiting for it to expire (one from another
    # host is waited out, and a renewal refuses: tests/test_lease_takeover.py).
    resumed = run_cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert time.time() < lease.expires_at
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


def test_rerun_right_after_a_killed_driver_takes_over_at_once(root: str,
                                                              tmp_path: Path) -> None:
    """Issue 25.1: `deblur rerun` right after a driver was SIGKILLed mid-job (the usual way
    a node or a pod dies) exits 0 without waiting for the dead driver's lease: it ran on
    this host and its process is gone. Every row ends ok; no committed result is redone."""
    storage = Storage()
    src, dest, job_root = join(root, "src"), join(root, "out"), join(root, "job")
    write_inputs(storage, src, 24, size=(96, 80))
    config = tmp_path / "job.yaml"
    config.write_text(f"scheduler:\n  lease_ttl_s: {LEASE_TTL_S}\n")
    driver = start_driver("run", src, dest, "--random-weights", "--shard-size", "2",
                          "--job-root", job_root, "--config", str(config), "-q")
    try:
        wait_for_results(storage, job_root, 2, proc=driver)
    finally:
        kill_group(driver)
    ledger = Ledger.open(storage, job_root)
    lease = ledger.read_lease()
    assert lease is not None and lease.live, "the killed driver held no live lease"
    finished = ledger.done_shards()
    assert finished and len(finished) < len(ledger.shard_ids()), "the job ended before the kill"
    # What was committed before the rerun: each result's version and rows, and (local) each
    # output's mtime; none of it may be written again.
    before = {shard: (storage.head(join(job_root, f"results/{shard:05d}.parquet")).etag,
                      ledger.read_result(shard).to_pylist())  # type: ignore[union-attr]
              for shard in finished}
    outputs = {row["output_key"]: Path(row["output_key"]).stat().st_mtime_ns
               for _, rows in before.values() for row in rows if not is_s3(root)}
    started = time.time()
    rerun = run_cli("rerun", job_root, "-q")
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert time.time() < lease.expires_at, (
        f"the rerun took {time.time() - started:.0f} s: it waited for the dead driver's lease")
    table = assert_each_row_once(Ledger.open(storage, job_root), 24)
    assert set(table["status"].to_pylist()) == {"ok"}, [
        row for row in table.to_pylist() if row["status"] != "ok"][:3]
    for shard, (etag, rows) in before.items():
        assert storage.head(join(job_root, f"results/{shard:05d}.parquet")).etag == etag
        assert ledger.read_result(shard).to_pylist() == rows  # type: ignore[union-attr]
    for output, mtime in outputs.items():
        assert Path(output).stat().st_mtime_ns == mtime, f"{output} was redone"
    assert ledger.read_lease() is None, "the rerun did not release its lease"
