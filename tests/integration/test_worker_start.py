"""A worker that cannot start: one clear line, the traceback in the job's log, the state in
the ledger. (One bad node among several is avoided and the job completes: in
tests/integration/test_node_loss.py, on that module's multi-node cluster.)

The fault is real: a worker told to decode with nvJPEG on a machine without CUDA raises in
its constructor, as a worker on a node without a usable GPU (or with a broken image) does.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from deblur.errors import WorkerStartError
from deblur.io.storage import Storage

from .helpers import run_cli, write_inputs

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
