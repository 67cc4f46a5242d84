"""Conditional writes: put_if_match on both stores, and shard commits that never regress.

Two processes commit the same shard over and over at the same time, each claiming a different
set of rows ok and the rest failed (what a stale actor and a fresh attempt do). Whatever the
interleaving, the final result must hold every row either process ever committed ok: with a
plain put the later writer's stale merge would silently drop the other's ok rows.
"""

from __future__ import annotations

import multiprocessing
import time

import pyarrow as pa
import pytest

from deblur.config import StorageConfig
from deblur.errors import ConflictError, ConfigError
from deblur.io.storage import Storage, join
from deblur.job.commit import merge_results
from deblur.job.ledger import Ledger
from deblur.job.results import RESULT_SCHEMA
from tests.conftest import make_job

ROUNDS = 60
ROWS = 2 * ROUNDS


def test_put_if_match_is_a_compare_and_swap(storage: Storage, root: str) -> None:
    uri = join(root, "obj")
    first = storage.put_if_absent(uri, b"v1")
    data, tag = storage.get_tagged(uri)
    assert (data, tag) == (b"v1", first) and tag
    second = storage.put_if_match(uri, b"v2", tag)
    assert second and second != tag and storage.get_tagged(uri) == (b"v2", second)
    with pytest.raises(ConflictError):  # a writer still holding v1's tag loses
        storage.put_if_match(uri, b"stale", tag)
    assert storage.get(uri) == b"v2"
    with pytest.raises(ConflictError):  # nothing there to match
        storage.put_if_match(join(root, "absent"), b"x", tag)
    assert not storage.exists(join(root, "absent"))


def test_local_versions_of_equal_size_get_distinct_tags(tmp_path: object) -> None:
    # Same size, written within the clock's granularity: mtime+size alone would repeat.
    storage = Storage()
    uri = f"{tmp_path}/obj"
    tags = [storage.put_if_absent(uri, b"aaaa")]
    for i in range(50):
        tags.append(storage.put_if_match(uri, f"{i % 10:04d}".encode(), tags[-1]))
    assert len(set(tags)) == len(tags)


def _rows(shard: pa.Table, ok: set[int], who: str) -> pa.Table:
    out = []
    for row in shard.to_pylist():
        good = row["row_id"] in ok
        out.append({"row_id": row["row_id"], "key": row["key"],
                    "output_key": row["output_key"], "status": "ok" if good else "failed",
                    "reason": None if good else "worker_lost",
                    "error": None if good else f"{row['key']}: {who}", "worker": who,
                    "finished_at": time.time()})
    return pa.Table.from_pylist(out, schema=RESULT_SCHEMA)


def test_merge_never_turns_ok_into_failed() -> None:
    shard = pa.table({"row_id": pa.array([0, 1, 2], pa.int64()), "key": ["a", "b", "c"],
                      "output_key": ["A", "B", "C"]})
    first = merge_results(None, _rows(shard, {0}, "first"))
    merged = merge_results(first, _rows(shard, {1}, "stale"))
    assert merged["status"].to_pylist() == ["ok", "ok", "failed"]
    assert merged["worker"].to_pylist() == ["first", "stale", "stale"]


def _committer(job_root: str, endpoint: str | None, who: int, start: object,
               out: object) -> None:
    storage = Storage(StorageConfig(endpoint_url=endpoint))
    ledger = Ledger(storage, job_root)
    shard = ledger.read_shard(0)
    claimed: set[int] = set()
    start.wait(120)  # type: ignore[attr-defined]  # both processes start their rounds together
    for round_no in range(ROUNDS):
        # Each round claims one row ok (its own: no later round heals a lost update) and
        # every other row failed, the way an attempt that raced a better one would.
        ok = {round_no * 2 + who} if round_no % 3 else set()
        ledger.commit(0, _rows(shard, ok, f"p{who}-r{round_no}"), shard["row_id"])
        claimed |= ok
    out.put(sorted(claimed))  # type: ignore[attr-defined]


@pytest.mark.parametrize("store", ["local", pytest.param("s3", marks=pytest.mark.integration)])
def test_concurrent_commits_of_one_shard_merge(store: str, tmp_path: object,
                                               request: pytest.FixtureRequest) -> None:
    if store == "s3":
        root = request.getfixturevalue("s3_bucket") + "/data"
        endpoint = request.getfixturevalue("moto_server")
    else:
        root, endpoint = f"{tmp_path}/data", None
    storage = Storage(StorageConfig(endpoint_url=endpoint))
    ledger = make_job(root, {f"{i}.jpg": b"x" for i in range(ROWS)}, storage,
                      shard_size=ROWS)
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_committer, args=(ledger.job_root, endpoint, who, start, out))
             for who in (0, 1)]
    for proc in procs:
        proc.start()
    claimed = set(out.get(timeout=300)) | set(out.get(timeout=300))
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    final = ledger.read_result(0)
    assert sorted(final["row_id"].to_pylist()) == list(range(ROWS))
    ok = {r["row_id"] for r in final.to_pylist() if r["status"] == "ok"}
    assert claimed and ok == claimed  # every ok ever committed survived, nothing else is ok


def test_lease_takeover_is_a_compare_and_swap(storage: Storage, root: str) -> None:
    ledger = make_job(root, {"a.jpg": b"x"}, storage)
    dead = Ledger.open(storage, ledger.job_root)
    dead.acquire_lease(0.01)  # a driver that died: its lease expires at once
    time.sleep(0.05)
    first, second = (Ledger.open(storage, ledger.job_root) for _ in range(2))
    # Both takers read the same expired version; the one that writes second must lose
    # instead of replacing the first taker's fresh lease.
    expired = second.lease.read_tagged()
    first.acquire_lease(60)
    reads = iter([expired])  # second's first read happened before first's takeover
    original = second.lease.read_tagged
    second.lease.read_tagged = lambda: next(reads, None) or original()  # type: ignore
    with pytest.raises(ConfigError, match="at the same time"):
        second.acquire_lease(60)
    assert storage.exists(join(ledger.job_root, "lease.json"))
    assert Ledger.open(storage, ledger.job_root).read_lease().holder == first.holder
    # The dead driver, back to life, cannot renew over its successor either.
    with pytest.raises(ConfigError, match="lost the lease"):
        dead.renew_lease(60)
