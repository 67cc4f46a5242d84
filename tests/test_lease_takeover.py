"""Rerun, run --resume and cancel right after a driver died (issue 25.1): a lease names its
holder's process; one whose process is gone from this host is taken over at once, one from
another host is waited out with a live countdown, and --no-wait refuses as before."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from deblur.cli import app
from deblur.console import LeaseCountdown
from deblur.errors import ConfigError
from deblur.io.storage import Storage, join
from deblur.job.lease import Lease, holder_gone, process_started, this_machine
from deblur.job.ledger import LEASE_NAME, Ledger, default_job_root
from deblur.run.driver import open_or_plan
from tests.conftest import job_config

pytestmark = pytest.mark.skipif(this_machine() is None or process_started(os.getpid()) is None,
                                reason="needs /proc (Linux) to tell whether a process runs")


def _planned(storage: Storage, root: str) -> tuple[Ledger, object]:
    src, dest = join(root, "in"), join(root, "out")
    for i in range(3):
        storage.put(join(src, f"{i}.jpg"), b"x")
    config = job_config(src, dest, default_job_root(dest, "j1"))
    return Ledger.create(storage, config, job_id="j1", model_info={}), config


def _hold(storage: Storage, ledger: Ledger, *, pid: int, pid_started: int | None,
          machine: str | None, ttl: float) -> Lease:
    """lease.json as a driver with that process identity left it."""
    now = time.time()
    lease = Lease(holder=f"elsewhere:{pid}:feed", job_id="j1",
                  destination=ledger.job()["destination"], acquired_at=now,
                  expires_at=now + ttl, host="elsewhere", machine=machine, pid=pid,
                  pid_started=pid_started)
    storage.put(join(ledger.job_root, LEASE_NAME), lease.to_json())
    return lease


def _dead_process() -> tuple[int, int]:
    """The pid and start time of a process that has exited (a SIGKILLed driver)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    started = process_started(proc.pid)
    assert started is not None
    proc.kill()
    proc.wait()
    return proc.pid, started


def test_the_lease_names_its_holder_process(storage: Storage, root: str) -> None:
    ledger, _ = _planned(storage, root)
    ledger.acquire_lease(60.0)
    stored = json.loads(storage.get(join(ledger.job_root, LEASE_NAME)))
    assert stored["pid"] == os.getpid() and stored["host"]
    assert stored["pid_started"] == process_started(os.getpid())
    assert stored["machine"] == this_machine()
    assert holder_gone(ledger.read_lease()) is None  # this process runs


def test_a_dead_local_driver_is_taken_over_at_once(storage: Storage, root: str) -> None:
    """The driver was SIGKILLed on this host: its lease has a minute left, yet resume, rerun
    and cancel all treat it as no driver's, without waiting."""
    ledger, config = _planned(storage, root)
    pid, started = _dead_process()
    dead = _hold(storage, ledger, pid=pid, pid_started=started, machine=this_machine(),
                 ttl=60.0)
    assert "no longer exists" in (holder_gone(dead) or "")
    assert ledger.live_lease() is None and ledger.state()[0] != "running"
    cancel = CliRunner().invoke(app, ["cancel", ledger.job_root])
    assert cancel.exit_code == 0 and "no live driver holds it" in cancel.output, cancel.output
    began = time.monotonic()
    taker = open_or_plan(config, storage, resume=True)  # run --resume
    assert time.monotonic() - began < 10
    assert taker.read_lease().holder == taker.holder != dead.holder
    assert not taker.cancel_requested()  # resuming answers the cancel
    taker.release_lease()
    _hold(storage, ledger, pid=pid, pid_started=started, machine=this_machine(), ttl=60.0)
    rerun = Ledger.open(storage, ledger.job_root)
    rerun.acquire_lease(60.0, wait=False)  # even --no-wait: nobody holds it
    assert rerun.read_lease().holder == rerun.holder


def test_a_reused_pid_is_another_process(storage: Storage, root: str) -> None:
    """The dead driver's pid now belongs to another process (here: this one), which started
    at another time: still a stale lease."""
    ledger, _ = _planned(storage, root)
    mine = process_started(os.getpid())
    assert mine is not None
    stale = _hold(storage, ledger, pid=os.getpid(), pid_started=mine - 1,
                  machine=this_machine(), ttl=60.0)
    assert "another process now" in (holder_gone(stale) or "")
    taker = Ledger.open(storage, ledger.job_root)
    taker.acquire_lease(60.0, wait=False)
    assert taker.read_lease().holder == taker.holder


def test_a_lease_from_another_host_is_waited_out_with_a_countdown(storage: Storage,
                                                                  root: str) -> None:
    """Another host's driver cannot be checked from here: its lease is watched with one live
    line, and taken over once it runs out unrenewed."""
    ledger, _ = _planned(storage, root)
    other = _hold(storage, ledger, pid=os.getpid(), pid_started=None,
                  machine="another-boot/pid:[1]", ttl=2.5)
    assert holder_gone(other) is None
    seen: list[float | None] = []
    taker = Ledger.open(storage, ledger.job_root)
    taker.acquire_lease(60.0, wait=True, on_wait=seen.append)
    assert time.time() >= other.expires_at  # it waited for the expiry ...
    assert taker.read_lease().holder == taker.holder  # ... then took over
    left = [s for s in seen if s is not None]
    assert len(left) >= 2 and left == sorted(left, reverse=True) and left[0] <= 2.5
    assert seen[-1] is None  # the line is taken down when the wait ends


def test_no_wait_refuses_a_live_lease_at_once(storage: Storage, root: str) -> None:
    ledger, config = _planned(storage, root)
    _hold(storage, ledger, pid=os.getpid(), pid_started=None,
          machine="another-boot/pid:[1]", ttl=60.0)
    began = time.monotonic()
    rerun = CliRunner().invoke(app, ["rerun", ledger.job_root, "-q", "--no-wait"])
    assert rerun.exit_code == 2, rerun.output
    assert "another driver is running this job" in rerun.output
    assert "elsewhere:" in rerun.output and "without --no-wait" in rerun.output
    with pytest.raises(ConfigError, match="without --no-wait"):
        open_or_plan(config, storage, resume=True, wait=False)  # run --resume --no-wait
    assert time.monotonic() - began < 30


def test_the_countdown_line() -> None:
    assert LeaseCountdown.line(41.2) == ("waiting for the previous driver's lease: 0:00:41 "
                                         "left; Ctrl-C to stop")
    now = [0.0]
    plain = io.StringIO()
    countdown = LeaseCountdown(plain, tty=False, interval=10.0, clock=lambda: now[0])
    for left in (41.0, 40.0, 39.0):
        countdown(left)
        now[0] += 5.0
    countdown(None)
    assert plain.getvalue().splitlines() == [LeaseCountdown.line(41.0),
                                             LeaseCountdown.line(39.0)]
    live = io.StringIO()
    countdown = LeaseCountdown(live, tty=True)
    countdown(3.0)
    countdown(2.0)
    countdown(None)
    assert live.getvalue() == ("\r\x1b[2K" + LeaseCountdown.line(3.0) + "\r\x1b[2K"
                               + LeaseCountdown.line(2.0) + "\r\x1b[2K")
