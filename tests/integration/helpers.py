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
           "start_driver", "wait_for_results", "write_inputs"]

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
