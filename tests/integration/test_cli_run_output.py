"""A real `deblur run` (in-process Ray, random weights, 2 images) as a user sees it: Ray's and
the libraries' lines go to the job's log file, not the terminal; `--json` leaves exactly one
JSON object on stdout; off a terminal the progress is plain lines on stderr; `status` shows
the same throughput the run reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deblur.io.storage import Storage

from .helpers import write_inputs

pytestmark = [pytest.mark.integration, pytest.mark.slow]

DEBLUR = [sys.executable, "-m", "deblur.cli"]
RAY_LINES = ("Token authentication", "raylet", "ray._private", "Started a local Ray instance",
             "(WorkerActor", "pid=")


def test_ray_stays_in_the_log_file_and_json_is_clean(tmp_path: Path) -> None:
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    write_inputs(Storage(), src, 2)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS" and k != "RAY_AUTH_MODE"}
    done = subprocess.run([*DEBLUR, "run", src, out, "--random-weights", "--metrics-port", "0",
                           "--json"], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout)  # the whole of stdout: one JSON object
    assert summary["ok"] == 2 and summary["exit_code"] == 0 and summary["images_per_s"] > 0
    terminal = done.stdout + done.stderr
    assert not [s for s in RAY_LINES if s in terminal], terminal
    assert "\x1b[" not in terminal  # no colour or cursor codes off a terminal
    assert "2/2 images" in done.stderr or "/2 images" in done.stderr  # plain progress lines
    assert f"log: {summary['log']}" in done.stderr  # the path, printed once
    log = Path(summary["log"]).read_text()
    assert "Started a local Ray instance" in log and "Token authentication" in log

    status = subprocess.run([*DEBLUR, "status", summary["job_root"]], capture_output=True,
                            text=True, timeout=120)
    assert f"throughput: {summary['images_per_s']:.2f} images/s" in status.stdout, status.stdout
    assert "RANDOM weights" in status.stdout
