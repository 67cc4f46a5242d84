"""The actor pool: an autoscaling set of worker actors fed shard by shard.

It does no image work. Given the job's pending shards (the driver chose them through the
ledger), it keeps between ``min_workers`` and ``max_workers`` actors alive (the ``scheduler``
config section): it asks for more while shards wait (pending GPU actors are what the Ray
autoscaler turns into GPU nodes) and retires actors idle for ``idle_timeout_s``. Each actor has up to ``shards_per_worker`` shards in flight. When
an actor or its node dies, its shards go back to the queue with the attempt count raised; after
``max_attempts`` the shard's pending rows are committed as failed with the reason. Every
decision reads and writes the ledger only, so a driver restarted on the same job root resumes.
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from deblur.config import JobConfig
from deblur.errors import WorkerStartError, one_line
from deblur.job.ledger import Ledger, ShardSummary, result_row

log = logging.getLogger("deblur.run.pool")

# Errors that mean "the actor (or its node) is gone": the shard is retried elsewhere.
_LOST = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError",
         "NodeDiedError", "ObjectLostError", "OwnerDiedError", "LocalRayletDiedError")


@dataclass
class ActorSlot:
    """Driver-side view of one worker actor."""

    handle: Any
    name: str
    ready_ref: Any | None
    in_flight: dict[Any, tuple[int, int]] = field(default_factory=dict)  # ref -> shard, attempt
    idle_since: float = field(default_factory=time.monotonic)
    worker_id: str | None = None

    @property
    def ready(self) -> bool:
        return self.ready_ref is None


@dataclass
class Progress:
    """What the driver knows so far; passed to the progress callback after every event."""

    shards_total: int
    shards_done: int = 0
    rows_total: int = 0
    rows_done: int = 0
    ok: int = 0
    failed: int = 0
    retries: int = 0
    workers_active: int = 0
    workers_pending: int = 0
    started: float = field(default_factory=time.monotonic)
    cancelled: bool = False

    @property
    def images_per_s(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.rows_done / elapsed if elapsed > 0 else 0.0


class ActorPool:
    """Dispatches the ledger's pending shards to worker actors until none is left.

    Args:
        config: the job's configuration (pool sizes, retries, worker resources).
        ledger: the job's ledger; the source of truth for what is left to do.
        on_progress: called after every shard event (progress bars, metrics).
        actor_class: the Ray actor class; tests and benches substitute a simulated worker.
    """

    def __init__(self, config: JobConfig, ledger: Ledger,
                 on_progress: Callable[[Progress], None] | None = None,
                 actor_class: Any | None = None, metrics: Any | None = None,
                 lease: Any | None = None) -> None:
        import ray

        from deblur.run.worker import WorkerActor

        self.ray = ray
        self.config = config
        self.ledger = ledger
        self.on_progress = on_progress or (lambda progress: None)
        self.metrics = metrics  # deblur.observe.metrics.JobMetrics, or None
        self.lease = lease  # deblur.job.ledger.LeaseKeeper, or None
        sched = config.scheduler
        actor = actor_class or ray.remote(WorkerActor)
        self.actor_options = actor.options(
            num_gpus=config.worker.gpus_per_worker, num_cpus=config.worker.cpus_per_worker,
            max_concurrency=sched.shards_per_worker + 1,  # +1: ready() never waits on a shard
            max_restarts=0,
        )
        self.actors: dict[str, ActorSlot] = {}
        self.refs: dict[Any, str] = {}  # process/ready ref -> actor name
        self.queue: deque[tuple[int, int]] = deque()
        self.next_actor = 0
        self.config_dict = config.to_dict()
        # Done shards' summaries (the ledger's index), written every index_interval_s and at
        # the end, so status and rerun read one object instead of every result.
        self.index: dict[int, ShardSummary] = {}
        self.index_written = time.monotonic()
        self.index_dirty = False
        self.last_idle_check = 0.0

    # -- public ----------------------------------------------------------------------------

    def run(self, shards: list[int], rows_total: int,
            index: dict[int, ShardSummary] | None = None) -> Progress:
        """Process ``shards`` (pending ones, chosen by the caller through the ledger).

        ``index`` is the ledger's index as the caller read it (summaries of shards done before
        this run); this run's shards are added to it and it is written back as they finish.
        """
        progress = Progress(shards_total=len(shards), rows_total=rows_total)
        self.index = dict(index) if index is not None else self.ledger.index()
        self.queue.extend((shard, 1) for shard in shards)
        last_cancel_check = 0.0
        try:
            while self.queue or self._in_flight():
                if time.monotonic() - last_cancel_check > 2.0:
                    last_cancel_check = time.monotonic()
                    if self.ledger.cancel_requested():
                        log.warning("cancel requested: stopping dispatch")
                        progress.cancelled = True
                        break
                if self.lease is not None and self.lease.lost:
                    log.error("stopping dispatch: %s", self.lease.lost)
                    progress.cancelled = True
                    break
                self._scale()
                self._dispatch()
                self._wait(progress)
                self._maybe_write_index()
                progress.workers_active = sum(s.ready for s in self.actors.values())
                progress.workers_pending = len(self.actors) - progress.workers_active
                if self.metrics is not None:
                    self.metrics.observe_progress(progress, len(self.queue), self._in_flight())
                self.on_progress(progress)
        except KeyboardInterrupt:
            progress.cancelled = True
            log.warning("interrupted: stopping; `deblur run --resume` or `deblur rerun` "
                        "finishes the job")
        finally:
            self.shutdown()
            self._maybe_write_index(force=True)
        return progress

    def _maybe_write_index(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self.index_dirty or (
                not force and now - self.index_written < self.config.scheduler.index_interval_s):
            return
        try:
            self.ledger.write_index(self.index.values())
        except Exception as exc:  # noqa: BLE001 - the index is a cache; results stay the truth
            log.warning("could not write the ledger index (status will read results "
                        "instead): %s", exc)
            return
        self.index_written, self.index_dirty = now, False

    def shutdown(self) -> None:
        for slot in list(self.actors.values()):
            self._retire(slot)

    # -- pool ------------------------------------------------------------------------------

    def _in_flight(self) -> int:
        return sum(len(s.in_flight) for s in self.actors.values())

    def _scale(self) -> None:
        sched = self.config.scheduler
        wanted = math.ceil((len(self.queue) + self._in_flight()) / sched.shards_per_worker)
        target = min(sched.max_workers, max(sched.min_workers, wanted))
        while len(self.actors) < target:
            self._spawn()
        now = time.monotonic()
        if now - self.last_idle_check < 1.0:  # O(actors): once a second is plenty
            return
        self.last_idle_check = now
        for slot in list(self.actors.values()):
            idle = slot.ready and not slot.in_flight and not self.queue
            if (idle and len(self.actors) > sched.min_workers
                    and now - slot.idle_since >= sched.idle_timeout_s):
                log.info("retiring idle worker %s", slot.worker_id or slot.name)
                self._retire(slot)

    def _spawn(self) -> None:
        name = f"worker-{self.next_actor}"
        self.next_actor += 1
        handle = self.actor_options.remote(self.config_dict)
        ready_ref = handle.ready.remote()
        self.actors[name] = ActorSlot(handle=handle, name=name, ready_ref=ready_ref)
        self.refs[ready_ref] = name

    def _retire(self, slot: ActorSlot) -> None:
        self.actors.pop(slot.name, None)
        for ref in [r for r, n in self.refs.items() if n == slot.name]:
            self.refs.pop(ref)
        try:
            self.ray.kill(slot.handle, no_restart=True)
        except Exception as exc:  # noqa: BLE001 - already dead with its node
            log.debug("kill of %s: %s", slot.name, exc)

    # -- dispatch and completion -----------------------------------------------------------

    def _dispatch(self) -> None:
        per_actor = self.config.scheduler.shards_per_worker
        # Least-loaded first, so a new actor gets work before an old one gets its second shard.
        for slot in sorted(self.actors.values(), key=lambda s: len(s.in_flight)):
            while slot.ready and self.queue and len(slot.in_flight) < per_actor:
                shard, attempt = self.queue.popleft()
                ref = slot.handle.process.remote(self.ledger.job_root, shard, attempt)
                slot.in_flight[ref] = (shard, attempt)
                self.refs[ref] = slot.name

    def _wait(self, progress: Progress) -> None:
        if not self.refs:
            time.sleep(0.05)
            return
        refs = list(self.refs)
        done, rest = self.ray.wait(refs, num_returns=1, timeout=0.5)
        if done and rest:
            # Everything else already finished, in one call: at hundreds of workers, handling
            # one completion per loop would spend the loop on the bookkeeping around it.
            more, _ = self.ray.wait(rest, num_returns=len(rest), timeout=0, fetch_local=False)
            done += more
        for ref in done:
            name = self.refs.pop(ref, None)
            slot = self.actors.get(name) if name else None
            if slot is None:
                continue
            if ref is slot.ready_ref:
                self._on_ready(slot, ref)
            else:
                self._on_shard(slot, ref, progress)

    def _on_ready(self, slot: ActorSlot, ref: Any) -> None:
        try:
            slot.worker_id = self.ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - classified below
            self._retire(slot)
            if "creation task" in str(exc) or not _is_lost(exc):
                # The constructor itself raised (bad weights, no GPU, …): every new actor
                # would do the same, so fail the job now with the worker's own message.
                raise WorkerStartError(f"a worker failed to start: {one_line(exc)}") from exc
            log.warning("worker %s lost before it started: %s", slot.name, one_line(exc))
            return
        slot.ready_ref = None
        slot.idle_since = time.monotonic()
        log.info("worker %s ready", slot.worker_id)

    def _on_shard(self, slot: ActorSlot, ref: Any, progress: Progress) -> None:
        shard, attempt = slot.in_flight.pop(ref)
        if not slot.in_flight:
            slot.idle_since = time.monotonic()
        try:
            report = self.ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - classified below
            if _is_lost(exc):
                log.warning("worker %s lost with shard %d (attempt %d): %s",
                            slot.worker_id or slot.name, shard, attempt, one_line(exc))
                # The actor is gone: every shard it held goes back, not only this one.
                orphans = [(shard, attempt)] + list(slot.in_flight.values())
                self._retire(slot)
                for lost_shard, lost_attempt in orphans:
                    self._retry_or_fail(lost_shard, lost_attempt, "worker_lost", exc, progress)
            else:
                log.error("shard %d failed on attempt %d: %s", shard, attempt, one_line(exc))
                self._retry_or_fail(shard, attempt, "shard_error", exc, progress)
            return
        progress.shards_done += 1
        progress.rows_done += report["rows"]
        progress.ok += report["ok"]
        progress.failed += report["failed"]
        if report.get("summary") is not None:
            self.index[shard] = report["summary"]
            self.index_dirty = True
        if self.metrics is not None:
            self.metrics.observe_shard(report)

    def _retry_or_fail(self, shard: int, attempt: int, reason: str, exc: Exception,
                       progress: Progress) -> None:
        if attempt < self.config.scheduler.max_attempts:
            progress.retries += 1
            if self.metrics is not None:
                self.metrics.observe_retry()
            self.queue.append((shard, attempt + 1))
            return
        rows = self._fail_shard(shard, attempt, reason, one_line(exc))
        progress.shards_done += 1
        progress.rows_done += rows
        progress.failed += rows
        if self.metrics is not None:
            self.metrics.observe_shard({"worker": "driver", "ok": 0, "failed": rows,
                                        "metrics": {"reasons": {reason: rows}}})

    def _fail_shard(self, shard: int, attempt: int, reason: str, detail: str) -> int:
        """Commit the shard's pending rows as failed after its last attempt."""
        now = time.time()
        rows = [result_row(row, attempt=attempt, worker="driver", status="failed",
                           reason=reason, finished_at=now,
                           error=f"{row['key']}: shard {shard} gave up after {attempt} "
                                 f"attempts: {detail}")
                for row in self.ledger.pending_rows(shard).to_pylist()]
        self.index[shard] = self.ledger.commit(shard, rows)
        self.index_dirty = True
        return len(rows)


def _is_lost(exc: BaseException) -> bool:
    """The actor or its node is gone (as opposed to an exception raised by our code)."""
    return any(cls.__name__ in _LOST for cls in type(exc).__mro__)
