"""Autoscaling with Ray's fake multi-node provider: pending GPU actors bring up GPU nodes.

The job's pending worker actors (each asking for one GPU, on a head without GPUs) must make
the autoscaler launch GPU worker nodes, and those nodes must go away once the job is over and
its actors are gone. The cluster is started with `ray start` (run serially: it is the only Ray
of this test run while it lives) and stopped by stopping this run's Ray processes only.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest

from deblur import config as config_mod
from deblur.job.ledger import Ledger
from deblur.run.driver import execute, open_or_plan
from deblur.io.storage import Storage

from .helpers import assert_each_row_once, stop_ray_of_this_run, write_inputs

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _gpu_nodes() -> int:
    import ray

    return sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("GPU", 0) > 0)


@pytest.fixture
def autoscaling_cluster(monkeypatch: pytest.MonkeyPatch):
    import subprocess

    import ray
    from ray import cluster_utils
    from ray.cluster_utils import AutoscalingCluster

    class OnlyThisRunsRay:
        """`subprocess` as cluster_utils sees it, but its `ray stop --force` (which stops every
        Ray on the machine, another test run's too) stops only this run's Ray."""

        def __getattr__(self, name: str):
            return getattr(subprocess, name)

        @staticmethod
        def check_call(cmd, *args, **kwargs):
            if list(cmd[:3]) == ["ray", "stop", "--force"]:
                return stop_ray_of_this_run()
            return subprocess.check_call(cmd, *args, **kwargs)

    monkeypatch.setattr(cluster_utils, "subprocess", OnlyThisRunsRay())

    class FakeProviderCluster(AutoscalingCluster):
        # The PyPI wheel lacks fake_multi_node/example.yaml: build the same config in code.
        def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False,
                             **config_kwargs):
            node_types = dict(worker_node_types)
            node_types["ray.head.default"] = {"resources": head_resources, "node_config": {},
                                              "max_workers": 0}
            config = {
                "cluster_name": "fake_multinode", "max_workers": 4,
                "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                             "disable_node_updaters": True,
                             "disable_launch_config_check": True},
                "available_node_types": node_types, "head_node_type": "ray.head.default",
                "auth": {"ssh_user": "ubuntu"}, "file_mounts": {},
                "cluster_synced_files": [], "file_mounts_sync_continuously": False,
                "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [],
                "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
                "head_start_ray_commands": [], "worker_start_ray_commands": [],
                "idle_timeout_minutes": 0.1, "upscaling_speed": 1.0,
            }
            config.update(config_kwargs)
            return config

    # It shells out to `ray start`/`ray stop`: the venv's bin/ must come first on PATH.
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    cluster = FakeProviderCluster(
        head_resources={"CPU": 1},
        worker_node_types={"gpu_worker": {"resources": {"CPU": 1, "GPU": 1},
                                          "node_config": {}, "min_workers": 0,
                                          "max_workers": 2}},
    )
    cluster.start()
    ray.init("auto")
    yield
    ray.shutdown()
    cluster.shutdown()


def test_pending_gpu_actors_scale_the_cluster_up_and_idle_nodes_down(
        autoscaling_cluster: None, tmp_path: Path) -> None:
    storage = Storage()
    src = str(tmp_path / "src")
    write_inputs(storage, src, 16, size=(64, 64))
    job = config_mod.load(None, {
        "source": src, "destination": str(tmp_path / "out"), "job_root": str(tmp_path / "job"),
        "shard_size": 2, "model.random_weights": True, "scheduler.min_workers": 0,
        "scheduler.max_workers": 2, "scheduler.idle_timeout_s": 1.0,
        "scheduler.address": "auto"})
    assert _gpu_nodes() == 0
    ledger = open_or_plan(job, storage, resume=False)
    peak = [0]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _gpu_nodes())
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    outcome = execute(job, ledger, ledger.shard_ids(), 16)
    done.set()
    assert outcome.complete
    assert_each_row_once(Ledger.open(storage, ledger.job_root), 16)
    assert peak[0] >= 1, "no GPU node was launched for the pending actors"
    deadline = time.monotonic() + 90
    while _gpu_nodes() > 0 and time.monotonic() < deadline:
        time.sleep(1)
    assert _gpu_nodes() == 0, "idle GPU nodes were not removed after the job"
