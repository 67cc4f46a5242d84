"""`run --resume` honours the flags given now; later commands use the job's recorded storage.

The resume test runs a real `deblur run --resume` (in-process Ray) on a planned job; the
storage tests keep a job root on disk whose images live on the moto server, and run
`deblur report` with no endpoint in its environment: only the endpoint recorded in job.json
can reach the images it shows.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest

from deblur.io.storage import Storage, join
from deblur.job.ledger import Ledger, recorded_storage
from deblur.job.results import RESULT_SCHEMA
from deblur.config import StorageConfig
from tests.conftest import free_port, job_config, jpeg, make_job

DEBLUR = [sys.executable, "-m", "deblur.cli"]


@pytest.mark.integration
@pytest.mark.slow
def test_resume_applies_the_flags_given_now(tmp_path: Path) -> None:
    root = str(tmp_path)
    ledger = make_job(root, {"a.jpg": jpeg(32, 24), "b.jpg": jpeg(32, 24, 1)})
    stored = ledger.config()
    port = free_port()
    assert stored.metrics.port != port and stored.scheduler.max_workers == 1
    done = subprocess.run(
        [*DEBLUR, "run", join(root, "src"), join(root, "out"), "--job-root", ledger.job_root,
         "--resume", "--random-weights", "--metrics-port", str(port), "--max-workers", "2",
         "-q"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    # The driver served /metrics on the port given now, not the stored one.
    assert f":{port}/metrics" in done.stderr, done.stderr
    assert Ledger.open(Storage(), ledger.job_root).status().ok == 2


def test_job_records_its_storage_without_credentials(s3_bucket: str, moto_server: str
                                                     ) -> None:
    ledger = make_job(s3_bucket, {"a.jpg": b"x"}, Storage(StorageConfig()))
    text = Storage().get(join(ledger.job_root, "job.json")).decode()
    job = json.loads(text)
    # The endpoint came from the environment (AWS_ENDPOINT_URL), not the config: recorded.
    assert job["config"]["storage"]["endpoint_url"] is None
    assert job["storage"]["endpoint_url"] == moto_server
    assert job["storage"]["retry_mode"] == "adaptive" and job["storage"]["region"]
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in text
    assert os.environ["AWS_ACCESS_KEY_ID"] not in json.dumps(job["storage"])
    hidden = recorded_storage(StorageConfig(endpoint_url="http://user:pass@minio:9000/"))
    assert hidden["endpoint_url"] == "http://minio:9000/"


def test_report_and_status_use_the_recorded_endpoint(s3_bucket: str, moto_server: str,
                                                     tmp_path: Path) -> None:
    storage = Storage()
    src, out = join(s3_bucket, "src"), join(s3_bucket, "out")
    for name in ("a.jpg", "b.jpg"):
        storage.put(join(src, name), jpeg(40, 32))
    job_root = str(tmp_path / "job")  # on disk; the images are on the S3 endpoint
    config = job_config(src, out, job_root, **{"storage.retry_mode": "standard",
                                                "storage.max_attempts": 2})
    ledger = Ledger.create(storage, config, job_id="recorded", model_info={})
    rows = ledger.read_shard(0).to_pylist()
    for row in rows:
        storage.put(row["output_key"], jpeg(40, 32, 7))
    ledger.commit(0, pa.Table.from_pylist(
        [{**row, "status": "ok", "width": 40, "height": 32, "finished_at": time.time()}
         for row in rows],
        schema=RESULT_SCHEMA))
    env = {k: v for k, v in os.environ.items()
           if k not in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")}
    opened = Ledger.open_recorded(job_root)  # what the commands open (env as in this test)
    assert (opened.storage.config.retry_mode, opened.storage.config.max_attempts) == (
        "standard", 2)
    report = subprocess.run([*DEBLUR, "report", job_root], capture_output=True, text=True,
                            timeout=300, env=env)
    assert report.returncode == 0, report.stderr
    qa = tmp_path / "job" / "qa"
    assert sorted(p.name for p in qa.glob("*_before.jpg")), (report.stdout, report.stderr,
                                                            (qa / "index.json").read_text())
    status = subprocess.run([*DEBLUR, "status", job_root, "--json"], capture_output=True,
                            text=True, timeout=120, env=env)
    assert status.returncode == 0 and json.loads(status.stdout)["ok"] == 2
