"""Failed images are named: the end of run/rerun lists the first 20, and `deblur status JOB
--failed [--reason R] [--json]` streams them all, one shard's result at a time."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deblur.cli import _report, app
from deblur.observe.job_text import failure_line
from deblur.io.storage import Storage
from deblur.job.ledger import Ledger
from deblur.run.driver import JobOutcome
from deblur.run.pool import Progress
from deblur.run.worker import ShardProcessor
from tests.conftest import CountingStorage, identity, jpeg, make_job

BAD = 23  # text files posing as JPEGs: `corrupt` or `unsupported_format` rows


def _files() -> dict[str, bytes]:
    files = {f"bad/{i:02d}.jpg": b"not an image %d" % i for i in range(BAD)}
    files |= {"empty.jpg": b""}  # reason `empty`
    files |= {f"ok/{i}.jpg": jpeg(16, 16, i) for i in range(6)}
    return files


@pytest.fixture()
def ledger(tmp_path: Path) -> Ledger:
    """A job of 30 rows in shards of 5 (the 6 ok images fill the last two), all processed."""
    ledger = make_job(str(tmp_path), _files(), shard_size=5, **{"worker.io_threads": 2})
    processor = ShardProcessor(ledger.config(), identity, "w0", Storage())
    for shard in ledger.shard_ids():
        processor.process(ledger.job_root, shard, attempt=1)
    return ledger


def test_failed_rows_are_every_failure_in_shard_order(ledger: Ledger) -> None:
    rows = list(ledger.failed_rows())
    assert len(rows) == BAD + 1 == ledger.status().failed
    assert [r["row_id"] for r in rows] == sorted(r["row_id"] for r in rows)
    assert {r["reason"] for r in rows} <= {"corrupt", "unsupported_format", "empty"}
    empty = list(ledger.failed_rows("empty"))
    assert [Path(r["key"]).name for r in empty] == ["empty.jpg"]
    assert list(ledger.failed_rows("no_such_reason")) == []


def test_only_shards_with_failures_are_read(ledger: Ledger) -> None:
    counting = CountingStorage()
    index = Ledger(counting, ledger.job_root).index()
    clean = {s for s, summary in index.items() if not summary.failed}
    assert clean, "the fixture should have shards without failures"
    counting.whole.clear()
    list(Ledger(counting, ledger.job_root).failed_rows(index=index))
    read = {int(Path(uri).stem) for uri in counting.whole if "/results/" in uri}
    assert read == set(index) - clean


def test_status_failed_streams_lines_and_json(ledger: Ledger) -> None:
    runner = CliRunner()
    text = runner.invoke(app, ["status", ledger.job_root, "--failed"])
    assert text.exit_code == 0, text.output
    lines = text.output.splitlines()
    assert len(lines) == BAD + 1
    for line, row in zip(lines, ledger.failed_rows()):
        assert line == failure_line(row)
        key, reason, message = line.split(": ", 2)
        assert key == row["key"] and reason == row["reason"] and message
        assert not message.startswith(key)  # the key once, not twice
    as_json = runner.invoke(app, ["status", ledger.job_root, "--reason", "empty", "--json"])
    assert as_json.exit_code == 0, as_json.output
    rows = [json.loads(line) for line in as_json.output.splitlines()]
    assert len(rows) == 1 and rows[0]["reason"] == "empty" and rows[0]["error"]


def test_the_report_names_twenty_and_counts_the_rest(ledger: Ledger,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    outcome = JobOutcome(job_root=ledger.job_root, progress=Progress(shards_total=6,
                         started=time.monotonic()), status=ledger.status())
    assert _report(outcome, ledger) == 1
    err = capsys.readouterr().err.splitlines()
    named = [line for line in err if not line.startswith(("  failed ", "…"))]
    assert named == [failure_line(r) for r in list(ledger.failed_rows())[:20]]
    assert err[-1] == f"… and {BAD + 1 - 20} more: deblur status {ledger.job_root} --failed"
