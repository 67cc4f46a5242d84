"""Storage and a whole shard pipeline through a proxy that throttles and resets connections."""

from __future__ import annotations

import logging

import pytest

from deblur.config import StorageConfig
from deblur.errors import ThrottledError
from deblur.job.ledger import Ledger
from deblur.io.storage import Storage, join
from deblur.run.worker import ShardProcessor
from tests.conftest import identity, job_config, jpeg
from tests.faultproxy import FaultProxy

pytestmark = pytest.mark.integration

SECRET = "testing-secret-never-shown"


def test_retries_absorb_throttles_and_resets_and_are_logged(
        fault_proxy: FaultProxy, s3_bucket: str, caplog: pytest.LogCaptureFixture) -> None:
    store = Storage(StorageConfig(endpoint_url=fault_proxy.url, retry_mode="standard",
                                  max_attempts=10))
    with caplog.at_level(logging.WARNING, "deblur.io.storage"):
        for i in range(40):
            uri = join(s3_bucket, f"k/{i}")
            store.put(uri, str(i).encode())
            assert store.get(uri) == str(i).encode()
        assert len(list(store.list(s3_bucket + "/k"))) == 40
    assert fault_proxy.throttled >= 3 and fault_proxy.reset >= 3
    assert store.retries >= fault_proxy.throttled + fault_proxy.reset - 2
    assert "retrying" in caplog.text and SECRET not in caplog.text


def test_throttled_after_every_retry_is_a_typed_error(
        fault_proxy: FaultProxy, s3_bucket: str) -> None:
    fault_proxy.throttle_all = True
    store = Storage(StorageConfig(endpoint_url=fault_proxy.url, retry_mode="standard",
                                  max_attempts=2))
    with pytest.raises(ThrottledError, match=f"{s3_bucket}/x") as info:
        store.get(s3_bucket + "/x")
    assert "SlowDown" in str(info.value) and SECRET not in str(info.value)


def test_job_through_faults_accounts_every_row_once(
        fault_proxy: FaultProxy, s3_bucket: str, storage: Storage) -> None:
    for i in range(30):
        storage.put(f"{s3_bucket}/in/{i:02d}.jpg", jpeg(32, 24, i))
    storage.put(f"{s3_bucket}/in/broken.jpg", b"not a jpeg")
    job = job_config(f"{s3_bucket}/in", f"{s3_bucket}/out", f"{s3_bucket}/jobs/j1", shard_size=8,
                     **{"storage.endpoint_url": fault_proxy.url,
                        "storage.retry_mode": "standard", "worker.io_threads": 4})
    flaky = Storage(job.storage)
    ledger = Ledger.create(flaky, job, job_id="j1", model_info={})
    processor = ShardProcessor(job, identity, "w0", flaky)
    for shard in ledger.shard_ids():
        processor.process(ledger.job_root, shard, 1)
    rows = [r for s in ledger.shard_ids() for r in ledger.read_result(s).to_pylist()]
    assert sorted(r["row_id"] for r in rows) == list(range(31))
    status = {r["key"].rsplit("/", 1)[1]: r["status"] for r in rows}
    assert status.pop("broken.jpg") == "failed" and set(status.values()) == {"ok"}
    assert flaky.retries > 0 and fault_proxy.throttled > 0 and fault_proxy.reset > 0
    for row in rows:
        if row["status"] == "ok":
            assert storage.head(row["output_key"]).size == row["bytes_out"]
