"""Shared pieces of the Ray integration tests: sample inputs, result checks, CLI processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa

from deblur.job.ledger import Ledger
from deblur.io.storage import Storage
from tests.conftest import jpeg

__all__ = ["DEBLUR", "all_results", "assert_each_row_once", "jpeg", "kill_group", "run_cli",
           "start_driver", "stop_ray_of_this_run", "wait_for_results", "write_inputs"]

DEBLUR = [sys.executable, "-m", "deblur.cli"]


def write_inputs(storage: Storage, prefix: str, count: int, size: tuple[int, int] = (48, 40)
                 ) -> list[str]:
    """``count`` small JPEGs under ``prefix`` (sizes vary a little); returns their URIs."""
    uris = []
    for i in range(count):
        uri = f"{prefix.rstrip('/')}/set{i % 3}/img {i:03d}.jpg"
        storage.put(uri, jpeg(size[0] + 4 * (i % 2), size[1] + 4 * (i % 3), i))
        uris.append(uri)
    return uris


def all_results(ledger: Ledger) -> pa.Table:
    tables = [ledger.read_result(s) for s in ledger.shard_ids()]
    assert all(t is not None for t in tables), "some shard has no result"
    return pa.concat_tables(tables)  # type: ignore[arg-type]


def assert_each_row_once(ledger: Ledger, expected_rows: int) -> pa.Table:
    table = all_results(ledger)
    row_ids = sorted(table["row_id"].to_pylist())
    assert row_ids == list(range(expected_rows)), "a row is missing or counted twice"
    return table


def wait_for_results(storage: Storage, job_root: str, count: int, timeout: float = 120.0,
                     proc: subprocess.Popen | None = None) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"driver exited early with {proc.returncode}")
        if storage.exists(job_root.rstrip("/") + "/job.json"):
            done = len(Ledger.open(storage, job_root).done_shards())
            if done >= count:
                return done
        time.sleep(0.2)
    raise AssertionError(f"fewer than {count} shard results after {timeout}s")


def start_driver(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`deblur ARGS` in its own session, so the whole process group (Ray too) can be killed."""
    return subprocess.Popen([*DEBLUR, *args], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})


def kill_group(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*DEBLUR, *args], capture_output=True, text=True, timeout=timeout)


def stop_ray_of_this_run(timeout: float = 30.0) -> None:
    """`ray stop --force` for this test run's Ray processes only.

    `ray stop --force` kills every Ray process on the machine, those of another test run or a
    user's too. Every Ray this run starts lives under its private RAY_TMPDIR
    (tests/conftest.py), which its processes carry in their command line or environment; the
    process kinds are the ones `ray stop` looks for. Processes that rename themselves beyond
    recognition (idle workers) exit with their raylet.
    """
    from ray.autoscaler._private.constants import RAY_PROCESSES

    root = os.environ["RAY_TMPDIR"]
    mine = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            comm = Path(entry.path, "comm").read_text().strip()
            args = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
            environ = Path(entry.path, "environ").read_bytes().split(b"\0")
        except OSError:  # gone, or not ours to read
            continue
        if not any((keyword in comm) if by_name else (keyword in args)
                   for keyword, by_name in RAY_PROCESSES):
            continue
        if root in args or f"RAY_TMPDIR={root}".encode() in environ:
            mine.append(int(entry.name))
    for pid in mine:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while mine and time.monotonic() < deadline:
        mine = [pid for pid in mine if _alive(pid)]
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False
