"""Per-shard figures when two shards are in flight on one worker at once: storage retries,
engine busy time and batches are each reported by exactly one shard, the one they served, and
the shards' figures add up to the worker's totals (issue 14, point 15).

One job, two shards, one ShardProcessor running both concurrently: shard 0 reads local files,
shard 1 reads S3 (moto) through a proxy that throttles and resets connections, so every
storage retry belongs to shard 1. The inputs are held until all 12 fetches have started, so
both shards are in flight for the whole of each other's run, and 32-wide (shard 0) and
31-wide (shard 1) images tell the shards apart inside the model's batches."""

from __future__ import annotations

import math
import threading
from pathlib import Path

import numpy as np
import pytest

from deblur.config import StorageConfig
from deblur.io.storage import Storage, join
from deblur.job.ledger import Ledger
from deblur.run.worker import ShardProcessor
from tests.conftest import CountingStorage, identity, job_config, jpeg
from tests.faultproxy import FaultProxy

pytestmark = pytest.mark.integration

WAIT_S = 60.0
PER_SHARD = 6


def test_two_shards_in_flight_each_report_only_their_own(
        tmp_path: Path, s3_bucket: str, moto_server: str, fault_proxy: FaultProxy) -> None:
    direct = Storage(StorageConfig(endpoint_url=moto_server))
    local_src, s3_src = tmp_path / "in", join(s3_bucket, "in")
    lines = []
    for i in range(PER_SHARD):  # shard 0: local files, 32 wide
        direct.put(str(local_src / f"local/{i}.jpg"), jpeg(32, 32, i))
        lines.append(f"local/{i}.jpg")
    for i in range(PER_SHARD):  # shard 1: S3 objects, 31 wide
        direct.put(join(s3_src, f"remote/{i}.jpg"), jpeg(31, 32, 100 + i))
        lines.append(join(s3_src, f"remote/{i}.jpg"))
    manifest = local_src / "manifest.txt"
    manifest.write_text("\n".join(lines) + "\n")
    config = job_config(str(manifest), str(tmp_path / "out"), str(tmp_path / "job"),
                        shard_size=PER_SHARD, allow_prefixes=(str(local_src), s3_src),
                        **{"worker.io_threads": 2 * PER_SHARD, "batch.max_batch": 4,
                           "batch.max_wait_ms": 60_000})
    ledger = Ledger.create(direct, config, job_id="attribution", model_info={})
    assert [len(ledger.read_shard(s)) for s in ledger.shard_ids()] == [PER_SHARD, PER_SHARD]

    started = threading.Barrier(2 * PER_SHARD)

    def on_get(uri: str) -> None:
        if uri.startswith((str(local_src / "local"), join(s3_src, "remote"))):
            try:
                started.wait(WAIT_S)
            except threading.BrokenBarrierError:
                pass  # reported below

    calls: list[list[int]] = []  # image widths of each model call, in batch order
    lock = threading.Lock()

    def model(images: list[np.ndarray], shape: tuple[int, int] | None) -> list[np.ndarray]:
        with lock:
            calls.append([img.shape[1] for img in images])
        return identity(images, shape)

    storage = CountingStorage(StorageConfig(endpoint_url=fault_proxy.url,
                                            retry_mode="standard", max_attempts=10),
                              on_get=on_get)
    processor = ShardProcessor(ledger.config(), model, "w0", storage)
    reports: dict[int, dict] = {}
    errors: list[BaseException] = []

    def run(shard: int) -> None:
        try:
            reports[shard] = processor.process(ledger.job_root, shard, 1)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the assertions below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S * 2)
    assert not errors, errors
    assert not started.broken, "the 12 fetches never ran at once"
    assert [reports[s]["ok"] for s in (0, 1)] == [PER_SHARD, PER_SHARD]
    m0, m1 = reports[0]["metrics"], reports[1]["metrics"]

    # Storage retries: all of them were shard 1's requests (shard 0 never touched S3).
    assert fault_proxy.throttled + fault_proxy.reset > 0, "no fault was injected"
    assert storage.retries > 0
    assert m0["storage_retries"] == 0
    assert m1["storage_retries"] == storage.retries

    # Batches: each model call reported once, by the shard of its first image.
    assert sorted(len(c) for c in calls) == [4, 4, 4], calls
    assert any({31, 32} <= set(c) for c in calls), calls  # one batch served both shards
    expected = {0: sorted(len(c) for c in calls if c[0] == 32),
                1: sorted(len(c) for c in calls if c[0] == 31)}
    assert {s: sorted(size for size, _ in reports[s]["metrics"]["batches"]) for s in (0, 1)} \
        == expected
    _, engine_total_busy, _ = processor.engine.drain_stats()  # what nobody claimed
    assert engine_total_busy > 0

    # Busy time: split by image, so the shards' parts add up to the engine's total, and each
    # shard's part is its images' share (6 of the 12 images, batches of equal work).
    assert math.isclose(m0["busy_s"] + m1["busy_s"], processor.engine.busy_seconds,
                        rel_tol=1e-9)
    assert m0["busy_s"] > 0 and m1["busy_s"] > 0
    # The window figure stays for the utilisation gauge: each shard saw the whole engine run.
    assert m0["engine_busy_s"] >= m0["busy_s"] and m1["engine_busy_s"] >= m1["busy_s"]
