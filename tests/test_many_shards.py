"""A job of more than 99,999 shards: names past five digits read back whole.

Shard files are named with five digits (``00042.parquet``) and longer ones past 99,999
(``100000.parquet``); reading only the first five characters made shard 100000 shard 10000, so
status, resume and the index went wrong. The ledger here has 100,001 shard files, written
directly (planning 100,001 shards through the manifest would take minutes).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pyarrow as pa

from deblur.io.storage import Storage
from deblur.job.ledger import Ledger, _shard_name, _shard_of
from deblur.job.results import RESULT_SCHEMA, parquet_bytes
from deblur.job.manifest import SHARD_SCHEMA
from tests.conftest import job_config

SHARDS = 100_001


def _shard(shard_id: int) -> pa.Table:
    return pa.Table.from_pylist([{"row_id": shard_id, "key": f"/in/{shard_id}.jpg",
                                  "output_key": f"/out/{shard_id}.jpg"}], schema=SHARD_SCHEMA)


def test_names_past_five_digits_read_back_whole() -> None:
    assert [_shard_name(n) for n in (42, 99_999, 100_000, 123_456)] == [
        "00042.parquet", "99999.parquet", "100000.parquet", "123456.parquet"]
    assert [_shard_of(n) for n in ("00042.parquet", "results/123456.parquet",
                                   "100000.parquet")] == [42, 123_456, 100_000]
    assert _shard_of("index.parquet") is None and _shard_of("1x.parquet") is None


def test_a_ledger_of_100001_shards(tmp_path: Path) -> None:
    root = tmp_path / "job"
    (root / "shards").mkdir(parents=True)
    template = parquet_bytes(_shard(0))
    touched = (9_999, 10_000, 12_345, 99_999, 100_000)
    for shard_id in range(SHARDS):
        data = parquet_bytes(_shard(shard_id)) if shard_id in touched else template
        (root / "shards" / _shard_name(shard_id)).write_bytes(data)
    config = job_config(str(tmp_path / "in"), str(tmp_path / "out"), str(root))
    (root / "job.json").write_text(json.dumps({
        "job_id": "many", "created_at": time.time(), "source": config.source,
        "destination": config.destination, "rows": SHARDS, "shards": SHARDS,
        "config": config.to_dict()}))
    assert len(os.listdir(root / "shards")) == SHARDS

    ledger = Ledger.open(Storage(), str(root))
    done = (10_000, 99_999, 100_000)  # 100000 read as its first five digits would be 10000
    for shard_id in done:
        row = ledger.read_shard(shard_id).to_pylist()[0]
        ledger.commit(shard_id, pa.Table.from_pylist(
            [{**row, "status": "ok", "finished_at": time.time()}], schema=RESULT_SCHEMA))
    assert (root / "results" / "100000.parquet").exists()
    assert ledger.done_shards() == set(done)
    assert set(ledger.index()) == set(done)
    status = ledger.status()
    assert (status.shards_done, status.ok, status.pending) == (3, 3, SHARDS - 3)
    selection = ledger.rerun_selection()
    assert len(selection) == SHARDS - 3 and 100_000 not in selection
    assert 12_345 in selection and selection[-1] == 99_998 and 10_000 not in selection
    # A result names its own shard's rows: 100000's row id is 100000, not 10000's.
    assert ledger.read_result(100_000)["row_id"].to_pylist() == [100_000]
    ledger.write_index(ledger.index().values())
    assert set(Ledger.open(Storage(), str(root)).index()) == set(done)
