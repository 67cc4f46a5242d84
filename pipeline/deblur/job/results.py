"""What a result row is, and the index row that summarises a shard's results.

``result_row`` (``result_table`` for whole columns) is the only constructor of a result row:
every column of ``RESULT_SCHEMA`` present, unset ones None. ``summarise`` turns a shard's
result table into its index row (``ShardSummary``: counts, failure reasons, finish times,
quality sums), which status, rerun and the summary read instead of the results themselves.
Where these live in storage is the ledger's business (``job/ledger.py``).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

RESULT_SCHEMA = pa.schema([
    pa.field("row_id", pa.int64(), nullable=False),
    pa.field("key", pa.string()),
    pa.field("output_key", pa.string()),
    pa.field("status", pa.string()),  # ok | failed
    pa.field("reason", pa.string()),  # short class for grouping (failed rows)
    pa.field("error", pa.string()),  # one line naming the image and the problem
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("bytes_in", pa.int64()),
    pa.field("bytes_out", pa.int64()),
    pa.field("fetch_ms", pa.float32()),
    pa.field("decode_ms", pa.float32()),
    pa.field("infer_ms", pa.float32()),
    pa.field("encode_ms", pa.float32()),
    pa.field("upload_ms", pa.float32()),
    pa.field("attempt", pa.int32()),
    pa.field("worker", pa.string()),
    pa.field("sharpness_in", pa.float32()),
    pa.field("sharpness_out", pa.float32()),
    pa.field("sharpness_ratio", pa.float32()),
    pa.field("tenengrad_in", pa.float32()),
    pa.field("tenengrad_out", pa.float32()),
    pa.field("psnr", pa.float32()),  # the output against its reference (evaluation jobs)
    pa.field("ssim", pa.float32()),
    pa.field("psnr_in", pa.float32()),  # the input against it: the gain is psnr - psnr_in
    pa.field("ssim_in", pa.float32()),
    pa.field("finished_at", pa.float64()),
    # scene jobs (--model deblurgs): the re-blurred render against the input, and the scene's
    # fit on each of its views' rows
    pa.field("fit_psnr", pa.float32()),
    pa.field("scene_steps", pa.int32()),
    pa.field("scene_seconds", pa.float32()),
    pa.field("scene_gaussians", pa.int64()),
])

def result_row(row: dict[str, Any], *, attempt: int, worker: str,
               **fields: Any) -> dict[str, Any]:
    """A result row for the planned shard row ``row``: every column present, unset ones None."""
    result = dict.fromkeys(RESULT_SCHEMA.names)
    result.update(row_id=row["row_id"], key=row["key"], output_key=row["output_key"],
                  attempt=attempt, worker=worker, **fields)
    return result


def result_table(rows: pa.Table, *, attempt: int, worker: str,
                 **columns: pa.Array) -> pa.Table:
    """``result_row`` for a whole table of planned rows at once, column by column.

    For callers that fill every row the same way (the scale simulation): building a thousand
    dicts per shard would cost more than the ledger I/O being measured.
    """
    n = rows.num_rows
    data = {name: pa.nulls(n, RESULT_SCHEMA.field(name).type) for name in RESULT_SCHEMA.names}
    data.update(row_id=rows["row_id"], key=rows["key"], output_key=rows["output_key"],
                attempt=pa.array([attempt] * n, pa.int32()),
                worker=pa.array([worker] * n, pa.string()), **columns)
    return pa.table(data, schema=RESULT_SCHEMA)


PERMANENT_REASONS = frozenset({"invalid_key", "duplicate_key", "output_collision",
                               "reserved_output"})
"""Failures a rerun cannot fix: they come from the manifest itself."""

QUALITY_FIGURES = ("psnr", "ssim", "psnr_in", "ssim_in", "sharpness_ratio")
"""Quality figures whose sums over ok rows the index keeps (means in the summary)."""

INDEX_SCHEMA = pa.schema([
    pa.field("shard", pa.int64(), nullable=False),
    pa.field("rows", pa.int64()),
    pa.field("ok", pa.int64()),
    pa.field("failed", pa.int64()),
    pa.field("rerunnable", pa.bool_()),  # has failed rows a rerun could fix
    pa.field("reasons", pa.string()),  # JSON {"reason": count}
    pa.field("first_finished", pa.float64()),
    pa.field("last_finished", pa.float64()),
    pa.field("tag", pa.string()),  # version of the result object summarised
    pa.field("quality", pa.string()),  # JSON {"psnr": [sum, count], …} over ok rows
])


@dataclass(frozen=True, slots=True)
class ShardSummary:
    """One index row. Text fields stay JSON so a 100k-shard index is small in the driver."""

    shard: int
    rows: int
    ok: int
    failed: int
    rerunnable: bool
    reasons: str
    first_finished: float | None
    last_finished: float | None
    tag: str | None
    quality: str

    def reason_counts(self) -> dict[str, int]:
        return json.loads(self.reasons) if self.reasons else {}


def summarise(shard_id: int, table: pa.Table, tag: str | None) -> ShardSummary:
    """The index row for one shard's result table."""
    status = table["status"]
    ok = int(pc.sum(pc.equal(status, "ok")).as_py() or 0)
    failed_rows = table.filter(pc.equal(status, "failed"))
    reasons: dict[str, int] = {}
    for reason in failed_rows["reason"].to_pylist():
        reasons[reason or "unknown"] = reasons.get(reason or "unknown", 0) + 1
    ok_rows = table.filter(pc.equal(status, "ok"))
    quality = {}
    for name in QUALITY_FIGURES:
        values = pc.drop_null(ok_rows[name])
        values = values.filter(pc.is_finite(values)) if len(values) else values
        if len(values):
            quality[name] = [float(pc.sum(values).as_py()), len(values)]
    finished = table["finished_at"]
    return ShardSummary(
        shard=shard_id, rows=table.num_rows, ok=ok, failed=table.num_rows - ok,
        rerunnable=bool(set(reasons) - PERMANENT_REASONS),
        reasons=json.dumps(reasons, sort_keys=True) if reasons else "",
        first_finished=pc.min(finished).as_py(), last_finished=pc.max(finished).as_py(),
        tag=tag, quality=json.dumps(quality, sort_keys=True) if quality else "")


def quality_means(summaries: Iterable[ShardSummary]) -> dict[str, float]:
    """Means over ok rows of the whole job (summary.json, `deblur status`), from the index."""
    totals: dict[str, list[float]] = {}
    for summary in summaries:
        for name, (total, count) in (json.loads(summary.quality) if summary.quality
                                     else {}).items():
            acc = totals.setdefault(name, [0.0, 0])
            acc[0] += total
            acc[1] += count
    out: dict[str, float] = {}
    for name in QUALITY_FIGURES:
        if name in totals and totals[name][1]:
            out[f"mean_{name}"] = totals[name][0] / totals[name][1]
            out[f"{name}_count"] = int(totals[name][1])
    for name in ("psnr", "ssim"):  # evaluation jobs: did deblurring help (after - before)
        if f"mean_{name}" in out and f"mean_{name}_in" in out:
            out[f"{name}_gain"] = out[f"mean_{name}"] - out[f"mean_{name}_in"]
    return out


def parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


def read_parquet(data: bytes, schema: pa.Schema) -> pa.Table:
    """A Parquet object written by ``parquet_bytes`` (a shard, a result, the index), as
    ``schema``: a column the file lacks (written before the column existed) reads as nulls.

    Read by Parquet's own reader on this thread. ``pq.read_table`` goes through Arrow's
    dataset scanner, which starts Arrow's IO thread pool even with ``use_threads=False``; a
    pool thread still alive when the interpreter exits aborts the process ("terminate called
    without an active exception", apache/arrow#34314): `deblur status` exited -6 after its
    output in about 1 run in 6 on a loaded 2-core machine. These objects are small."""
    table = pq.ParquetFile(pa.BufferReader(data), pre_buffer=False).read(use_threads=False)
    present = set(table.column_names)
    return pa.Table.from_arrays(
        [table.column(f.name).cast(f.type) if f.name in present else pa.nulls(len(table), f.type)
         for f in schema], schema=schema)
