"""`deblur report` and the QA sample read results one shard at a time and keep a bounded
sample and fixed-bin histograms: what they keep does not grow with the rows, and reading a job
in many shards gives what reading it whole would."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa

from deblur.job.results import result_table
from deblur.observe.qa import QASample
from deblur.observe.report import Histogram


def _results(first: int, n: int, rng: random.Random) -> pa.Table:
    ids = list(range(first, first + n))
    rows = pa.table({"row_id": pa.array(ids, pa.int64()),
                     "key": [f"s3://in/{i}.jpg" for i in ids],
                     "output_key": [f"s3://out/{i}.jpg" for i in ids]})
    failed = [rng.random() < 0.1 for _ in ids]
    return result_table(
        rows, attempt=1, worker="w",
        status=pa.array(["failed" if f else "ok" for f in failed]),
        reason=pa.array([rng.choice(["corrupt", "too_large"]) if f else None for f in failed]),
        width=pa.array([rng.randrange(100, 4000) for _ in ids], pa.int32()),
        height=pa.array([rng.randrange(100, 3000) for _ in ids], pa.int32()),
        sharpness_ratio=pa.array([rng.uniform(0.5, 3.0) for _ in ids], pa.float32()))


def _held(sample: QASample) -> int:
    return sum(len(heap) for heap in sample._heaps.values())


def test_the_qa_sample_is_bounded_and_the_same_in_any_shard_split() -> None:
    rng = random.Random(3)
    tables = [_results(i * 1000, 1000, rng) for i in range(40)]
    streamed = QASample(per_group=4, seed=11)
    for table in tables:
        streamed.add(table)
        # groups: lowest_gain, largest, random and one per failure reason
        assert _held(streamed) <= 4 * 5
    whole = QASample(per_group=4, seed=11)
    whole.add(pa.concat_tables(tables))
    assert streamed.picks() == whole.picks()
    assert {p["why"] for p in streamed.picks()} == {
        "lowest_gain", "largest", "random", "failed:corrupt", "failed:too_large"}


def test_histograms_add_up_chunk_by_chunk() -> None:
    values = np.random.default_rng(5).normal(1.5, 1.0, 100_000)
    values[::97] = np.nan
    whole, chunked = Histogram(0.0, 4.0), Histogram(0.0, 4.0)
    whole.add(values)
    for chunk in np.array_split(values, 37):
        chunked.add(chunk)
    assert chunked.counts.tolist() == whole.counts.tolist()
    assert chunked.n == whole.n and abs(chunked.total - whole.total) < 1e-6 * abs(whole.total)
    assert chunked.counts.nbytes == whole.counts.nbytes == 32 * 8  # fixed bins, whatever n
