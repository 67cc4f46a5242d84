"""Node loss mid-job on a real multi-node Ray (ray.cluster_utils.Cluster): nothing lost."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from deblur import config as config_mod
from deblur.job.ledger import Ledger
from deblur.run.driver import execute, open_or_plan
from deblur.io.storage import Storage

from .helpers import assert_each_row_once, wait_for_results, write_inputs

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    gpu_nodes = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    yield cluster, gpu_nodes
    ray.shutdown()
    cluster.shutdown()


def test_node_loss_mid_shard_retries_elsewhere(cluster, tmp_path: Path) -> None:
    import ray

    ray_cluster, gpu_nodes = cluster
    storage = Storage()
    src = str(tmp_path / "src")
    write_inputs(storage, src, 32, size=(96, 80))
    job = config_mod.load(None, {
        "source": src, "destination": str(tmp_path / "out"), "job_root": str(tmp_path / "job"),
        "shard_size": 2, "model.random_weights": True, "scheduler.min_workers": 2,
        "scheduler.max_workers": 2, "scheduler.max_attempts": 3,
        "scheduler.address": ray_cluster.address})
    ledger = open_or_plan(job, storage, resume=False)
    outcome: list = []
    driver = threading.Thread(target=lambda: outcome.append(
        execute(job, ledger, ledger.shard_ids(), 32)))
    driver.start()
    wait_for_results(storage, ledger.job_root, 2, timeout=180)
    # Both GPU nodes host one worker (one GPU each) with shards in flight: drop one.
    victim = gpu_nodes[0]
    ray_cluster.remove_node(victim, allow_graceful=False)
    driver.join(300)
    assert not driver.is_alive() and outcome, "the driver did not finish"
    assert outcome[0].complete and outcome[0].progress.retries >= 1
    table = assert_each_row_once(Ledger.open(storage, ledger.job_root), 32)
    assert set(table["status"].to_pylist()) == {"ok"}
    assert max(table["attempt"].to_pylist()) == 2, "the lost shard should show attempt 2"
    assert ray.is_initialized()
