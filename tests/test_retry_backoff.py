"""The pool's retries: counted in the ledger (a new driver goes on counting) and backed off.

The pool's bookkeeping only, on a real ledger in a local folder; no actor is started (Ray is
imported, never initialised). Worker loss, poison images and outages on real Ray are in
tests/integration/test_poison.py and test_outage.py.
"""

from __future__ import annotations

import time
from pathlib import Path

from deblur.run.pool import ActorPool, Progress
from tests.conftest import make_job


def test_retries_back_off_and_their_count_survives_the_driver(tmp_path: Path) -> None:
    ledger = make_job(str(tmp_path), {f"{i}.jpg": b"x" for i in range(5)}, shard_size=1, **{
        "scheduler.max_attempts": 9, "scheduler.retry_backoff_s": 10.0,
        "scheduler.retry_backoff_max_s": 30.0})
    pool = ActorPool(ledger.config(), ledger)
    progress = Progress(shards_total=5)
    before = time.monotonic()
    for shard, attempt in ((0, 1), (1, 2), (2, 3), (3, 4)):
        pool._retry_or_fail(shard, attempt, "shard_error", RuntimeError("boom"), progress)
    after = time.monotonic()
    # Doubling per attempt spent, capped; nothing is due yet, so nothing is queued.
    waits = {shard: (ready - before, ready - after) for ready, shard, _ in pool.delayed}
    for shard, wait in ((0, 10.0), (1, 20.0), (2, 30.0), (3, 30.0)):
        assert waits[shard][1] <= wait <= waits[shard][0], (shard, waits[shard])
    pool._release_delayed()
    assert not pool.queue and progress.retries == 4
    assert sorted((s, a) for _, s, a in pool.delayed) == [(0, 2), (1, 3), (2, 4), (3, 5)]

    # Recorded in the ledger: a driver started now continues each shard's count.
    assert ledger.read_attempt(2)["failures"] == 1
    assert ledger.read_attempt(2)["history"][0]["reason"] == "shard_error"
    restarted = ActorPool(ledger.config(), ledger)
    restarted._enqueue([0, 1, 2, 3, 4])
    assert list(restarted.queue) == [(0, 2), (1, 2), (2, 2), (3, 2), (4, 1)]


def test_a_shard_that_keeps_killing_workers_is_isolated(tmp_path: Path) -> None:
    ledger = make_job(str(tmp_path), {f"{i}.jpg": b"x" for i in range(2)}, shard_size=2, **{
        "scheduler.max_attempts": 3, "scheduler.isolate_after": 2})
    pool = ActorPool(ledger.config(), ledger)
    progress = Progress(shards_total=1)
    lost = RuntimeError("actor died")
    pool._retry_or_fail(0, 1, "worker_lost", lost, progress)
    assert not pool.isolations and len(pool.delayed) == 1
    pool._retry_or_fail(0, 2, "worker_lost", lost, progress)
    assert list(pool.isolations) == [0] and pool.isolations[0].attempt == 3
    # A new driver goes straight to image by image.
    restarted = ActorPool(ledger.config(), ledger)
    restarted._enqueue([0])
    assert not restarted.queue and list(restarted.isolations) == [0]
    assert ledger.read_attempt(0)["lost"] == 2
