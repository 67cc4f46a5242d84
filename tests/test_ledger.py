"""The ledger on moto S3 and local folders: planning, commit merges, status, rerun, cancel."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from deblur.errors import ConfigError, ManifestError
from deblur.job.ledger import Ledger, default_job_root, list_jobs
from deblur.job.results import RESULT_SCHEMA
from deblur.io.storage import Storage, join
from tests.conftest import job_config


def _create(storage: Storage, root: str, count: int, shard_size: int = 4,
            job_id: str = "j1") -> Ledger:
    for i in range(count):
        storage.put(join(root, f"in/{i:02d}.jpg"), b"x")
    job = job_config(join(root, "in"), join(root, "out"),
                     default_job_root(join(root, "out"), job_id), shard_size=shard_size)
    return Ledger.create(storage, job, job_id=job_id, model_info={"name": "mimo-unet"})


def _result(rows: pa.Table, status: dict[int, str], attempt: int = 1) -> pa.Table:
    out = []
    for row in rows.to_pylist():
        s = status.get(row["row_id"], "ok")
        out.append({"row_id": row["row_id"], "key": row["key"], "status": s,
                    "reason": None if s == "ok" else "not_found",
                    "error": None if s == "ok" else f"{row['key']}: gone",
                    "attempt": attempt, "finished_at": time.time()})
    return pa.Table.from_pylist(out, schema=RESULT_SCHEMA)


def test_plan_commit_status_and_rerun(storage: Storage, root: str) -> None:
    ledger = _create(storage, root, 10)
    assert ledger.shard_ids() == [0, 1, 2] and ledger.job()["rows"] == 10
    assert ledger.read_shard(2).num_rows == 2
    status = ledger.status()
    assert (status.total, status.ok, status.pending, status.shards_done) == (10, 0, 10, 0)
    ledger.commit(0, _result(ledger.pending_rows(0), {1: "failed"}))
    ledger.commit(1, _result(ledger.pending_rows(1), {}))
    status = ledger.status()
    assert (status.ok, status.failed, status.pending) == (7, 1, 2)
    assert status.failures_by_reason == {"not_found": 1} and ledger.done_shards() == {0, 1}
    assert ledger.rerun_selection() == [0, 2]
    # A rerun of shard 0 processes only the failed row and keeps the ok ones as they were.
    pending = ledger.pending_rows(0)
    assert pending["row_id"].to_pylist() == [1]
    before = {r["row_id"]: r["finished_at"] for r in ledger.read_result(0).to_pylist()}
    ledger.commit(0, _result(pending, {}, attempt=2))
    after = {r["row_id"]: r for r in ledger.read_result(0).to_pylist()}
    assert sorted(after) == [0, 1, 2, 3] and after[1]["attempt"] == 2
    assert all(after[i]["finished_at"] == before[i] for i in (0, 2, 3))
    ledger.commit(2, _result(ledger.pending_rows(2), {}))
    final = Ledger.open(storage, ledger.job_root).status()
    assert (final.ok, final.failed, final.pending, final.complete) == (10, 0, 0, True)
    assert ledger.rerun_selection() == []


def test_commit_refuses_to_lose_or_repeat_rows(storage: Storage, root: str) -> None:
    ledger = _create(storage, root, 4)
    rows = ledger.pending_rows(0)
    with pytest.raises(AssertionError, match="lose rows"):
        ledger.commit(0, _result(rows.slice(0, 3), {}))
    with pytest.raises(AssertionError):
        ledger.commit(0, _result(pa.concat_tables([rows, rows.slice(0, 1)]), {}))
    assert ledger.read_result(0) is None


def test_permanent_failures_are_not_rerun(storage: Storage, root: str) -> None:
    ledger = _create(storage, root, 2, shard_size=2)
    table = _result(ledger.pending_rows(0), {0: "failed"}).to_pylist()
    table[0]["reason"] = "invalid_key"
    ledger.commit(0, pa.Table.from_pylist(table, schema=RESULT_SCHEMA))
    assert ledger.rerun_selection() == [] and ledger.rerun_selection(all_failed=True) == [0]


def test_a_second_job_at_the_same_root_is_refused(storage: Storage, root: str) -> None:
    ledger = _create(storage, root, 2)
    with pytest.raises(ConfigError, match="already exists"):
        Ledger.create(storage, ledger.config(), job_id="other", model_info={})


def test_open_missing_job_and_empty_source(storage: Storage, root: str) -> None:
    with pytest.raises(ConfigError, match="no job at"):
        Ledger.open(storage, join(root, "nothing"))
    storage.put(join(root, "empty/readme.txt"), b"x")
    job = job_config(join(root, "empty"), join(root, "o"), join(root, "o/_deblur/x"))
    with pytest.raises(ManifestError, match="lists no images"):
        Ledger.create(storage, job, job_id="x", model_info={})


def test_cancel_flag_and_list_jobs(storage: Storage, root: str) -> None:
    first = _create(storage, root, 3, job_id="20260101-000000-aaaaaa")
    assert not first.cancel_requested()
    first.request_cancel()
    assert first.cancel_requested() and first.status().cancel_requested
    first.clear_cancel()
    assert not first.cancel_requested()
    jobs = list_jobs(storage, join(root, "out"))
    assert [j["job_id"] for j in jobs] == ["20260101-000000-aaaaaa"]
    assert jobs[0]["rows"] == 3 and jobs[0]["shards_done"] == 0


def test_status_and_rerun_read_the_index_not_every_result(storage: Storage, root: str) -> None:
    ledger = _create(storage, root, 40, shard_size=2)  # 20 shards
    summaries = [ledger.commit(s, _result(ledger.pending_rows(s), {2 * s: "failed"}
                                          if s % 5 == 0 else {})) for s in range(20)]
    ledger.write_index(summaries)

    reader = Storage()  # counts only the reader's own requests
    fresh = Ledger.open(reader, ledger.job_root)
    before = dict(reader.ops)
    status = fresh.status()
    selection = fresh.rerun_selection()
    used = {k: v - before.get(k, 0) for k, v in reader.ops.items()}
    assert (status.ok, status.failed, status.shards_done) == (36, 4, 20)
    assert status.failures_by_reason == {"not_found": 4}
    assert selection == [0, 5, 10, 15]
    # index + one listing each, whatever the number of shards: no result file is read
    assert used["GET"] == 2 and used["LIST"] == 2 and fresh.index_stale == 0

    # without the index, the same answers come from every result (the slow path)
    reader.delete(ledger.job_root + "index.parquet")
    assert Ledger.open(Storage(), ledger.job_root).status().to_dict() == status.to_dict()


def test_a_result_newer_than_the_index_is_read_again(storage: Storage, root: str) -> None:
    ledger = _create(storage, root, 8, shard_size=4)
    first = [ledger.commit(s, _result(ledger.pending_rows(s), {s * 4: "failed"}))
             for s in range(2)]
    ledger.write_index(first)
    time.sleep(0.01)  # a new local mtime; S3 gives the new object a new ETag
    ledger.commit(0, _result(ledger.pending_rows(0), {}, attempt=2))  # a rerun fixed shard 0
    fresh = Ledger.open(Storage(), ledger.job_root)
    status = fresh.status()
    assert fresh.index_stale == 1
    assert (status.ok, status.failed) == (7, 1)
    assert fresh.rerun_selection() == [1]


def test_quality_means_come_from_the_index(storage: Storage, root: str) -> None:
    from deblur.job.results import quality_means

    ledger = _create(storage, root, 4, shard_size=2)
    summaries = []
    for s, psnr in ((0, [30.0, 32.0]), (1, [28.0, None])):
        table = _result(ledger.pending_rows(s), {})
        table = table.set_column(table.schema.get_field_index("psnr"), "psnr",
                                 pa.array(psnr, pa.float32()))
        summaries.append(ledger.commit(s, table))
    assert quality_means(summaries) == {"mean_psnr": 30.0, "psnr_count": 3}


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_reading_a_ledger_object_starts_no_native_thread() -> None:
    """`deblur status` aborted at exit ("terminate called without an active exception", exit
    -6) in about 1 run in 6 on a loaded machine: pq.read_table's dataset scanner left Arrow's
    IO pool threads alive (apache/arrow#34314). Ledger objects are read on the calling thread,
    so a short command exits with no Arrow thread to tear down. A fresh interpreter: this
    one's pools may already run."""
    code = """
import os
import pyarrow as pa
from deblur.job.results import parquet_bytes, read_parquet

schema = pa.schema([("row_id", pa.int64()), ("reason", pa.string())])
data = parquet_bytes(pa.table({"row_id": pa.array([1, 2], pa.int64())}))
before = len(os.listdir("/proc/self/task"))
table = read_parquet(data, schema)
after = len(os.listdir("/proc/self/task"))
assert table.schema == schema and table.column("reason").null_count == 2, table
print(before, after)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    before, after = map(int, done.stdout.split())
    assert after == before, f"reading a Parquet object started {after - before} threads"
