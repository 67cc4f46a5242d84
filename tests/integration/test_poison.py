"""A poison image: one input that kills its worker process whenever it is processed.

Real Ray, the real worker pipeline (fetch, decode, engine, encode, upload, commit) with a
stand-in model that calls ``os._exit`` on an image of one particular size. The shard holding
it kills its worker twice, is then run image by image, and the job ends with that one image
as a failed ``worker_crash`` row and every other image ok. Failed attempts are counted in the
ledger, so a driver that starts on a job whose shard already killed two workers goes straight
to running it image by image.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pytest

from deblur.io.storage import Storage, join
from deblur.job.ledger import Ledger
from tests.conftest import job_config, jpeg

from .helpers import assert_each_row_once

pytestmark = [pytest.mark.integration, pytest.mark.slow]

POISON = (29, 37)  # height, width of the image that kills the process


def _job(tmp_path: Path) -> Ledger:
    storage = Storage()
    src = str(tmp_path / "src")
    for i in range(9):
        size = (POISON[1], POISON[0]) if i == 4 else (48, 40)
        storage.put(join(src, f"img{i}.jpg"), jpeg(*size, seed=i))
    job = job_config(src, str(tmp_path / "out"), str(tmp_path / "job"), shard_size=3, **{
        "metrics.enabled": False, "scheduler.shards_per_worker": 1,
        "scheduler.max_attempts": 3, "scheduler.isolate_after": 2,
        "scheduler.retry_backoff_s": 0.1, "worker.io_threads": 2})
    return Ledger.create(storage, job, job_id="poison", model_info={})


def _run(ray: Any, ledger: Ledger, crashes: Path) -> Any:
    from deblur.config import from_dict
    from deblur.run.driver import execute
    from deblur.run.worker import ShardProcessor, WorkerActor, worker_name

    class PoisonWorker(WorkerActor):  # defined here: Ray ships it to the actor by value
        def __init__(self, config: dict[str, Any]) -> None:
            def infer(images: list, shape: Any) -> list:
                for image in images:
                    if tuple(image.shape[:2]) == POISON:
                        (crashes / uuid.uuid4().hex).touch()
                        os._exit(1)
                return [image.copy() for image in images]

            self.start_error = None
            self.processor = ShardProcessor(from_dict(config), infer, worker_name())

    crashes.mkdir(exist_ok=True)
    return execute(ledger.config(), ledger, ledger.shard_ids(), 9,
                   actor_class=ray.remote(PoisonWorker))


def _check(ledger: Ledger) -> None:
    table = assert_each_row_once(Ledger.open(Storage(), ledger.job_root), 9)
    failed = [r for r in table.to_pylist() if r["status"] != "ok"]
    assert [(r["key"].rsplit("/", 1)[1], r["reason"]) for r in failed] == [
        ("img4.jpg", "worker_crash")], failed
    assert "killed its worker" in failed[0]["error"]


def test_a_poison_image_ends_as_one_failed_row(shared_ray: Any, tmp_path: Path) -> None:
    ledger = _job(tmp_path)
    crashes = tmp_path / "crashes"
    outcome = _run(shared_ray, ledger, crashes)
    assert outcome.complete
    _check(ledger)
    # Twice with its shard, then twice alone (a second chance against a node loss).
    assert len(list(crashes.iterdir())) == 4
    record = ledger.read_attempt(1)
    assert (record["failures"], record["lost"]) == (2, 2)
    assert [h["reason"] for h in record["history"]] == ["worker_lost", "worker_lost"]


def test_a_restarted_driver_goes_on_counting(shared_ray: Any, tmp_path: Path) -> None:
    ledger = _job(tmp_path)
    # What a driver that died after the shard's second worker death left in the ledger.
    for _ in range(2):
        ledger.record_failure(1, "worker_lost", "actor died", lost=True)
    crashes = tmp_path / "crashes"
    outcome = _run(shared_ray, ledger, crashes)
    assert outcome.complete
    _check(ledger)
    assert len(list(crashes.iterdir())) == 2  # straight to image by image
