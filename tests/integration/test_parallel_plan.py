"""A manifest of several Parquet files planned as Ray tasks (``plan_tasks``) writes the very
ledger one process writes: the same row ids, verdicts, counts and shards, shard by shard, with
shards that straddle two or three files and duplicates and collisions across files."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from deblur.io.storage import Storage, join
from deblur.job.ledger import Ledger
from deblur.job.parallel import parallel_files
from tests.conftest import job_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FILES = {  # rows per file: shards of 5 straddle files; one file is empty, one tiny
    "part-0.parquet": [f"a/{i}.jpg" for i in range(7)],
    "part-1.parquet": [],
    "part-2.parquet": ["b/0.jpg", "a/3.jpg", "c//1.jpg", "../up.jpg", "", "b/0.jpg"]
                      + [f"c/{i}.png" for i in range(7)],
    "part-3.parquet": ["c/1.jpg", "x\x01.jpg"],  # c/1.jpg: collides with c//1.jpg
    "part-4.parquet": [f"d/{i}.webp" for i in range(20)] + ["a/0.jpg", "_deblur/j.jpg"],
}


def test_planning_in_ray_tasks_writes_the_same_ledger(tmp_path: Path) -> None:
    import ray

    folder = tmp_path / "manifests"
    folder.mkdir()
    for name, keys in FILES.items():
        pq.write_table(pa.table({"key": pa.array(keys, pa.string())}), folder / name,
                       row_group_size=4)
    source, dest = f"{folder}/part-*.parquet", str(tmp_path / "out")
    storage = Storage()
    ledgers = {}
    try:
        for tasks in (0, 3):
            job = job_config(source, dest, str(tmp_path / f"job-{tasks}"), shard_size=5,
                             plan_tasks=tasks)
            assert (parallel_files(job, storage) is None) == (tasks == 0)
            ledgers[tasks] = Ledger.create(storage, job, job_id=f"j{tasks}", model_info={})
        assert ray.is_initialized()  # the tasks really ran on Ray
    finally:
        ray.shutdown()

    one, tasks = ledgers[0], ledgers[3]
    rows = sum(len(k) for k in FILES.values())
    assert one.job()["rows"] == tasks.job()["rows"] == rows
    assert one.job()["shards"] == tasks.job()["shards"] == -(-rows // 5)
    assert one.job()["plan"] == tasks.job()["plan"]
    assert set(one.job()["plan"]["invalid"]) == {
        "duplicate_key", "output_collision", "invalid_key", "reserved_output"}
    for shard in one.shard_ids():
        assert one.read_shard(shard).to_pylist() == tasks.read_shard(shard).to_pylist(), shard
    planned = [r for s in one.shard_ids() for r in one.read_shard(s).to_pylist()]
    assert [r["row_id"] for r in planned] == list(range(rows))
    assert storage.exists(join(tasks.job_root, "job.json"))
