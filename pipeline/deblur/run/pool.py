"""The actor pool: an autoscaling set of worker actors fed shard by shard.

It does no image work. Given the job's pending shards (the driver chose them through the
ledger), it keeps between ``min_workers`` and ``max_workers`` actors alive (the ``scheduler``
config section): it asks for more while shards wait (pending GPU actors are what the Ray
autoscaler turns into GPU nodes) and retires actors idle for ``idle_timeout_s``. Each actor has up to ``shards_per_worker`` shards in flight. When
an actor or its node dies, its shards go back to the queue with the attempt count raised (after
a backoff: ``retry_backoff_s`` doubled per attempt, capped); after ``max_attempts`` the shard's
pending rows are committed as failed with the reason. Failed attempts are counted in the
ledger (``attempts/``), so a restarted driver goes on counting. A shard whose worker died
``isolate_after`` times runs one image at a time on a worker set apart, so an image that kills
the process ends as one ``worker_crash`` row. A shard that failed because the store was
unreachable pauses dispatch until a probe answers, and goes back without spending an attempt.
Every decision reads and writes the ledger only, so a driver restarted on the same job root
resumes.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from deblur.cluster import stand_in_gpus
from deblur.config import SCENE_MODEL, JobConfig
from deblur.errors import StorageError, WorkerStartError, is_outage, one_line
from deblur.io.storage import get_storage
from deblur.job.ledger import Ledger
from deblur.job.results import ShardSummary, result_row

log = logging.getLogger("deblur.run.pool")

# Errors that mean "the actor (or its node) is gone": the shard is retried elsewhere.
NODE_LABEL = "ray.io/node-id"
"""The label Ray gives every node: new workers are kept off nodes where one failed to start."""

FIT_POLL_S = 2.0
"""How often the driver asks scene workers how far their fits are (the progress line's steps)."""

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
    spawned: float = field(default_factory=time.monotonic)
    isolating: bool = False  # reserved for one-image tasks: gets no shard meanwhile
    deadlines: dict[Any, float] = field(default_factory=dict)  # process ref -> monotonic time

    @property
    def ready(self) -> bool:
        return self.ready_ref is None


@dataclass
class Isolation:
    """A shard that kept killing its workers, run one image at a time on a worker of its own
    (``scheduler.isolate_after``), so the image that does it ends as one failed row."""

    shard: int
    attempt: int
    rows: dict[int, dict[str, Any]] | None = None  # pending planned rows by id (read lazily)
    results: dict[int, dict[str, Any]] = field(default_factory=dict)
    tries: dict[int, int] = field(default_factory=dict)  # row id -> failed runs alone
    done: set[int] = field(default_factory=set)  # row ids with a final answer


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
    waiting_for: str = ""
    """What a pending worker asks for (e.g. "GPU: 1, CPU: 1"), while one waits to be placed."""
    fitting: dict[int, tuple[int, int]] = field(default_factory=dict)
    """Scene jobs: shard -> (optimisation step, steps) of each scene being fitted now, as its
    worker last said (polled every ``FIT_POLL_S``)."""

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

        from deblur.run.scene_worker import SceneWorkerActor
        from deblur.run.worker import WorkerActor

        self.ray = ray
        self.config = config
        self.ledger = ledger
        self.on_progress = on_progress or (lambda progress: None)
        self.metrics = metrics  # deblur.observe.metrics.JobMetrics, or None
        self.lease = lease  # deblur.job.lease.LeaseKeeper, or None
        sched = config.scheduler
        # a scene job (--model deblurgs) fits one scene per shard instead of running a network
        actor = actor_class or ray.remote(
            SceneWorkerActor if config.model.name == SCENE_MODEL else WorkerActor)
        self.actor = actor
        # Scene fits run for minutes inside one shard: their workers are asked for their step
        # (a threaded call beside the fit), so the line moves between shard commits.
        self.scene_job = config.model.name == SCENE_MODEL
        self.fit_refs: dict[Any, str] = {}  # fit_progress ref -> actor name
        self.last_fit_poll = 0.0
        self.actor_kwargs: dict[str, Any] = dict(
            num_gpus=config.worker.gpus_per_worker, num_cpus=config.worker.cpus_per_worker,
            max_concurrency=sched.shards_per_worker + 1,  # +1: ready() never waits on a shard
            max_restarts=0,
        )
        self.actor_options = actor.options(**self.actor_kwargs)
        # Workers whose constructor raised: how many, and the nodes they were on (new
        # workers avoid those); past scheduler.worker_start_attempts no more are started.
        self.start_failures = 0
        self.bad_nodes: dict[str, str] = {}  # node id -> host
        self.spawn_blocked = ""  # why no more workers are started, once that is so
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
        # Seconds per image of recently finished shards (their wall time, shared with the other
        # shards in flight on the actor): what a shard's deadline is derived from.
        self.per_image_s: deque[float] = deque(maxlen=200)
        self.last_watch = 0.0
        # What one worker asks Ray for, to name what is missing when none can be placed.
        self.demand = {"CPU": config.worker.cpus_per_worker,
                       "GPU": config.worker.gpus_per_worker,
                       **(getattr(actor, "_default_options", {}).get("resources") or {})}
        # What the progress line names: without the GPU when it is a stand-in (no CUDA here,
        # the worker runs on the CPU), so a CPU-only machine never reads "waiting for GPU".
        self.shown_demand = {k: v for k, v in self.demand.items()
                             if k != "GPU" or not stand_in_gpus(config)}
        self.stop: Any | None = None
        """A threading.Event the driver sets on SIGINT/SIGTERM: stop now, abandon in flight."""
        # Failed attempts are counted in the ledger (attempts/), so a restarted driver goes on
        # counting; a retry waits its backoff in ``delayed`` (ready time, shard, attempt).
        self.attempts: dict[int, dict[str, Any]] = {}
        self.delayed: list[tuple[float, int, int]] = []
        self.isolations: dict[int, Isolation] = {}
        self.image_queue: deque[tuple[int, int]] = deque()  # (shard, row id) to run alone
        self.image_tasks: dict[Any, int] = {}  # process_rows ref -> row id
        # While the store is unreachable dispatch pauses, probing it with single requests.
        self.store_down_since: float | None = None
        self.next_probe = 0.0
        self.probe_wait = 0.0
        self.probe = Ledger(get_storage(replace(ledger.storage.config, max_attempts=1)),
                            ledger.job_root)

    # -- public ----------------------------------------------------------------------------

    def run(self, shards: list[int], rows_total: int,
            index: dict[int, ShardSummary] | None = None) -> Progress:
        """Process ``shards`` (pending ones, chosen by the caller through the ledger).

        ``index`` is the ledger's index as the caller read it (summaries of shards done before
        this run); this run's shards are added to it and it is written back as they finish.
        """
        progress = Progress(shards_total=len(shards), rows_total=rows_total)
        self.index = dict(index) if index is not None else self.ledger.index()
        self._enqueue(shards)
        last_cancel_check = 0.0
        draining = False  # `deblur cancel`: no new shards, the ones in flight finish
        try:
            while (self._waiting() and not draining) or self._in_flight():
                if not draining and time.monotonic() - last_cancel_check > 2.0:
                    last_cancel_check = time.monotonic()
                    if self._cancel_requested():
                        log.warning("cancel requested: no new shards; waiting for the %d in "
                                    "flight", self._in_flight())
                        progress.cancelled = draining = True
                if self.stop is not None and self.stop.is_set():
                    log.warning("stopping now: %s; shards in flight are abandoned and run "
                                "again on resume", getattr(self.stop, "reason", "signal"))
                    progress.cancelled = True
                    break
                if self.lease is not None and self.lease.lost:
                    log.error("stopping dispatch: %s", self.lease.lost)
                    progress.cancelled = True
                    break
                self._release_delayed()
                if not draining and not self._store_paused():
                    self._scale()
                    self._dispatch_images()
                    self._dispatch()
                if self.store_down_since is None:
                    self._finish_isolations(progress)
                self._wait(progress)
                self._watch(progress)  # start timeout and shard deadlines: nothing waits forever
                self._maybe_write_index()
                if self.scene_job:
                    self._poll_fits(progress)
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
        waiting = len(self.queue) + len(self.delayed) + len(self.image_queue)
        wanted = math.ceil((waiting + self._in_flight()) / sched.shards_per_worker)
        target = min(sched.max_workers, max(sched.min_workers, wanted))
        if self.spawn_blocked and not self.actors and (self.queue or self._in_flight()):
            raise WorkerStartError(self.spawn_blocked)  # the workers that ran are gone
        while len(self.actors) < target and not self.spawn_blocked:
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
        options = self.actor_options
        if self.bad_nodes:  # retry elsewhere: never again on a node where a worker failed
            from ray.util.scheduling_strategies import NodeLabelSchedulingStrategy, NotIn

            options = self.actor.options(**self.actor_kwargs, scheduling_strategy=(
                NodeLabelSchedulingStrategy(hard={NODE_LABEL: NotIn(*self.bad_nodes)})))
        handle = options.remote(self.config_dict)
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
            while (slot.ready and self.queue and len(slot.in_flight) < per_actor
                   and not slot.isolating):
                shard, attempt = self.queue.popleft()
                ref = slot.handle.process.remote(self.ledger.job_root, shard, attempt)
                slot.in_flight[ref] = (shard, attempt)
                slot.deadlines[ref] = time.monotonic() + self._shard_deadline()
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

    def _poll_fits(self, progress: Progress) -> None:
        """Collect the scene workers' answers to the last poll, then ask again every
        ``FIT_POLL_S``; never blocks the loop (answers are taken when they are there)."""
        if self.fit_refs:
            done, _ = self.ray.wait(list(self.fit_refs), num_returns=len(self.fit_refs),
                                    timeout=0, fetch_local=True)
            for ref in done:
                self.fit_refs.pop(ref)
                try:
                    current = self.ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - a lost worker is handled by _wait
                    log.debug("fit progress: %s", one_line(exc))
                    continue
                if current:
                    progress.fitting[int(current["shard"])] = (int(current["step"]),
                                                                int(current["steps"]))
        running = {shard for slot in self.actors.values()
                   for shard, _attempt in slot.in_flight.values()}
        for shard in [s for s in progress.fitting if s not in running]:
            del progress.fitting[shard]  # committed, failed or requeued: no longer fitting
        now = time.monotonic()
        if self.fit_refs or now - self.last_fit_poll < FIT_POLL_S:
            return
        self.last_fit_poll = now
        for slot in self.actors.values():
            if slot.in_flight and slot.ready:
                self.fit_refs[slot.handle.fit_progress.remote()] = slot.name

    def _on_ready(self, slot: ActorSlot, ref: Any) -> None:
        try:
            slot.worker_id = self.ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - classified below
            self._retire(slot)
            if "creation task" in str(exc) or not _is_lost(exc):
                # The constructor itself raised (bad weights, no GPU, …).
                self._start_failed(slot, exc)
                return
            log.warning("worker %s lost before it started: %s", slot.name, one_line(exc))
            return
        slot.ready_ref = None
        slot.idle_since = time.monotonic()
        log.info("worker %s ready", slot.worker_id)

    def _start_failed(self, slot: ActorSlot, exc: Exception) -> None:
        """A worker's constructor raised: keep its traceback in the job's log, retry on
        another node, and give up (WorkerStartError, one line) after
        ``scheduler.worker_start_attempts`` failures or when no other node can take it."""
        # ready() raises the worker's WorkerStartError, which Ray hands back as the ``cause``
        # of its RayTaskError; anything else raised in a constructor has no node to avoid.
        cause = getattr(exc, "cause", None)
        start = cause if isinstance(cause, WorkerStartError) else None
        node, host = (start.node_id, start.host) if start else ("", "")
        trace = (start.trace if start else "") or str(exc)
        message = str(start.args[0]) if start else one_line(exc)
        self.start_failures += 1
        where = f" on {host}" if host else ""
        try:
            log_uri = self.ledger.write_log(
                f"worker-start-{int(time.time() * 1000)}-{slot.name}.txt",
                f"worker {slot.name} failed to start{where} (node {node or '?'})\n{trace}")
        except Exception as write_exc:  # noqa: BLE001 - then the driver's own log keeps it
            log.error("worker %s start traceback (not written to the job root: %s):\n%s",
                      slot.name, one_line(write_exc), trace)
            log_uri = "the driver's log"
        if node:
            self.bad_nodes[node] = host
        limit = self.config.scheduler.worker_start_attempts
        log.error("worker %s failed to start%s (%d of %d): %s; traceback: %s", slot.name,
                  where, self.start_failures, limit, message, log_uri)
        nowhere = self._nowhere_else()
        if self.start_failures < limit and not nowhere:
            return
        why = (f"no worker could start ({self.start_failures} failed{where}"
               + (", and no other node can take one" if nowhere and self.start_failures < limit
                  else "") + f"): {message}; full traceback: {log_uri}")
        if not any(s.ready for s in self.actors.values()):
            raise WorkerStartError(why)
        if not self.spawn_blocked:
            log.error("%s; no more workers are started, the running ones go on", why)
        self.spawn_blocked = why

    def _nowhere_else(self) -> bool:
        """Every live node has had a worker fail to start, and no autoscaler will add one
        (Ray started in this process): a retry could only wait."""
        if not self.bad_nodes or self.config.scheduler.address:
            return False
        try:
            alive = {n["NodeID"] for n in self.ray.nodes() if n.get("Alive")}
        except Exception:  # noqa: BLE001 - unknown: let the attempts decide
            return False
        return alive <= set(self.bad_nodes)

    def _on_shard(self, slot: ActorSlot, ref: Any, progress: Progress) -> None:
        if ref in self.image_tasks:
            self._on_image(slot, ref)
            return
        shard, attempt = slot.in_flight.pop(ref)
        slot.deadlines.pop(ref, None)
        if not slot.in_flight:
            slot.idle_since = time.monotonic()
        try:
            report = self.ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - classified below
            if is_outage(exc):
                self._on_outage(shard, attempt, exc, progress)
            elif _is_lost(exc):
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
        if report.get("rows"):
            self.per_image_s.append(report["seconds"] / report["rows"])
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
        sched = self.config.scheduler
        record = self._record_failure(shard, reason, exc)
        if reason == "worker_lost" and record["lost"] >= sched.isolate_after:
            log.warning("shard %d: its worker died %d times; running it image by image",
                        shard, record["lost"])
            self.isolations.setdefault(shard, Isolation(shard, attempt + 1))
            return
        if attempt < sched.max_attempts:
            progress.retries += 1
            if self.metrics is not None:
                self.metrics.observe_retry()
            self._retry_later(shard, attempt + 1)
            return
        try:
            rows = self._fail_shard(shard, attempt, reason, one_line(exc))
        except StorageError as write_exc:  # the rows stay pending: try once more later
            log.warning("could not record shard %d as failed: %s", shard, one_line(write_exc))
            if is_outage(write_exc):
                self._store_down(write_exc)
            self._retry_later(shard, attempt)
            return
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


    # -- durable attempts, backoff, storage outages -----------------------------------------

    def _enqueue(self, shards: list[int]) -> None:
        """Queue the shards at the attempt the ledger has counted for them (1 if none)."""
        try:
            self.attempts = self.ledger.read_attempts()
        except StorageError as exc:
            log.warning("could not read the recorded attempts (counting from 1): %s",
                        one_line(exc))
        for shard in shards:
            record = self.attempts.get(shard)
            if record is None:
                self.queue.append((shard, 1))
            elif record["lost"] >= self.config.scheduler.isolate_after:
                self.isolations[shard] = Isolation(shard, record["failures"] + 1)
            else:
                self.queue.append((shard, record["failures"] + 1))

    def _waiting(self) -> bool:
        return bool(self.queue or self.delayed or self.image_queue or self.isolations)

    def _record_failure(self, shard: int, reason: str, exc: Exception) -> dict[str, Any]:
        lost = reason == "worker_lost"
        try:
            record = self.ledger.record_failure(shard, reason, one_line(exc), lost=lost)
        except StorageError as write_exc:  # counted here only; the ledger catches up next time
            log.warning("could not record the failed attempt of shard %d: %s", shard,
                        one_line(write_exc))
            record = dict(self.attempts.get(shard) or {"failures": 0, "lost": 0})
            record["failures"] += 1
            record["lost"] += int(lost)
        self.attempts[shard] = record
        return record

    def _retry_later(self, shard: int, attempt: int) -> None:
        """Requeue after retry_backoff_s, doubled per attempt spent, capped: a fault that
        comes back at once (a flapping node, a store that resets) does not use up the
        attempts within seconds."""
        sched = self.config.scheduler
        wait = min(sched.retry_backoff_max_s, sched.retry_backoff_s * 2 ** max(0, attempt - 2))
        heapq.heappush(self.delayed, (time.monotonic() + wait, shard, attempt))

    def _release_delayed(self) -> None:
        now = time.monotonic()
        while self.delayed and self.delayed[0][0] <= now:
            _, shard, attempt = heapq.heappop(self.delayed)
            self.queue.append((shard, attempt))

    def _cancel_requested(self) -> bool:
        try:
            return self.ledger.cancel_requested()
        except StorageError as exc:
            if is_outage(exc):
                self._store_down(exc)
            else:
                log.warning("could not check for a cancel request: %s", one_line(exc))
            return False

    def _on_outage(self, shard: int, attempt: int, exc: Exception, progress: Progress) -> None:
        """A shard failed because the store was unreachable: while it is, the shard goes back
        at the same attempt; if it answers again already, the attempt counts as any other."""
        if self.store_down_since is None and self.probe.reachable():
            log.warning("shard %d failed on a storage error, but the store answers: %s",
                        shard, _why(exc))
            self._retry_or_fail(shard, attempt, "storage_error", exc, progress)
            return
        self._store_down(exc)
        self.queue.appendleft((shard, attempt))

    def _store_down(self, exc: Exception) -> None:
        if self.store_down_since is not None:
            return
        sched = self.config.scheduler
        self.store_down_since = time.monotonic()
        self.probe_wait = max(0.5, sched.retry_backoff_s)
        self.next_probe = self.store_down_since + self.probe_wait
        log.warning("the store is unreachable (%s): dispatch paused until it answers again "
                    "(probed every %g s at most); these attempts do not count", _why(exc),
                    sched.retry_backoff_max_s)

    def _store_paused(self) -> bool:
        """Whether dispatch waits for the store; probes it (backing off) when due."""
        if self.store_down_since is None:
            return False
        now = time.monotonic()
        if now < self.next_probe:
            return True
        if self.probe.reachable():
            log.warning("the store answers again after %.0f s: dispatch resumes",
                        now - self.store_down_since)
            self.store_down_since = None
            return False
        self.probe_wait = min(self.config.scheduler.retry_backoff_max_s, self.probe_wait * 2)
        self.next_probe = now + self.probe_wait
        return True

    # -- poison images: a shard that kills its workers runs image by image -----------------

    def _dispatch_images(self) -> None:
        for iso in self.isolations.values():
            if iso.rows is None:
                try:
                    rows = self.ledger.pending_rows(iso.shard).to_pylist()
                except StorageError as exc:
                    if is_outage(exc):
                        self._store_down(exc)
                    log.warning("shard %d: cannot read its rows yet: %s", iso.shard,
                                one_line(exc))
                    return
                iso.rows = {row["row_id"]: row for row in rows}
                self.image_queue.extend((iso.shard, row_id) for row_id in iso.rows)
                log.warning("shard %d: running its %d pending images one at a time", iso.shard,
                            len(rows))
        if not self.image_queue:
            for slot in self.actors.values():
                if slot.isolating and not slot.in_flight:
                    slot.isolating = False
            return
        reserved = [s for s in self.actors.values() if s.isolating]
        if not reserved:
            ready = [s for s in self.actors.values() if s.ready]
            if not ready:
                return
            # One worker is set apart (it drains its shards first): an image that kills it
            # then takes nothing else down, and its death names that image.
            slot = min(ready, key=lambda s: len(s.in_flight))
            slot.isolating = True
            reserved = [slot]
        for slot in reserved:
            if slot.ready and not slot.in_flight and self.image_queue:
                shard, row_id = self.image_queue.popleft()
                attempt = self.isolations[shard].attempt
                ref = slot.handle.process_rows.remote(self.ledger.job_root, shard, attempt,
                                                      [row_id])
                slot.in_flight[ref] = (shard, attempt)
                self.image_tasks[ref] = row_id
                self.refs[ref] = slot.name

    def _on_image(self, slot: ActorSlot, ref: Any) -> None:
        shard, _ = slot.in_flight.pop(ref)
        row_id = self.image_tasks.pop(ref)
        slot.deadlines.pop(ref, None)
        if not slot.in_flight:
            slot.idle_since = time.monotonic()
        iso = self.isolations[shard]
        assert iso.rows is not None
        try:
            results = self.ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - classified below
            if is_outage(exc) and (self.store_down_since is not None
                                   or not self.probe.reachable()):
                self._store_down(exc)
                self.image_queue.appendleft((shard, row_id))
                return
            lost = _is_lost(exc)
            if lost:
                self._retire(slot)
            sched = self.config.scheduler
            tries = iso.tries[row_id] = iso.tries.get(row_id, 0) + 1
            limit = sched.isolate_after if lost else sched.max_attempts
            row = iso.rows[row_id]
            what = "killed its worker" if lost else "failed"
            log.warning("shard %d: %s %s when run alone (%d of %d): %s", shard, row["key"],
                        what, tries, limit, one_line(exc))
            if tries < limit:
                self.image_queue.appendleft((shard, row_id))
                return
            iso.results[row_id] = result_row(
                row, attempt=iso.attempt, worker="driver", status="failed",
                reason="worker_crash" if lost else "shard_error", finished_at=time.time(),
                error=f"{row['key']}: {what} {tries} times when run alone: {one_line(exc)}")
            iso.done.add(row_id)
            return
        for result in results:
            iso.results[result["row_id"]] = result
        iso.done.add(row_id)  # no result: it was already ok (another attempt committed it)

    def _finish_isolations(self, progress: Progress) -> None:
        """Commit an isolated shard once every image of it has its answer."""
        for shard, iso in list(self.isolations.items()):
            if iso.rows is None or len(iso.done) < len(iso.rows):
                continue
            results = list(iso.results.values())
            try:
                summary = self.ledger.commit(shard, results) if results else None
            except StorageError as exc:  # kept, and committed on a later pass
                if is_outage(exc):
                    self._store_down(exc)
                log.warning("shard %d: could not commit yet: %s", shard, one_line(exc))
                continue
            del self.isolations[shard]
            ok = sum(r["status"] == "ok" for r in results)
            reasons: dict[str, int] = {}
            for r in results:
                if r["status"] != "ok":
                    reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
            log.warning("shard %d done image by image: %d ok, %d failed %s", shard, ok,
                        len(results) - ok, reasons or "")
            progress.shards_done += 1
            progress.rows_done += len(results)
            progress.ok += ok
            progress.failed += len(results) - ok
            if summary is not None:
                self.index[shard] = summary
                self.index_dirty = True
            if self.metrics is not None:
                self.metrics.observe_shard({"worker": "driver", "ok": ok,
                                            "failed": len(results) - ok,
                                            "metrics": {"reasons": reasons}})

    # -- bounded waits: worker start and shard deadlines -----------------------------------

    def _watch(self, progress: Progress) -> None:
        """Once a second: fail the run if no worker can be placed, kill hung workers."""
        now = time.monotonic()
        if now - self.last_watch < 1.0:
            return
        self.last_watch = now
        self._check_start(progress, now)
        for slot in list(self.actors.values()):
            late = [ref for ref, deadline in slot.deadlines.items()
                    if now > deadline and ref in slot.in_flight]
            if late:
                self._kill_hung(slot, late, progress)

    def _shard_deadline(self) -> float:
        """max(floor, factor x shard_size x p95 seconds per image), or the unmeasured one."""
        sched = self.config.scheduler
        if not self.per_image_s:
            return sched.shard_deadline_unmeasured_s
        times = sorted(self.per_image_s)
        p95 = times[min(len(times) - 1, math.ceil(0.95 * len(times)) - 1)]
        return max(sched.shard_deadline_floor_s,
                   sched.shard_deadline_factor * self.config.shard_size * p95)

    def _kill_hung(self, slot: ActorSlot, late: list[Any], progress: Progress) -> None:
        """Kill an actor with a shard past its deadline; its shards go back to the queue.

        The late shards spend an attempt (a shard that hangs every worker ends as failed rows
        after max_attempts); the others in flight on it were only collateral and go back as
        they were."""
        late_shards = [slot.in_flight[ref] for ref in late]
        others = [v for ref, v in slot.in_flight.items() if ref not in late]
        log.error("worker %s: shard(s) %s passed their deadline; killing the worker and "
                  "retrying them elsewhere", slot.worker_id or slot.name,
                  ", ".join(str(shard) for shard, _ in late_shards))
        self._retire(slot)
        for shard, attempt in late_shards:
            exc = ShardTimeoutError(f"shard {shard} still running after its deadline "
                                    f"(scheduler.shard_deadline_*): worker killed")
            self._retry_or_fail(shard, attempt, "shard_timeout", exc, progress)
        self.queue.extendleft(reversed(others))

    def _check_start(self, progress: Progress, now: float) -> None:
        pending = [s for s in self.actors.values() if not s.ready]
        progress.waiting_for = self._pending_text(pending) if pending else ""
        if not pending or any(s.ready for s in self.actors.values()):
            return  # with one worker up the job goes on; more may come when capacity does
        waited = now - min(s.spawned for s in pending)
        if waited >= self.config.scheduler.worker_start_timeout_s:
            raise WorkerStartError(self._start_failure(waited))

    def _pending_text(self, pending: list[ActorSlot]) -> str:
        """What pending workers really wait for: those Ray has placed are starting (process,
        imports, model); the others wait for a node with the resources they ask for."""
        starting = sum(self._placed(slot) for slot in pending)
        placing = len(pending) - starting
        resources = f"{self._demand_text(self.shown_demand)}" or "a node"
        if not placing:
            return "the worker to load its model" if starting == 1 else \
                "the workers to load their model"
        if not starting:
            return resources
        return f"{starting} to load the model, {placing} for {resources}"

    def _placed(self, slot: ActorSlot) -> bool:
        """Whether Ray has given the actor a process (it is then starting, not waiting for
        resources). Read from the GCS actor table (``ray._private.state``: Ray's state API
        needs the dashboard, which the embedded Ray does not start); if that cannot be read,
        the actor counts as waiting for resources, as before."""
        try:
            from ray._private import state

            info = state.actors(slot.handle._actor_id.hex()) or {}
        except Exception:  # noqa: BLE001 - only the wording of the progress line depends on it
            return False
        return bool(info.get("Pid")) or bool((info.get("Address") or {}).get("Port"))

    def _demand_text(self, demand: dict[str, float] | None = None) -> str:
        demand = self.demand if demand is None else demand
        return ", ".join(f"{k}: {v:g}" for k, v in sorted(demand.items(), key=lambda kv: (
            kv[0] != "GPU", kv[0])) if v)

    def _start_failure(self, waited: float) -> str:
        """One line naming what no node offers (or saying that some node does)."""
        try:
            nodes = [n.get("Resources", {}) for n in self.ray.nodes() if n.get("Alive")]
        except Exception:  # noqa: BLE001 - the message is still useful without node details
            nodes = []
        wanted = {k: v for k, v in self.demand.items() if v}
        missing = {k: v for k, v in wanted.items()
                   if not any(res.get(k, 0) >= v for res in nodes)}
        fits = any(all(res.get(k, 0) >= v for k, v in wanted.items()) for res in nodes)
        if missing:
            what = f"no node offers {self._demand_text(missing)}"
        elif not fits:
            what = f"no single node offers {self._demand_text(wanted)}"
        else:
            what = (f"nodes offering {self._demand_text(wanted)} exist but stayed busy, or the "
                    f"worker is still loading its model")
        return (f"no worker started: {what} for {waited:.0f} s (each worker asks for "
                f"{self._demand_text(self.shown_demand)}); add such nodes or let the "
                f"autoscaler (its max workers) provide them, lower "
                f"worker.gpus_per_worker/cpus_per_worker, or raise "
                f"scheduler.worker_start_timeout_s")

class ShardTimeoutError(Exception):
    """A shard outlived its deadline: its actor is presumed hung and was killed."""


def _why(exc: BaseException) -> str:
    """One line from the worker's own exception when Ray relayed it (its ``cause``)."""
    return one_line(getattr(exc, "cause", None) or exc)


def _is_lost(exc: BaseException) -> bool:
    """The actor or its node is gone (as opposed to an exception raised by our code)."""
    return any(cls.__name__ in _LOST for cls in type(exc).__mro__)
