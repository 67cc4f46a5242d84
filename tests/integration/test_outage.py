"""A storage outage mid-job is not a worker loss: the driver pauses, then finishes the job.

Real Ray and the real worker pipeline against moto behind tests/faultproxy.py, which resets
every connection for some seconds once the first shard is committed: the driver and its
workers both lose the store. The driver must pause dispatch, spend no attempt on what failed
meanwhile, notice the store again by itself, and end with every image ok.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from deblur.config import StorageConfig
from deblur.io.storage import Storage, join
from deblur.job.ledger import Ledger
from tests.conftest import job_config, jpeg
from tests.faultproxy import FaultProxy

from .helpers import assert_each_row_once

pytestmark = [pytest.mark.integration, pytest.mark.slow]

IMAGES = 24
OUTAGE_S = 10.0


def test_a_storage_outage_pauses_the_job_and_it_completes(
        shared_ray: Any, fault_proxy: FaultProxy, s3_bucket: str, storage: Storage,
        tmp_path: Path) -> None:
    from deblur.config import from_dict
    from deblur.run.driver import execute
    from deblur.run.worker import ShardProcessor, WorkerActor, worker_name

    fault_proxy.enabled = False  # a healthy store until the outage
    for i in range(IMAGES):
        storage.put(join(s3_bucket, f"in/{i:02d}.jpg"), jpeg(48, 40, i))
    # Few client retries (so failures surface within the outage) and few attempts: without
    # the pause, the outage would use up every attempt of the shards it hits.
    job = job_config(join(s3_bucket, "in"), join(s3_bucket, "out"), join(s3_bucket, "job"),
                     shard_size=2, **{
                         "storage.endpoint_url": fault_proxy.url,
                         "storage.retry_mode": "standard", "storage.max_attempts": 2,
                         "scheduler.max_attempts": 2, "scheduler.retry_backoff_s": 0.2,
                         "scheduler.retry_backoff_max_s": 2.0, "metrics.enabled": False,
                         "worker.io_threads": 2})
    ledger = Ledger.create(Storage(job.storage), job, job_id="outage", model_info={})

    class SlowWorker(WorkerActor):  # defined here: Ray ships it to the actor by value
        def __init__(self, config: dict[str, Any]) -> None:
            def infer(images: list, shape: Any) -> list:
                time.sleep(0.3 * len(images))  # a model that takes its time
                return [image.copy() for image in images]

            self.start_error = None
            self.processor = ShardProcessor(from_dict(config), infer, worker_name())

    direct = Storage(StorageConfig())  # straight to moto, around the proxy
    outage: dict[str, Any] = {}

    def cut_the_store() -> None:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            results = join(ledger.job_root, "results")
            if any(True for _ in _listing(direct, results)):
                break
            time.sleep(0.1)
        outage["resets_before"] = fault_proxy.reset
        fault_proxy.drop_all = True
        outage["done_at_start"] = len(list(_listing(direct, join(ledger.job_root, "results"))))
        time.sleep(OUTAGE_S)
        fault_proxy.drop_all = False
        outage["resets"] = fault_proxy.reset - outage["resets_before"]

    cutter = threading.Thread(target=cut_the_store, daemon=True)
    cutter.start()
    try:
        outcome = execute(job, ledger, ledger.shard_ids(), IMAGES,
                          actor_class=shared_ray.remote(SlowWorker))
    finally:
        cutter.join(OUTAGE_S + 5)
    assert "resets" in outage, "the outage never started"
    assert outage["resets"] > 10, outage  # driver and workers really lost the store
    assert outage["done_at_start"] < len(ledger.shard_ids()), "the job ended before it"
    assert outcome.complete
    table = assert_each_row_once(Ledger.open(direct, ledger.job_root), IMAGES)
    assert set(table["status"].to_pylist()) == {"ok"}, table.to_pylist()
    # What failed while the store was down was not counted against its shard (one that failed
    # just as it came back, when a probe already answers, may count once).
    counted = Ledger(direct, ledger.job_root).read_attempts()
    assert all(r["failures"] <= 1 for r in counted.values()), counted


def _listing(storage: Storage, prefix: str) -> Any:
    from deblur.errors import NotFoundError

    try:
        yield from storage.list(prefix, (".parquet",))
    except NotFoundError:
        return
