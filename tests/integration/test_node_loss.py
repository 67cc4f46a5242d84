"""A real multi-node Ray (ray.cluster_utils.Cluster: a head without GPUs and two one-GPU
nodes), one cluster for the module, as building one costs as much as a check on it: a worker
that cannot start on one node is retried on another and the job completes; then a node is
lost mid-job and nothing is lost. Node loss comes last: it takes a node away.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from deblur import config as config_mod
from deblur.job.ledger import Ledger
from deblur.run.driver import execute, open_or_plan
from deblur.run.worker import WorkerActor
from deblur.io.storage import Storage

from .helpers import assert_each_row_once, wait_for_results, write_inputs

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
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


@pytest.mark.skipif(torch.cuda.is_available(), reason="the injected fault is nvJPEG without CUDA")
def test_one_bad_node_is_avoided(cluster: Any, tmp_path: Path) -> None:
    import ray

    ray_cluster, _ = cluster
    storage = Storage()
    src = str(tmp_path / "src")
    write_inputs(storage, src, 6)
    marker = tmp_path / "bad-node"

    class FirstNodeIsBad(WorkerActor):  # defined here: Ray ships it to the actor by value
        """Fails to start on whichever node a worker tried first, as on a node whose GPU
        is unusable; starts normally everywhere else."""

        def __init__(self, config: dict[str, Any]) -> None:
            node = ray.get_runtime_context().get_node_id()
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(fd, node.encode())
                os.close(fd)
            except FileExistsError:
                pass
            if marker.read_text() == node:
                config = {**config, "codec": {**config["codec"], "backend": "nvjpeg"}}
            super().__init__(config)

    job = config_mod.load(None, {
        "source": src, "destination": str(tmp_path / "out"), "job_root": str(tmp_path / "job"),
        "shard_size": 2, "model.random_weights": True, "metrics.enabled": False,
        "scheduler.address": ray_cluster.address, "scheduler.worker_start_attempts": 2})
    ledger = open_or_plan(job, storage, resume=False)
    outcome = execute(job, ledger, ledger.shard_ids(), 6,
                      actor_class=ray.remote(FirstNodeIsBad))
    assert outcome.complete
    table = assert_each_row_once(Ledger.open(storage, ledger.job_root), 6)
    assert set(table["status"].to_pylist()) == {"ok"}
    logs = list(Path(ledger.job_root, "logs").glob("worker-start-*.txt"))
    assert len(logs) == 1 and marker.read_text() in logs[0].read_text()
    assert ledger.read_summary()["state"] == "finished"


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
