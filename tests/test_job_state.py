"""The job state `deblur status` and `deblur list` show, from the ledger alone: a job whose
run ended on an error (no worker could start) is never shown as merely pending."""

from __future__ import annotations

from pathlib import Path

from deblur.errors import WorkerStartError
from deblur.io.storage import Storage
from deblur.job.ledger import Ledger, default_job_root, list_jobs
from deblur.run.driver import _record_failure
from tests.conftest import job_config, jpeg, make_job


def test_states_from_planned_to_failed_to_start(tmp_path: Path) -> None:
    ledger = make_job(str(tmp_path), {"a.jpg": jpeg(8, 8)})
    assert ledger.state() == ("planned", None)
    ledger.acquire_lease(60.0)
    assert ledger.state() == ("running", None)
    ledger.release_lease()
    ledger.write_summary({"pending": 1})  # a summary written before states were recorded
    assert ledger.state() == ("stopped", None)
    _record_failure(ledger, WorkerStartError("no worker could start: no GPU"), {})
    assert ledger.state() == ("failed_to_start", "no worker could start: no GPU")
    summary = ledger.read_summary()
    assert summary is not None and summary["pending"] == 1 and summary["total"] == 1


def test_list_shows_the_state(tmp_path: Path) -> None:
    out = str(tmp_path / "out")
    Storage().put(str(tmp_path / "src" / "a.jpg"), jpeg(8, 8))
    job = job_config(str(tmp_path / "src"), out, default_job_root(out, "j1"))
    ledger = Ledger.create(Storage(), job, job_id="j1", model_info={})
    _record_failure(ledger, WorkerStartError("no worker could start: no GPU"), {})
    (listed,) = list_jobs(Storage(), out)
    assert listed["state"] == "failed_to_start" and "no GPU" in listed["error"]
