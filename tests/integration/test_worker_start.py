"""A worker that cannot start: one clear line, the traceback in the job's log, the state in
the ledger; one bad node among several is avoided and the job completes.

The fault is real: a worker told to decode with nvJPEG on a machine without CUDA raises in
its constructor, as a worker on a node without a usable GPU (or with a broken image) does.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch

from deblur import config as config_mod
from deblur.errors import WorkerStartError
from deblur.io.storage import Storage
from deblur.job.ledger import Ledger
from deblur.run.driver import execute, open_or_plan
from deblur.run.worker import WorkerActor

from .helpers import assert_each_row_once, run_cli, write_inputs

pytestmark = [pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(torch.cuda.is_available(),
                                 reason="the injected fault is nvJPEG without CUDA")]


def test_the_error_keeps_its_fields_across_pickling() -> None:
    exc = pickle.loads(pickle.dumps(WorkerStartError("no GPU", "n1", "host-a", "Traceback…")))
    assert (str(exc), exc.node_id, exc.host, exc.trace) == ("no GPU", "n1", "host-a",
                                                            "Traceback…")


def test_a_worker_that_cannot_start_fails_the_run_in_one_line(tmp_path: Path) -> None:
    storage = Storage()
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    write_inputs(storage, src, 4)
    config = tmp_path / "job.yaml"
    config.write_text("codec:\n  backend: nvjpeg\n")
    done = run_cli("run", src, out, "--random-weights", "--config", str(config),
                   "--metrics-port", "0", "-q")
    assert done.returncode == 4, done.stdout + done.stderr
    root = done.stdout.split("job root: ", 1)[1].split()[0]  # the default: under OUT
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr
    assert "no worker could start" in errors[0] and "nvJPEG cannot run here" in errors[0]
    assert "Traceback" not in done.stdout + done.stderr

    logs = sorted(Path(root, "logs").glob("worker-start-*.txt"))
    assert len(logs) == 1 and str(logs[0]) in errors[0]
    assert "Traceback" in logs[0].read_text() and "nvJPEG" in logs[0].read_text()
    summary = json.loads(Path(root, "summary.json").read_text())
    assert summary["state"] == "failed_to_start" and summary["pending"] == 4

    status = run_cli("status", root)
    assert "state: failed_to_start: no worker could start" in status.stdout, status.stdout
    listed = [json.loads(line) for line in run_cli("list", out, "--json").stdout.splitlines()]
    assert [job["state"] for job in listed] == ["failed_to_start"]


@pytest.fixture
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=1, num_gpus=1)
    ray.init(address=cluster.address)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_one_bad_node_is_avoided(cluster: Any, tmp_path: Path) -> None:
    import ray

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
        "scheduler.address": cluster.address, "scheduler.worker_start_attempts": 2})
    ledger = open_or_plan(job, storage, resume=False)
    outcome = execute(job, ledger, ledger.shard_ids(), 6,
                      actor_class=ray.remote(FirstNodeIsBad))
    assert outcome.complete
    table = assert_each_row_once(Ledger.open(storage, ledger.job_root), 6)
    assert set(table["status"].to_pylist()) == {"ok"}
    logs = list(Path(ledger.job_root, "logs").glob("worker-start-*.txt"))
    assert len(logs) == 1 and marker.read_text() in logs[0].read_text()
    assert ledger.read_summary()["state"] == "finished"
