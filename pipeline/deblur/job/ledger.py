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

This module is the only code that knows these names. It plans a job root (claim, shards,
job.json) and reads everything in it; the mechanisms it names objects for live beside it:

- ``job/results.py``: what a result row is (``result_row``/``result_table`` are its only
  constructors) and the index row summarising a shard (``ShardSummary``);
- ``job/commit.py``: writing a shard's result conditionally, merged with what is there;
- ``job/lease.py``: the planner's claim, the running driver's lease and its keeper.

job.json is written last (put-if-absent), so its existence means "planned".

The index makes status and rerun cost O(shards), not O(images): each row holds a shard's
counts, failure reasons, finish times, quality sums and the version tag (ETag / mtime+size) of
the result it summarises. Readers trust a row only while the listed result still has that tag,
and summarise the few results written since (a driver that died before its last index write);
the index is a cache of the results, never a second source of truth.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from deblur import __version__
from deblur.config import SCENE_MODEL, JobConfig, from_dict
from deblur.errors import (
    AlreadyExistsError,
    ConfigError,
    ManifestError,
    NotFoundError,
    StorageError,
    StoreUnavailableError,
    ThrottledError,
)
from deblur.io import codec
from deblur.io.storage import Storage, as_folder, join
from deblur.job.commit import commit_result
from deblur.job.lease import Lease, LeaseFile, LeaseKeeper, claim, json_object, when
from deblur.job.manifest import SHARD_SCHEMA, PlanCounts, iter_shards, plan_rows
from deblur.job.results import (INDEX_SCHEMA, RESULT_SCHEMA, ShardSummary, parquet_bytes,
                                read_parquet, summarise)
from deblur.scene.plan import iter_scene_shards, manifest_scenes

log = logging.getLogger("deblur.job.ledger")

UPLOAD_THREADS = 16
_EXPLICIT_STORAGE = {"endpoint_url": ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
                     "region": ("AWS_REGION", "AWS_DEFAULT_REGION")}
"""Environment variables that name a storage setting explicitly (over the recorded one).
Retry mode and attempts have none: the client always takes them from the config."""
INDEX_NAME = "index.parquet"
JOB_NAME = "job.json"
CLAIM_NAME = "claim.json"
LEASE_NAME = "lease.json"
JOB_AREA = "_deblur"
_JOB_KEYS = ("job_id", "created_at", "source", "destination", "rows", "shards", "config")

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


def write_shard(job_root: str, storage: Storage, shard_id: int, table: pa.Table) -> None:
    """Store one planned shard (for planning tasks, which hold no Ledger)."""
    storage.put(as_folder(job_root) + "shards/" + _shard_name(shard_id), parquet_bytes(table))


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
        self.lease = LeaseFile(storage, self._path(LEASE_NAME), self.job_root,
                               lambda: (self.job()["job_id"], self.job()["destination"]))
        """lease.json: which driver works on the job (``job/lease.py``)."""

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
        claim(storage, ledger._path(CLAIM_NAME), ledger._path(JOB_NAME), ledger.lease, job_id,
              ttl)
        keeper: LeaseKeeper | None = None
        try:
            if hold_lease:
                # Renewed while planning (minutes at 100 M rows): a lease left to expire would
                # let another driver take a job that is still being planned.
                ledger.acquire_lease(ttl, job_id=job_id, destination=config.destination)
                keeper = LeaseKeeper(ledger.lease, ttl).start()
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
            found = json_object(storage.get(self._path(JOB_NAME))) or {}
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
            # a scene job's shard is one scene (its views), not shard_size rows
            tables = (iter_scene_shards(batches, planner.base,
                                        manifest_scenes(config.source, storage))
                      if config.model.name == SCENE_MODEL
                      else iter_shards(batches, config.shard_size))
            for table in tables:
                data = parquet_bytes(table)
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
            ledger.storage = ledger.lease.storage = get_storage(config)
        return ledger

    def job(self) -> dict[str, Any]:
        if self._job is None:
            uri = self._path(JOB_NAME)
            try:
                data = self.storage.get(uri)
            except NotFoundError:
                raise ConfigError(f"no job at {self.job_root} (no job.json): check the job "
                                  f"root that `deblur run` printed") from None
            job = json_object(data)
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
        return read_parquet(data, SHARD_SCHEMA)

    def read_result(self, shard_id: int) -> pa.Table | None:
        try:
            data = self.storage.get(self._path("results", _shard_name(shard_id)))
        except NotFoundError:
            return None
        return read_parquet(data, RESULT_SCHEMA)

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
        # The planned row ids never change, so a caller that read them passes them in.
        if planned_ids is None:
            planned_ids = self.read_shard(shard_id)["row_id"]
        return commit_result(self.storage, self._path("results", _shard_name(shard_id)),
                             shard_id, results.cast(RESULT_SCHEMA), planned_ids)

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
            found = json_object(self.storage.get(self._attempts_uri(shard_id))) or {}
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
        self.storage.put(self._path(INDEX_NAME), parquet_bytes(table))

    def read_index(self) -> dict[int, ShardSummary]:
        try:
            data = self.storage.get(self._path(INDEX_NAME))
        except NotFoundError:
            return {}
        table = read_parquet(data, INDEX_SCHEMA)
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
        return self.lease.read()

    def live_lease(self) -> Lease | None:
        return self.lease.live()

    def acquire_lease(self, ttl: float, *, job_id: str | None = None,
                      destination: str | None = None, wait: bool = False,
                      on_wait: Callable[[float | None], None] | None = None) -> Lease:
        """``LeaseFile.acquire`` on this job's lease.json: another driver's lease is taken
        over at once when its holder is gone from this host, waited out with ``wait``."""
        return self.lease.acquire(ttl, job_id=job_id, destination=destination, wait=wait,
                                  on_wait=on_wait)

    def renew_lease(self, ttl: float) -> Lease:
        return self.lease.renew(ttl)

    def release_lease(self) -> None:
        self.lease.release()

    def keep_lease(self, ttl: float) -> LeaseKeeper:
        """Acquire the lease and renew it every ttl/3 until ``LeaseKeeper.stop``."""
        return self.lease.keep(ttl)

    @property
    def holder(self) -> str | None:
        """This driver's lease holder id while it holds lease.json (``acquire_lease``)."""
        return self.lease.holder


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
