"""The job's state, kept only in storage, so any process (driver, worker, `deblur status`, a
restarted driver on another machine) sees the same truth.

    <job_root>/claim.json             who planned here (job_id, host, pid, time); written first
    <job_root>/lease.json             the live driver: holder, expiry (renewed every ttl/3)
    <job_root>/job.json               config, source, model + weights digest, row/shard counts
    <job_root>/shards/00000.parquet   planned rows: row_id, key, output_key, reference, error
    <job_root>/results/00000.parquet  one row per shard row: ok, or failed with a reason
    <job_root>/index.parquet          one summary row per done shard (the driver keeps it)
    <job_root>/attempts/00000.json    failed attempts of a shard (only shards that failed)
    <job_root>/cancel                 present while a cancel is requested
    <job_root>/summary.json           totals when a run ends
    <job_root>/metrics/<ms>.json      metric snapshots while a run goes on
    <job_root>/qa/                    before/after thumbnails of the QA sample, index.json
    <job_root>/report.html            the human report (`deblur report`)

This module is the only code that knows these names, and ``result_row`` (``result_table``
for whole columns) is the only constructor of a result row.

claim.json is created first when planning (put-if-absent): of two drivers planning into one
job root, the one that loses the claim writes nothing. job.json is written last (also
put-if-absent), so its existence means "planned".

lease.json says a driver is working on the job: holder id and expiry (now + ttl), renewed
every ttl/3 and deleted when the run ends. Resume and rerun refuse a live lease held by
another driver and take over an expired one (a killed driver). Takeovers and renewals are a
compare-and-swap on the version read (``Storage.put_if_match``): of two takers exactly one
wins, and a driver presumed dead cannot renew over its successor's lease.

A shard is done iff its result object exists. A result is written whole (S3 put, or a local
rename) and only after every output of the shard was uploaded, with a conditional write: the
first with put-if-absent, a merge with put-if-match on the version it merged with, so a
stale writer never overwrites a newer result; a writer that loses re-reads, merges again and
retries. The merge (``merge_results``) keeps every ok row as it was, replaces the rest, and
asserts that every row of the shard appears exactly once.

The index makes status and rerun cost O(shards), not O(images): each row holds a shard's
counts, failure reasons, finish times, quality sums and the version tag (ETag / mtime+size) of
the result it summarises. Readers trust a row only while the listed result still has that tag,
and summarise the few results written since (a driver that died before its last index write);
the index is a cache of the results, never a second source of truth.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import random
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from deblur import __version__
from deblur.config import JobConfig, from_dict
from deblur.errors import (
    AlreadyExistsError,
    ConfigError,
    ConflictError,
    ManifestError,
    NotFoundError,
    StorageError,
    StoreUnavailableError,
    ThrottledError,
)
from deblur.job.manifest import SHARD_SCHEMA, PlanCounts, iter_shards, plan_rows
from deblur.io import codec
from deblur.io.storage import Storage, as_folder, join

log = logging.getLogger("deblur.job.ledger")

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
    pa.field("psnr", pa.float32()),
    pa.field("ssim", pa.float32()),
    pa.field("finished_at", pa.float64()),
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

UPLOAD_THREADS = 16
_EXPLICIT_STORAGE = {"endpoint_url": ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
                     "region": ("AWS_REGION", "AWS_DEFAULT_REGION")}
"""Environment variables that name a storage setting explicitly (over the recorded one).
Retry mode and attempts have none: the client always takes them from the config."""
COMMIT_ROUNDS = 50
"""Conditional commits of one shard that may lose to concurrent writers before giving up (a
shard has at most a handful: a stale actor, a retry, a second driver)."""
INDEX_NAME = "index.parquet"
JOB_NAME = "job.json"
CLAIM_NAME = "claim.json"
LEASE_NAME = "lease.json"
JOB_AREA = "_deblur"
_JOB_KEYS = ("job_id", "created_at", "source", "destination", "rows", "shards", "config")
QUALITY_FIGURES = ("psnr", "ssim", "sharpness_ratio")

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
    return out


JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_job_id(job_id: str) -> str:
    """Job ids name folders and Ray submissions: keep them to a safe, short alphabet."""
    if not JOB_ID_PATTERN.match(job_id):
        raise ConfigError(f"job id {job_id!r}: use 1-64 letters, digits, '.', '_' or '-', "
                          "starting with a letter or digit")
    return job_id


def new_job_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def default_job_root(destination: str, job_id: str) -> str:
    return join(as_folder(destination) + JOB_AREA, job_id) + "/"


def new_holder() -> str:
    """A driver's lease holder id: host, pid and a random token (unique per driver run)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def _when(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _json_object(data: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(data)
    except ValueError:  # not UTF-8 or not JSON
        return None
    return value if isinstance(value, dict) else None


@dataclass(frozen=True)
class Lease:
    """The content of lease.json: which driver works on the job, and until when."""

    holder: str
    job_id: str
    destination: str
    acquired_at: float
    expires_at: float

    @property
    def live(self) -> bool:
        return self.expires_at > time.time()

    def describe(self) -> str:
        return f"{self.holder} (lease expires {_when(self.expires_at)})"

    def to_json(self) -> bytes:
        return json.dumps({"holder": self.holder, "job_id": self.job_id,
                           "destination": self.destination, "acquired_at": self.acquired_at,
                           "expires_at": self.expires_at}).encode()


class LeaseKeeper:
    """Renews a held lease every ttl/3 on a daemon thread; ``lost`` says another driver took
    it over (this one was presumed dead), and the pool stops dispatching then."""

    def __init__(self, ledger: Ledger, ttl: float) -> None:
        self.ledger, self.ttl = ledger, ttl
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lease", daemon=True)

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.ledger.renew_lease(self.ttl)
            except ConfigError as exc:
                self.lost = str(exc)
                log.error("%s", exc)
                return
            except Exception as exc:  # noqa: BLE001 - a storage hiccup: try again next time
                log.warning("could not renew the job lease: %s", exc)

    def stop(self, release: bool = True) -> None:
        """Stop renewing and release the lease (it stays for its ttl if the delete fails).
        ``release=False`` keeps it for its ttl: planning hands it on to the run that follows."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self.ttl)
        if not release:
            return
        try:
            self.ledger.release_lease()
        except Exception as exc:  # noqa: BLE001 - it expires by itself
            log.warning("could not release the job lease (it expires by itself): %s", exc)


def _shard_name(shard_id: int) -> str:
    # Five digits keep the first 100,000 names in numeric order when listed; more shards
    # get longer names ("123456.parquet"), which _shard_of reads back whole.
    return f"{shard_id:05d}.parquet"


def _shard_of(name: str) -> int | None:
    """The shard number of a shard or result file name (``00042.parquet``, ``123456.parquet``),
    or None for any other name."""
    stem = name.rsplit("/", 1)[-1].removesuffix(".parquet")
    return int(stem) if stem.isdigit() and stem.isascii() else None


def recorded_storage(config: Any) -> dict[str, Any]:
    """The storage settings a job records in job.json: the config's, with the endpoint and
    region the environment supplied filled in, and never a credential (an endpoint's
    ``user:password@`` part is dropped)."""
    from urllib.parse import urlsplit, urlunsplit

    endpoint = config.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get(
        "AWS_ENDPOINT_URL")
    if endpoint:
        parts = urlsplit(endpoint)
        if parts.username or parts.password:
            parts = parts._replace(netloc=parts.netloc.rpartition("@")[2])
        endpoint = urlunsplit(parts)
    region = config.region or os.environ.get("AWS_REGION") or os.environ.get(
        "AWS_DEFAULT_REGION")
    return {"endpoint_url": endpoint or None, "region": region or None,
            "retry_mode": config.retry_mode, "max_attempts": config.max_attempts}


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


def write_shard(job_root: str, storage: Storage, shard_id: int, table: pa.Table) -> None:
    """Store one planned shard (for planning tasks, which hold no Ledger)."""
    storage.put(as_folder(job_root) + "shards/" + _shard_name(shard_id), _parquet_bytes(table))


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    return sink.getvalue()


@dataclass
class JobStatus:
    """Counts from the ledger alone (no Ray needed)."""

    total: int
    ok: int
    failed: int
    pending: int
    shards_done: int
    shards_total: int
    failures_by_reason: dict[str, int] = field(default_factory=dict)
    throughput: float | None = None  # ok images per second between first and last finish
    cancel_requested: bool = False

    @property
    def complete(self) -> bool:
        return self.pending == 0

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "ok": self.ok, "failed": self.failed,
                "pending": self.pending, "shards_done": self.shards_done,
                "shards_total": self.shards_total,
                "failures_by_reason": dict(sorted(self.failures_by_reason.items())),
                "throughput_images_per_s": self.throughput,
                "cancel_requested": self.cancel_requested}


def run_throughput(summary: dict[str, Any] | None) -> float | None:
    """THE throughput `deblur status`, the run's final line and the report show: images (ok
    or failed) per second of wall time while workers ran, for the last run (summary.json's
    ``run``: its images over the seconds from its first ready worker to its end, so Ray and
    model start-up are excluded). None when unknown (no run yet, none got a worker)."""
    run = (summary or {}).get("run") or {}
    images, seconds = run.get("images"), run.get("worker_seconds")
    if images is None or not seconds or seconds <= 0:
        return None
    return float(images) / float(seconds)


class Ledger:
    """Reads and writes one job's state under ``job_root``."""

    def __init__(self, storage: Storage, job_root: str) -> None:
        self.storage = storage
        self.job_root = as_folder(job_root)
        self._job: dict[str, Any] | None = None
        self.index_stale = 0
        self.holder: str | None = None
        """This driver's lease holder id while it holds lease.json (``acquire_lease``)."""

    def _path(self, *parts: str) -> str:
        return self.job_root + "/".join(parts)

    # -- creating and opening -----------------------------------------------------------------

    @classmethod
    def create(cls, storage: Storage, config: JobConfig, job_id: str,
               model_info: dict[str, Any], *, hold_lease: bool = False) -> Ledger:
        """Plan the job: claim the job root, stream the source into shard files, then write
        job.json. ``hold_lease``: also take lease.json right after the claim (a driver does,
        so a concurrent job on the same destination sees this one while it plans)."""
        if not config.job_root:
            raise ConfigError("job_root is not set; call with a planned job root")
        if not config.source or not config.destination:
            raise ConfigError("a job needs a source and a destination: "
                              "deblur run SOURCE DESTINATION")
        ledger = cls(storage, config.job_root)
        if storage.exists(ledger._path(JOB_NAME)):
            raise ConfigError(f"a job already exists at {ledger.job_root}; choose another "
                              f"--job-root or resume it with --resume")
        ttl = config.scheduler.lease_ttl_s
        ledger._claim(job_id, ttl)
        keeper: LeaseKeeper | None = None
        try:
            if hold_lease:
                # Renewed while planning (minutes at 100 M rows): a lease left to expire would
                # let another driver take a job that is still being planned.
                ledger.acquire_lease(ttl, job_id=job_id, destination=config.destination)
                keeper = LeaseKeeper(ledger, ttl).start()
            job = ledger._plan(config, job_id, model_info)
        except BaseException:
            if keeper is not None:
                keeper.stop(release=False)  # deleted below with the claim
            # Planning failed (an empty source, storage down): free the job root again.
            for name in (LEASE_NAME, CLAIM_NAME):
                try:
                    storage.delete(ledger._path(name))
                except Exception as exc:  # noqa: BLE001 - the first error is the one to show
                    log.warning("could not remove %s: %s", ledger._path(name), exc)
            raise
        if keeper is not None:
            keeper.stop(release=False)  # held for a full ttl: the run's keeper renews it
            ledger.acquire_lease(ttl)
        ledger._job = job
        return ledger

    def _claim(self, job_id: str, ttl: float) -> None:
        """Create claim.json (put-if-absent) before anything else is written here.

        A claim of the same job id left by a planning driver that was killed (no job.json,
        and no live lease: the planner renews one while it plans) is taken over with a
        compare-and-swap once it is older than ``ttl``, so a job whose id its deployment fixes
        (the chart's RayJob) can be planned again. Another job's claim is never taken.
        """
        token = secrets.token_hex(8)
        claim = {"job_id": job_id, "host": socket.gethostname(), "pid": os.getpid(),
                 "time": time.time(), "token": token}
        uri = self._path(CLAIM_NAME)
        try:
            self.storage.put_if_absent(uri, json.dumps(claim).encode())
            return
        except AlreadyExistsError:
            pass
        try:
            data, tag = self.storage.get_tagged(uri)
            found = _json_object(data) or {}
        except NotFoundError:  # the winner gave up planning and freed it: still not ours
            found, tag = {}, None
        # A retried conditional PUT can find its own first attempt (the reply was lost).
        if found.get("job_id") == job_id and found.get("token") == token:
            return
        if found.get("job_id") == job_id and tag and self._claim_abandoned(found, ttl):
            log.warning("taking over the claim of %s: its planning driver (host %s, pid %s) "
                        "left no job.json and no live lease", self.job_root,
                        found.get("host"), found.get("pid"))
            try:
                self.storage.put_if_match(uri, json.dumps(claim).encode(), tag)
                return
            except (AlreadyExistsError, ConflictError):
                found = _json_object(self.storage.get(uri)) or {}  # another taker won
        who = (f"job {found.get('job_id')!r} (host {found.get('host')}, pid "
               f"{found.get('pid')}, {_when(float(found.get('time') or 0))})"
               if found else "another driver")
        raise ConfigError(f"job root {self.job_root} is already claimed by {who}; use a "
                          f"different --job-root (or, if that planning died, delete {uri})")

    def _claim_abandoned(self, found: dict[str, Any], ttl: float) -> bool:
        if self.storage.exists(self._path(JOB_NAME)):
            return False
        if time.time() - float(found.get("time") or 0) < ttl:
            return False  # a planner may still be between its claim and its lease
        return self.live_lease() is None

    def _plan(self, config: JobConfig, job_id: str, model_info: dict[str, Any]
              ) -> dict[str, Any]:
        storage = self.storage
        from deblur.job.parallel import parallel_files, plan_in_tasks

        files = parallel_files(config, storage)
        if files:  # several Parquet files and plan_tasks set: Ray tasks write the shards
            counts = plan_in_tasks(config, storage, files,
                                   functools.partial(write_shard, self.job_root))
            shards = counts.shards
        else:
            counts, shards = self._plan_here(config)
        if counts.rows == 0:
            raise ManifestError(f"source {config.source} lists no images: check the prefix "
                                f"(image extensions only) or the manifest's key column")
        job = {"job_id": job_id, "created_at": time.time(), "code_version": __version__,
               "source": config.source, "destination": config.destination,
               "rows": counts.rows, "shards": shards, "plan": counts.to_dict(),
               "model": model_info, "config": config.to_dict(),
               "storage": recorded_storage(config.storage)}
        try:
            storage.put_if_absent(self._path(JOB_NAME),
                                  json.dumps(job, indent=2, default=str).encode())
        except AlreadyExistsError:
            # A retried conditional PUT can find its own first attempt (the reply was lost).
            found = _json_object(storage.get(self._path(JOB_NAME))) or {}
            if found.get("job_id") == job_id:
                return job
            raise ConfigError(f"another driver planned a job at {self.job_root} at the same "
                              f"time; use a different --job-root") from None
        return job

    def _plan_here(self, config: JobConfig) -> tuple[PlanCounts, int]:
        """Plan in this process: (counts, shards written)."""
        storage = self.storage
        batches, planner = plan_rows(config.source, config.destination, storage, config.codec,
                                     job=config)
        shards = 0
        # Shard files upload in parallel (a million rows is a thousand objects on S3), with a
        # bounded number in flight so planning memory stays flat.
        with ThreadPoolExecutor(UPLOAD_THREADS, thread_name_prefix="plan") as pool:
            in_flight: list[Any] = []
            for table in iter_shards(batches, config.shard_size):
                data = _parquet_bytes(table)
                in_flight.append(pool.submit(storage.put, self._path("shards",
                                                                      _shard_name(shards)),
                                             data))
                shards += 1
                if len(in_flight) >= 2 * UPLOAD_THREADS:
                    in_flight.pop(0).result()
            for future in in_flight:
                future.result()
        counts = planner.counts
        counts.shards = shards
        return counts, shards

    @classmethod
    def open(cls, storage: Storage, job_root: str) -> Ledger:
        ledger = cls(storage, job_root)
        ledger.job()
        return ledger

    @classmethod
    def open_recorded(cls, job_root: str) -> Ledger:
        """Open the job with the storage settings its run recorded in job.json (endpoint,
        region, retry mode and attempts; never credentials). The endpoint and region given
        explicitly in the environment (``AWS_ENDPOINT_URL[_S3]``, ``AWS_REGION`` /
        ``AWS_DEFAULT_REGION``) win over the recorded ones.

        job.json itself is read with the environment's settings: an S3 job root on a custom
        endpoint needs ``AWS_ENDPOINT_URL`` to be found at all; everything after (the
        images a report shows, the job root's other objects) uses the recorded ones.
        """
        from dataclasses import fields, replace

        from deblur.config import StorageConfig
        from deblur.io.storage import get_storage

        ledger = cls.open(get_storage(), job_root)
        job = ledger.job()
        # job.json's "storage" has what the run really used (endpoint from its environment
        # too); jobs planned before it was recorded have their config's section only.
        recorded = job.get("storage") or (job.get("config") or {}).get("storage") or {}
        known = {f.name for f in fields(StorageConfig)}
        chosen = {name: value for name, value in recorded.items()
                  if name in known and value is not None
                  and not any(os.environ.get(var) for var in _EXPLICIT_STORAGE.get(name, ()))}
        try:
            config = replace(StorageConfig(), **chosen)
            config.validate()
        except (TypeError, ConfigError) as exc:
            log.warning("ignoring the storage settings recorded in job.json: %s", exc)
            return ledger
        if config != ledger.storage.config:
            ledger.storage = get_storage(config)
        return ledger

    def job(self) -> dict[str, Any]:
        if self._job is None:
            uri = self._path(JOB_NAME)
            try:
                data = self.storage.get(uri)
            except NotFoundError:
                raise ConfigError(f"no job at {self.job_root} (no job.json): check the job "
                                  f"root that `deblur run` printed") from None
            job = _json_object(data)
            if job is None:
                # What it looks like, never its bytes (it may be anything a manifest wrote).
                problem = f"not a JSON object ({len(data)} bytes, {codec.sniff(data[:512])})"
            else:
                missing = [key for key in _JOB_KEYS if key not in job]
                problem = f"missing {', '.join(missing)}" if missing else ""
            if problem:
                raise ConfigError(f"job.json at {uri} is not a deblur job file (corrupt or "
                                  f"overwritten): {problem}; restore it from a backup, or "
                                  f"plan the job again under a new --job-root")
            self._job = job
        return self._job

    def config(self) -> JobConfig:
        return from_dict(self.job()["config"])

    # -- shards and results --------------------------------------------------------------------

    def shard_ids(self) -> list[int]:
        return list(range(int(self.job()["shards"])))

    def read_shard(self, shard_id: int) -> pa.Table:
        data = self.storage.get(self._path("shards", _shard_name(shard_id)))
        return pq.read_table(io.BytesIO(data), schema=SHARD_SCHEMA)

    def read_result(self, shard_id: int) -> pa.Table | None:
        try:
            data = self.storage.get(self._path("results", _shard_name(shard_id)))
        except NotFoundError:
            return None
        return pq.read_table(io.BytesIO(data), schema=RESULT_SCHEMA)

    def done_shards(self) -> set[int]:
        """Shards that have a result (whatever its failed rows)."""
        done = set()
        try:
            for info in self.storage.list(self._path("results"), (".parquet",)):
                shard = _shard_of(info.key)
                if shard is not None:
                    done.add(shard)
        except NotFoundError:
            pass  # no results folder yet
        return done

    def pending_rows(self, shard_id: int) -> pa.Table:
        """The shard's rows that are not ok yet (all of them on a first run)."""
        return self.pending(shard_id)[0]

    def pending(self, shard_id: int) -> tuple[pa.Table, pa.Table | None]:
        """The shard's rows that are not ok yet, and its previous result (None on a first run).

        Workers pass both on to ``commit`` so a shard's planned rows are read once per attempt.
        """
        rows = self.read_shard(shard_id)
        previous = self.read_result(shard_id)
        if previous is None:
            return rows, None
        ok = previous.filter(pc.equal(previous["status"], "ok"))["row_id"]
        return rows.filter(pc.invert(pc.is_in(rows["row_id"], value_set=ok))), previous

    def commit(self, shard_id: int, results: pa.Table | list[dict[str, Any]],
               planned_ids: pa.Array | None = None) -> ShardSummary:
        """Write the shard's result: previous ok rows kept, the rest replaced by ``results``.

        ``results``: a result table, or rows made by ``result_row``.

        Returns the shard's index row (the worker hands it to the driver in its report).
        ``planned_ids``: the shard's planned row ids, if the caller has them (saves a read).

        Raises AssertionError (a bug, never an input problem) unless every row of the shard
        appears exactly once.
        """
        if isinstance(results, list):
            results = pa.Table.from_pylist(results, schema=RESULT_SCHEMA)
        results = results.cast(RESULT_SCHEMA)
        # The planned row ids never change, so a caller that read them passes them in.
        if planned_ids is None:
            planned_ids = self.read_shard(shard_id)["row_id"]
        expected = sorted(planned_ids.to_pylist())
        uri = self._path("results", _shard_name(shard_id))
        for round_no in range(COMMIT_ROUNDS):
            # Re-read on every round: another attempt (a stale actor, a second driver) may
            # have committed since, and its ok rows must survive this write.
            previous, previous_tag = self._read_result_tagged(shard_id)
            merged = merge_results(previous, results)
            got = sorted(merged["row_id"].to_pylist())
            if got != expected:
                missing = sorted(set(expected) - set(got))[:5]
                extra = len(got) - len(set(got))
                raise AssertionError(f"shard {shard_id} result would lose rows {missing} or "
                                     f"repeat {extra}; refusing to commit")
            data = _parquet_bytes(merged)
            try:
                if previous is None:
                    tag = self.storage.put_if_absent(uri, data)
                else:
                    tag = self.storage.put_if_match(uri, data, previous_tag or "")
            except (AlreadyExistsError, ConflictError):
                # Lost the race to another writer: merge again from what it wrote.
                log.info("shard %d: result changed while committing (round %d); merging "
                         "again", shard_id, round_no + 1)
                time.sleep(random.uniform(0, 0.05 * (round_no + 1)))
                continue
            return summarise(shard_id, merged, tag)
        raise ConflictError(f"shard {shard_id}: {COMMIT_ROUNDS} commits in a row lost to "
                            f"concurrent writers of {uri}", uri)

    def _read_result_tagged(self, shard_id: int) -> tuple[pa.Table | None, str | None]:
        try:
            data, tag = self.storage.get_tagged(self._path("results", _shard_name(shard_id)))
        except NotFoundError:
            return None, None
        return pq.read_table(io.BytesIO(data), schema=RESULT_SCHEMA), tag

    def reachable(self) -> bool:
        """Whether the store answers at all (one HEAD of job.json): False only for an outage
        (unreachable, 5xx or throttled after the client's retries), True for any answer."""
        try:
            self.storage.head(self._path(JOB_NAME))
        except (StoreUnavailableError, ThrottledError):
            return False
        except StorageError:
            return True  # an answer (not found, denied, …): the store is there
        return True

    # -- attempts: what failed, kept across driver restarts ----------------------------------

    def _attempts_uri(self, shard_id: int) -> str:
        return self._path("attempts", _shard_name(shard_id).removesuffix(".parquet") + ".json")

    def record_failure(self, shard_id: int, reason: str, detail: str, *,
                       lost: bool) -> dict[str, Any]:
        """Count one failed attempt of the shard in ``attempts/NNNNN.json`` and return the
        record: ``failures`` (attempts spent), ``lost`` (of those, its worker died) and the
        last few reasons. Only shards that failed have one, and only the driver writes them
        (it holds the lease), so a plain put does."""
        record = self.read_attempt(shard_id)
        record["failures"] += 1
        record["lost"] += int(lost)
        record["history"] = [*record["history"][-9:],
                             {"time": time.time(), "reason": reason, "detail": detail[:500]}]
        self.storage.put(self._attempts_uri(shard_id), json.dumps(record).encode())
        return record

    def read_attempt(self, shard_id: int) -> dict[str, Any]:
        try:
            found = _json_object(self.storage.get(self._attempts_uri(shard_id))) or {}
        except NotFoundError:
            found = {}
        return {"failures": int(found.get("failures", 0)), "lost": int(found.get("lost", 0)),
                "history": list(found.get("history", []))}

    def read_attempts(self) -> dict[int, dict[str, Any]]:
        """Every shard's attempt record (one LIST, then one GET per shard that ever failed)."""
        try:
            infos = list(self.storage.list(self._path("attempts"), (".json",)))
        except NotFoundError:
            return {}
        shards = [s for s in (_shard_of(i.key.removesuffix(".json") + ".parquet")
                              for i in infos) if s is not None]
        return {shard: self.read_attempt(shard) for shard in shards}

    def clear_attempts(self, shards: Iterable[int]) -> None:
        """Forget the failures of ``shards`` (`deblur rerun` starts their count afresh)."""
        recorded = set(self.read_attempts())
        for shard in shards:
            if shard in recorded:
                self.storage.delete(self._attempts_uri(shard))

    def iter_results(self) -> Iterator[pa.Table]:
        for shard in sorted(self.done_shards()):
            table = self.read_result(shard)
            if table is not None:
                yield table

    FAILED_COLUMNS = ("row_id", "key", "output_key", "reason", "error", "attempt", "worker",
                      "finished_at")

    def failed_rows(self, reason: str | None = None,
                    index: dict[int, ShardSummary] | None = None) -> Iterator[dict[str, Any]]:
        """Failed result rows (``FAILED_COLUMNS``; only ``reason``'s if given), in shard order.

        Streams: one shard's result is in memory at a time, and only shards whose index row
        counts such failures are read, so naming the failures of a million-image job costs a
        GET per shard that has any.
        """
        index = self.index() if index is None else index
        for shard in sorted(index):
            summary = index[shard]
            if not summary.failed or (reason is not None
                                      and reason not in summary.reason_counts()):
                continue
            table = self.read_result(shard)
            if table is None:
                continue
            wanted = pc.equal(table["status"], "failed")
            if reason is not None:
                wanted = pc.and_(wanted, pc.equal(table["reason"], reason))
            yield from table.filter(wanted).select(list(self.FAILED_COLUMNS)).to_pylist()

    # -- the index: status and rerun in O(shards) -------------------------------------------

    def write_index(self, summaries: Iterable[ShardSummary]) -> None:
        """Replace index.parquet with these rows (the driver's view of every done shard)."""
        rows = sorted(summaries, key=lambda r: r.shard)
        columns = {name: [getattr(r, name) for r in rows] for name in INDEX_SCHEMA.names}
        table = pa.Table.from_pydict(columns, schema=INDEX_SCHEMA)
        self.storage.put(self._path(INDEX_NAME), _parquet_bytes(table))

    def read_index(self) -> dict[int, ShardSummary]:
        try:
            data = self.storage.get(self._path(INDEX_NAME))
        except NotFoundError:
            return {}
        table = pq.read_table(io.BytesIO(data), schema=INDEX_SCHEMA)
        return {row["shard"]: ShardSummary(**row) for row in table.to_pylist()}

    def index(self) -> dict[int, ShardSummary]:
        """Every done shard's summary: index.parquet, checked against one listing of results.

        Costs one GET, ceil(shards/1000) LISTs and one GET per result written since the index
        (none after a clean run). ``self.index_stale`` says how many results had to be read.
        """
        cached = self.read_index()
        current: dict[int, ShardSummary] = {}
        stale: list[tuple[int, str | None]] = []
        try:
            for info in self.storage.list(self._path("results"), (".parquet",)):
                shard = _shard_of(info.key)
                if shard is None:
                    continue
                row = cached.get(shard)
                if row is not None and row.tag is not None and row.tag == info.etag:
                    current[shard] = row
                else:
                    stale.append((shard, info.etag))
        except NotFoundError:
            pass  # no results folder yet
        for shard, tag in stale:
            table = self.read_result(shard)
            if table is not None:
                current[shard] = summarise(shard, table, tag)
        self.index_stale = len(stale)
        return current

    def rerun_selection(self, all_failed: bool = False,
                        index: dict[int, ShardSummary] | None = None) -> list[int]:
        """Shards with no result, or with failed rows a rerun could fix."""
        index = self.index() if index is None else index
        selected = []
        for shard in self.shard_ids():
            row = index.get(shard)
            if row is None or row.rerunnable or (all_failed and row.failed):
                selected.append(shard)
        return selected

    def status(self, index: dict[int, ShardSummary] | None = None) -> JobStatus:
        job = self.job()
        index = self.index() if index is None else index
        ok = failed = 0
        reasons: dict[str, int] = {}
        first = last = None
        for row in index.values():
            ok += row.ok
            failed += row.failed
            for reason, count in row.reason_counts().items():
                reasons[reason] = reasons.get(reason, 0) + count
            if row.first_finished is not None:
                first = row.first_finished if first is None else min(first, row.first_finished)
            if row.last_finished is not None:
                last = row.last_finished if last is None else max(last, row.last_finished)
        throughput = ok / (last - first) if first is not None and last and last > first else None
        return JobStatus(total=int(job["rows"]), ok=ok, failed=failed,
                         pending=int(job["rows"]) - ok - failed, shards_done=len(index),
                         shards_total=int(job["shards"]), failures_by_reason=reasons,
                         throughput=throughput, cancel_requested=self.cancel_requested())

    # -- what a run leaves beside the results ------------------------------------------------

    def write_summary(self, summary: dict[str, Any]) -> None:
        self.storage.put(self._path("summary.json"),
                         json.dumps(summary, indent=2, default=str).encode())

    def read_summary(self) -> dict[str, Any] | None:
        """summary.json of the last run that finished, or None."""
        try:
            return json.loads(self.storage.get(self._path("summary.json")))
        except NotFoundError:
            return None

    def state(self) -> tuple[str, str | None]:
        """(state, error) for `status` and `list`: ``running`` while a driver's lease is live,
        else what the last run's summary says (``finished``, ``stopped``, ``failed_to_start``,
        ``failed``), else ``planned`` (no run has ended yet, or its driver was killed)."""
        if self.live_lease() is not None:
            return "running", None
        summary = self.read_summary()
        if summary is None:
            return "planned", None
        # A summary from before states were recorded: its pending count tells.
        state = summary.get("state") or ("stopped" if summary.get("pending") else "finished")
        return state, summary.get("error")

    def write_log(self, name: str, text: str) -> str:
        """A log file under ``logs/`` (e.g. a worker's start traceback); returns its URI."""
        uri = self._path("logs", name)
        self.storage.put(uri, text.encode(), "text/plain; charset=utf-8")
        return uri

    def write_snapshot(self, snapshot: dict[str, Any]) -> None:
        """One metrics snapshot, named by its time so a listing sorts them."""
        self.storage.put(self._path("metrics", f"{int(snapshot['time'] * 1000)}.json"),
                         json.dumps(snapshot, indent=1).encode())

    def latest_snapshot(self) -> dict[str, Any] | None:
        """The newest metrics snapshot, or None before the first."""
        try:
            infos = list(self.storage.list(self._path("metrics"), (".json",)))
        except NotFoundError:
            return None
        if not infos:
            return None
        return json.loads(self.storage.get(max(infos, key=lambda i: i.key).uri))

    def write_qa(self, name: str, data: bytes, content_type: str | None = None) -> str:
        """A file of the QA sample (thumbnail or index) under ``qa/``; returns its URI."""
        uri = self._path("qa", name)
        self.storage.put(uri, data, content_type)
        return uri

    def write_report(self, page: bytes) -> str:
        uri = self._path("report.html")
        self.storage.put(uri, page, "text/html; charset=utf-8")
        return uri

    # -- cancel --------------------------------------------------------------------------------

    def request_cancel(self) -> None:
        self.job()  # refuse to cancel a job root that holds no job
        self.storage.put(self._path("cancel"), str(time.time()).encode())

    def cancel_requested(self) -> bool:
        return self.storage.exists(self._path("cancel"))

    def clear_cancel(self) -> None:
        self.storage.delete(self._path("cancel"))

    # -- the lease: which driver is working on the job --------------------------------------

    def read_lease(self) -> Lease | None:
        """lease.json, or None; an unreadable one reads as expired (it can be taken over)."""
        return self._read_lease_tagged()[0]

    def _read_lease_tagged(self) -> tuple[Lease | None, str | None]:
        try:
            data, tag = self.storage.get_tagged(self._path(LEASE_NAME))
        except NotFoundError:
            return None, None
        found = _json_object(data) or {}
        try:
            return Lease(holder=str(found["holder"]), job_id=str(found.get("job_id", "")),
                         destination=str(found.get("destination", "")),
                         acquired_at=float(found.get("acquired_at", 0.0)),
                         expires_at=float(found["expires_at"])), tag
        except (KeyError, TypeError, ValueError):
            return Lease(holder="(unreadable lease.json)", job_id="", destination="",
                         acquired_at=0.0, expires_at=0.0), tag

    def live_lease(self) -> Lease | None:
        """The lease of a driver working on the job now (unexpired), or None."""
        lease = self.read_lease()
        return lease if lease is not None and lease.live else None

    def acquire_lease(self, ttl: float, *, job_id: str | None = None,
                      destination: str | None = None, wait_silent: bool = False) -> Lease:
        """Hold lease.json for ``ttl`` seconds (renew it if this ledger holds it already).

        Raises ConfigError while another driver holds a live lease; takes over an expired one
        with a compare-and-swap on the version read (of two takers exactly one wins), and
        renews its own the same way (a renewal after another driver took over fails).

        ``wait_silent`` (resuming): a live lease is watched until it expires instead of being
        refused at once. A live driver renews every ttl/3, so a renewal seen while waiting
        refuses within that time; a lease that runs out unrenewed belonged to a dead driver
        (a killed pod, a resubmitted job) and is taken over, at most one ttl later.
        """
        holder = self.holder or new_holder()
        uri = self._path(LEASE_NAME)
        current, current_tag = self._read_lease_tagged()
        if (wait_silent and current is not None and current.holder != holder
                and current.live):
            current, current_tag = self._wait_for_silent_lease(current, current_tag)
        if current is not None and current.holder != holder:
            if current.live:
                until = _when(current.expires_at)
                raise ConfigError(
                    f"another driver is running this job ({self.job_root}): {current.holder} "
                    f"holds its lease until {until}; wait or, if it is dead, wait until "
                    f"{until} and retry (`deblur cancel {self.job_root}` stops a live one)")
            log.warning("taking over the lease of %s, which expired at %s (driver gone)",
                        current.holder, _when(current.expires_at))
        now = time.time()
        if current is not None and current.holder == holder:
            # A renewal names the same job; while planning there is no job.json to read yet.
            job_id = current.job_id if job_id is None else job_id
            destination = current.destination if destination is None else destination
        lease = Lease(holder=holder,
                      job_id=job_id if job_id is not None else self.job()["job_id"],
                      destination=(destination if destination is not None
                                   else self.job()["destination"]),
                      acquired_at=now, expires_at=now + ttl)
        try:
            if current is None:
                self.storage.put_if_absent(uri, lease.to_json())
            else:  # a renewal of ours, or a takeover of an expired one: only that version
                self.storage.put_if_match(uri, lease.to_json(), current_tag or "")
        except (AlreadyExistsError, ConflictError):
            found = self.read_lease()
            # A retried conditional PUT can find its own first attempt.
            if found is None or found.holder != holder:
                who = found.describe() if found else "another driver"
                raise ConfigError(f"another driver took over the job at {self.job_root} "
                                  f"at the same time: {who}; wait for it or retry "
                                  f"after its lease expires") from None
        self.holder = holder
        return lease

    def _wait_for_silent_lease(self, current: Lease, tag: str | None,
                               poll_s: float = 1.0) -> tuple[Lease | None, str | None]:
        """Watch another driver's live lease until it expires or is renewed (then returned
        as found: live, so the caller refuses)."""
        log.warning("the job at %s is held by %s until %s: waiting to see whether that driver "
                    "is alive (a live one renews its lease)", self.job_root, current.describe(),
                    _when(current.expires_at))
        expires = current.expires_at
        while True:
            time.sleep(min(poll_s, max(0.0, expires - time.time()) + 0.1))
            found, found_tag = self._read_lease_tagged()
            if found is None or found.holder != current.holder or found.expires_at != expires:
                return found, found_tag  # renewed, released or taken: decide on what is there
            if not found.live:
                return found, found_tag

    def renew_lease(self, ttl: float) -> Lease:
        """Push our lease's expiry to now + ttl; ConfigError if another driver took it."""
        current = self.read_lease()
        if current is not None and current.holder != self.holder:
            raise ConfigError(f"lost the lease of {self.job_root} to {current.describe()} "
                              f"(this driver was presumed dead): stopping dispatch")
        return self.acquire_lease(ttl)

    def release_lease(self) -> None:
        """Delete lease.json if this ledger holds it."""
        if self.holder is None:
            return
        current = self.read_lease()
        if current is not None and current.holder == self.holder:
            self.storage.delete(self._path(LEASE_NAME))
        self.holder = None

    def keep_lease(self, ttl: float) -> LeaseKeeper:
        """Acquire the lease and renew it every ttl/3 until ``LeaseKeeper.stop``."""
        self.acquire_lease(ttl)
        return LeaseKeeper(self, ttl).start()


def list_jobs(storage: Storage, destination: str) -> list[dict[str, Any]]:
    """Every job recorded under DESTINATION/_deblur/, oldest first, with its counts.

    A job whose job.json is not a deblur job file is listed with ``corrupt`` (the reason)
    instead of its counts; the others are listed as usual.
    """
    root = as_folder(destination) + JOB_AREA + "/"
    jobs = []
    try:
        infos = [i for i in storage.list(root, (".json",)) if i.key.endswith("/" + JOB_NAME)
                 and i.key.count("/") == 1]
    except NotFoundError:
        return []
    for info in infos:
        ledger = Ledger(storage, info.uri[: -len(JOB_NAME)])
        try:
            job = ledger.job()
        except ConfigError as exc:
            jobs.append({"job_id": info.key.split("/", 1)[0], "job_root": ledger.job_root,
                         "created_at": None, "corrupt": str(exc)})
            continue
        state, error = ledger.state()
        jobs.append({"job_id": job["job_id"], "job_root": ledger.job_root,
                     "created_at": job["created_at"], "source": job["source"],
                     "rows": job["rows"], "shards": job["shards"],
                     "shards_done": len(ledger.done_shards()), "state": state,
                     **({"error": error} if error else {})})
    return sorted(jobs, key=lambda j: (j["created_at"] is not None, j["created_at"] or 0))


def _same_form(prefix: str) -> str:
    """A prefix as a folder, local paths made absolute, so two spellings compare equal."""
    if not prefix.startswith("s3://"):
        from deblur.io.storage import to_local_path

        prefix = os.path.abspath(to_local_path(prefix))
    return as_folder(prefix)


def prefixes_overlap(a: str, b: str) -> bool:
    """Whether one prefix equals, contains or lies inside the other."""
    a, b = _same_form(a), _same_form(b)
    return a.startswith(b) or b.startswith(a)


def _ancestors(prefix: str) -> list[str]:
    out = []
    current = prefix.rstrip("/")
    while True:
        head, sep, _ = current.rpartition("/")
        if not sep or not head or head.endswith((":", ":/", "//")):
            return out
        out.append(head)
        current = head


def live_jobs_overlapping(storage: Storage, destination: str, job_root: str | None = None
                          ) -> list[tuple[str, Lease]]:
    """Jobs with a live lease whose destination overlaps ``destination`` (equal, inside or
    containing), found in the ``_deblur/`` areas of DESTINATION and of each folder above it
    (a containing job's default area), and in the area that holds ``job_root``.

    Not found: a live job whose root lies in some other area (e.g. a job on DEST/sub with its
    default root DEST/sub/_deblur/…); finding those would mean listing all of DEST.
    """
    areas = [as_folder(p) + JOB_AREA + "/" for p in [destination, *_ancestors(destination)]]
    own = as_folder(job_root) if job_root else None
    if own:
        parent = own.rstrip("/").rpartition("/")[0] + "/"
        if parent.rstrip("/").endswith("/" + JOB_AREA) and parent not in areas:
            areas.append(parent)
    found: list[tuple[str, Lease]] = []
    for area in areas:
        try:
            infos = [i for i in storage.list(area, (".json",))
                     if i.key.endswith("/" + LEASE_NAME) and i.key.count("/") == 1]
        except NotFoundError:
            continue
        for info in infos:
            ledger = Ledger(storage, info.uri[: -len(LEASE_NAME)])
            if own is not None and _same_form(ledger.job_root) == _same_form(own):
                continue
            lease = ledger.live_lease()
            if lease is not None and lease.destination and prefixes_overlap(
                    lease.destination, destination):
                found.append((ledger.job_root, lease))
    return found
