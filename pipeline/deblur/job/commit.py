"""Writing a shard's result: conditionally, merged with what is there, never losing a row.

A shard is done iff its result object exists. A result is written whole (S3 put, or a local
rename) and only after every output of the shard was uploaded, with a conditional write: the
first with put-if-absent, a merge with put-if-match on the version it merged with, so a stale
writer never overwrites a newer result; a writer that loses re-reads, merges again and
retries. The merge (``merge_results``) keeps every ok row as it was, replaces the rest, and
``commit_result`` asserts that every row of the shard appears exactly once.

The ledger (``Ledger.commit``) names the object; this module only knows how to write it.
"""

from __future__ import annotations

import logging
import random
import time

import pyarrow as pa
import pyarrow.compute as pc

from deblur.errors import AlreadyExistsError, ConflictError, NotFoundError
from deblur.io.storage import Storage
from deblur.job.results import (RESULT_SCHEMA, ShardSummary, parquet_bytes, read_parquet,
                                summarise)

log = logging.getLogger("deblur.job.commit")

COMMIT_ROUNDS = 50
"""Conditional commits of one shard that may lose to concurrent writers before giving up (a
shard has at most a handful: a stale actor, a retry, a second driver)."""


def merge_results(previous: pa.Table | None, results: pa.Table) -> pa.Table:
    """A shard's result after ``results`` lands on ``previous``, sorted by row id.

    An ok row of ``previous`` always stays (a stale or concurrent attempt can never turn it
    into a failure, nor rewrite it); every other row comes from ``results`` when it has one,
    else stays as it was.
    """
    if previous is None:
        return results.sort_by("row_id")
    ok_before = previous.filter(pc.equal(previous["status"], "ok"))
    fresh = results.filter(pc.invert(pc.is_in(results["row_id"],
                                              value_set=ok_before["row_id"])))
    others = previous.filter(pc.and_(
        pc.invert(pc.equal(previous["status"], "ok")),
        pc.invert(pc.is_in(previous["row_id"], value_set=fresh["row_id"]))))
    return pa.concat_tables([ok_before, fresh, others]).sort_by("row_id")


def read_result_tagged(storage: Storage, uri: str) -> tuple[pa.Table | None, str | None]:
    """A result object and its version tag (ETag / mtime+size), or (None, None)."""
    try:
        data, tag = storage.get_tagged(uri)
    except NotFoundError:
        return None, None
    return read_parquet(data, RESULT_SCHEMA), tag


def commit_result(storage: Storage, uri: str, shard_id: int, results: pa.Table,
                  planned_ids: pa.Array) -> ShardSummary:
    """Write shard ``shard_id``'s result to ``uri``: previous ok rows kept, the rest replaced
    by ``results`` (a ``RESULT_SCHEMA`` table), as a compare-and-swap on the version merged
    with. Returns the shard's index row.

    Raises AssertionError (a bug, never an input problem) unless every row of
    ``planned_ids`` appears exactly once; ConflictError after ``COMMIT_ROUNDS`` lost races.
    """
    expected = sorted(planned_ids.to_pylist())
    for round_no in range(COMMIT_ROUNDS):
        # Re-read on every round: another attempt (a stale actor, a second driver) may
        # have committed since, and its ok rows must survive this write.
        previous, previous_tag = read_result_tagged(storage, uri)
        merged = merge_results(previous, results)
        got = sorted(merged["row_id"].to_pylist())
        if got != expected:
            missing = sorted(set(expected) - set(got))[:5]
            extra = len(got) - len(set(got))
            raise AssertionError(f"shard {shard_id} result would lose rows {missing} or "
                                 f"repeat {extra}; refusing to commit")
        data = parquet_bytes(merged)
        try:
            if previous is None:
                tag = storage.put_if_absent(uri, data)
            else:
                tag = storage.put_if_match(uri, data, previous_tag or "")
        except (AlreadyExistsError, ConflictError):
            # Lost the race to another writer: merge again from what it wrote.
            log.info("shard %d: result changed while committing (round %d); merging "
                     "again", shard_id, round_no + 1)
            time.sleep(random.uniform(0, 0.05 * (round_no + 1)))
            continue
        return summarise(shard_id, merged, tag)
    raise ConflictError(f"shard {shard_id}: {COMMIT_ROUNDS} commits in a row lost to "
                        f"concurrent writers of {uri}", uri)
