"""Planning a manifest of several Parquet files as Ray tasks, one per file, with the very
ledger one process would write: the same row ids, verdicts and shards.

``plan_tasks`` (the job's setting) turns it on for a dataset source (``…/*.parquet``) of two or
more files. Three rounds of tasks, at most ``plan_tasks`` at once:

1. *digests*: each task plans its file's rows provisionally (``RowPlanner.provisional``, row
   ids from the file's offset, summed from the Parquet footers the driver reads first) and
   returns the digests of the inputs and outputs that are checked; the driver adds them to its
   ``DigestIndex`` (fixed memory, spilled to local disk) and finds the candidates;
2. *keys*: for candidates only (usually none), the files holding them return their keys,
   and the driver confirms them (``dedup.find_duplicates``: inputs first, then outputs);
3. *shards*: each task plans its file again, applies the duplicates in its rows
   (``RowPlanner.finish``) and writes every shard that lies wholly inside its rows; the rows of
   a shard that straddles two files come back to the driver, which writes that shard.

Planning a file twice costs CPU on the cluster but no local disk on any node (a task's spool
would not outlive it on a cluster) and no shared scratch objects.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from deblur.config import JobConfig
from deblur.errors import ManifestError
from deblur.io.storage import Storage, as_folder
from deblur.job.dedup import DigestIndex, digest64, find_duplicates
from deblur.job.manifest import (
    OUTSIDE_CHECK_ROWS,
    SHARD_SCHEMA,
    PlanCounts,
    RowPlanner,
    _parse,
    _recorded_base,
    is_dataset,
    open_file,
    planner_options,
    source_files,
    source_prefix,
)

WriteShard = Callable[[Storage, int, pa.Table], None]
"""``write(storage, shard_id, table)``: how the ledger stores one shard file."""


def parallel_files(config: JobConfig, storage: Storage) -> list[str] | None:
    """The files to plan as tasks, or None when the job plans in one process."""
    source = config.source
    if config.plan_tasks < 1 or not is_dataset(source) or not source.lower().endswith(
            ".parquet"):
        return None
    files = source_files(source, storage)
    return files if len(files) > 1 else None


def plan_in_tasks(config: JobConfig, storage: Storage, files: list[str],
                  write: WriteShard) -> PlanCounts:
    """Plan ``files`` (a Parquet dataset, in name order) as Ray tasks; returns the counts."""
    import ray

    from deblur.cluster import start_ray

    base, literal, rows = _layout(config, storage, files)
    offsets = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
    options = dict(base=base, destination=config.destination, codec_config=config.codec,
                   literal=literal, **planner_options(config.source, config.destination,
                                                      config))
    _check_first_rows(storage, options, files, int(offsets[-1]))
    start_ray(config)
    task = ray.remote(num_cpus=1, max_retries=2)(_task)
    files_rows = [(f, int(offsets[i]), int(rows[i])) for i, f in enumerate(files) if rows[i]]

    def run(kind: str, args: list[tuple[Any, ...]]) -> Iterator[Any]:
        """Results in order, no more than ``plan_tasks`` tasks in flight."""
        pending: list[Any] = []
        for arg in args:
            pending.append(task.remote(kind, config.storage, options, *arg))
            if len(pending) >= config.plan_tasks:
                yield ray.get(pending.pop(0))
        for ref in pending:
            yield ray.get(ref)

    with tempfile.TemporaryDirectory(prefix="deblur-plan-") as work:
        inputs, outputs = DigestIndex(work, "inputs"), DigestIndex(work, "outputs")
        for in_d, in_r, out_d, out_r in run("digests", files_rows):
            inputs.add(in_d, in_r)
            outputs.add(out_d, out_r)

        def keys_of(column: str) -> Callable[[np.ndarray], tuple[np.ndarray, pa.Array]]:
            def read(wanted: np.ndarray) -> tuple[np.ndarray, pa.Array]:
                args = []
                for uri, first, n in files_rows:
                    mine = wanted[slice(*np.searchsorted(wanted, [first, first + n]))]
                    if len(mine):
                        args.append((uri, first, n, mine, column))
                got = list(run("keys", args))
                if not got:
                    return np.empty(0, np.int64), pa.array([], pa.string())
                return (np.concatenate([g[0] for g in got]),
                        pa.concat_arrays([g[1] for g in got]))
            return read

        duplicates = find_duplicates(inputs, keys_of("key"))
        collisions = find_duplicates(outputs, keys_of("out_rel"), exclude=duplicates)

    counts = PlanCounts(rows=int(offsets[-1]))
    pieces: dict[int, list[pa.Table]] = {}
    for invalid, straddling in run("shards", [
            (uri, first, n, _within(duplicates, first, n), _within(collisions, first, n),
             config.shard_size, write) for uri, first, n in files_rows]):
        for reason, count in invalid.items():
            counts.invalid[reason] = counts.invalid.get(reason, 0) + count
        for shard, table in straddling:
            pieces.setdefault(shard, []).append(table)
    for shard, tables in sorted(pieces.items()):  # in file order within each shard
        write(storage, shard, pa.concat_tables(tables))
    counts.shards = -(-counts.rows // config.shard_size)
    return counts


def _check_first_rows(storage: Storage, options: dict[str, Any], files: list[str],
                      total: int) -> None:
    """Plan the dataset's first OUTSIDE_CHECK_ROWS rows here, before Ray starts: a manifest
    whose rows all lie outside the allowed prefixes is refused as one process would refuse
    it (``RowPlanner.check_outside``), not from inside a task."""
    planner = RowPlanner(**options)
    for uri in files:
        for batch in _parse(uri, open_file(storage, uri)):
            planner.provisional(batch.slice(0, OUTSIDE_CHECK_ROWS - planner.counts.rows))
            if planner.counts.rows >= OUTSIDE_CHECK_ROWS:
                return
    planner.check_outside(total)


def _within(rows: np.ndarray, first: int, n: int) -> np.ndarray:
    return rows[slice(*np.searchsorted(rows, [first, first + n]))]


def _layout(config: JobConfig, storage: Storage, files: list[str]
            ) -> tuple[str, bool, list[int]]:
    """(base, literal, rows per file) from the files' footers, as ``_read_source`` decides
    base and literal from the first file and refuses files that disagree."""
    rows: list[int] = []
    recorded: str | None = None
    for i, uri in enumerate(files):
        stream = open_file(storage, uri)
        found = _recorded_base(uri, stream)
        if i == 0:
            recorded = found
        elif found != recorded:
            raise ManifestError(f"manifest files of {config.source} disagree: {uri} records "
                                f"listed prefix {found!r}, {files[0]} {recorded!r}; one "
                                f"dataset holds one listing")
        rows.append(pq.ParquetFile(stream, pre_buffer=False).metadata.num_rows)
    base = as_folder(recorded) if recorded is not None else source_prefix(config.source)
    return base, recorded is not None, rows


def _provisional(storage: Storage, options: dict[str, Any], uri: str, first: int
                 ) -> tuple[RowPlanner, Iterator[pa.RecordBatch]]:
    planner = RowPlanner(**options)
    planner.counts.rows = first  # row ids continue from the files before this one

    def batches() -> Iterator[pa.RecordBatch]:
        for batch in _parse(uri, open_file(storage, uri)):
            yield planner.provisional(batch)
    return planner, batches()


def _task(kind: str, storage_config: Any, options: dict[str, Any], uri: str, first: int,
          n: int, *args: Any) -> Any:
    """One file's part of a round (see the module doc); runs in a Ray worker."""
    storage = Storage(storage_config)
    planner, batches = _provisional(storage, options, uri, first)
    if kind == "digests":
        parts: list[tuple[np.ndarray, ...]] = []
        for batch in batches:
            ids = batch.column("row_id").to_numpy()
            out = []
            for column, keys in (("orig", "key"), ("out_rel", "out_rel")):
                checked = batch.column(column).is_valid().to_numpy(zero_copy_only=False)
                out += [digest64(batch.column(keys).filter(pa.array(checked))), ids[checked]]
            parts.append(tuple(out))
        _check_rows(uri, planner, first, n)
        return tuple(np.concatenate([p[i] for p in parts]) if parts else
                     np.empty(0, np.uint64 if i % 2 == 0 else np.int64) for i in range(4))
    if kind == "keys":
        wanted, column = args
        got_rows, got = [], []
        for batch in batches:
            lo = batch.column("row_id")[0].as_py() if batch.num_rows else 0
            mine = wanted[slice(*np.searchsorted(wanted, [lo, lo + batch.num_rows]))]
            if len(mine):
                got_rows.append(mine)
                got.append(batch.column(column).take(pa.array(mine - lo)))
        return np.concatenate(got_rows), pa.concat_arrays(got)
    duplicates, collisions, shard_size, write = args
    straddling: list[tuple[int, pa.Table]] = []
    pending: list[pa.RecordBatch] = []
    shard = first // shard_size
    for batch in batches:
        batch = planner.finish(batch, duplicates, collisions)
        while batch.num_rows:
            start = batch.column("row_id")[0].as_py()
            shard = start // shard_size
            take = min(batch.num_rows, (shard + 1) * shard_size - start)
            pending.append(batch.slice(0, take))
            batch = batch.slice(take)
            if start + take == (shard + 1) * shard_size:  # the shard's last row
                _emit(storage, write, shard, pending, first, shard_size, straddling)
                pending = []
    if pending:
        _emit(storage, write, shard, pending, first, shard_size, straddling)
    return dict(planner.counts.invalid), straddling


def _emit(storage: Storage, write: WriteShard, shard: int, pending: list[pa.RecordBatch],
          first: int, shard_size: int, straddling: list[tuple[int, pa.Table]]) -> None:
    """Write a shard this file holds whole; hand one it shares with a neighbour back."""
    table = pa.Table.from_batches(pending, schema=SHARD_SCHEMA)
    whole = (shard * shard_size >= first and table.num_rows == shard_size)
    if whole:
        write(storage, shard, table)
    else:
        straddling.append((shard, table))


def _check_rows(uri: str, planner: RowPlanner, first: int, n: int) -> None:
    if planner.counts.rows - first != n:
        raise ManifestError(f"manifest file {uri} holds {planner.counts.rows - first} rows "
                            f"but its footer says {n}; it changed while planning")
