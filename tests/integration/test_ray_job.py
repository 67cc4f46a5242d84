"""End to end on a real local Ray with the real model: moto S3, resume, rerun, cancel."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from deblur.cli import app
from deblur.job.ledger import Ledger
from deblur.io.storage import Storage

from .helpers import assert_each_row_once, write_inputs

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_end_to_end_on_moto_s3(shared_ray: object, s3_bucket: str, storage: Storage) -> None:
    uris = write_inputs(storage, f"{s3_bucket}/in", 10)
    storage.put(f"{s3_bucket}/in/broken.jpg", b"\xff\xd8\xff not really a jpeg")
    result = CliRunner().invoke(app, [
        "run", f"{s3_bucket}/in/", f"{s3_bucket}/out/", "--random-weights",
        "--shard-size", "4", "--max-workers", "2", "--gpus-per-worker", "1", "-q",
        "--job-root", f"{s3_bucket}/jobs/e2e"])
    assert result.exit_code == 1, result.output  # one image failed, the rest written
    assert f"job root: {s3_bucket}/jobs/e2e" in result.output
    ledger = Ledger.open(storage, f"{s3_bucket}/jobs/e2e")
    table = assert_each_row_once(ledger, 11)
    rows = {r["key"]: r for r in table.to_pylist()}
    assert rows[f"{s3_bucket}/in/broken.jpg"]["status"] == "failed"
    for uri in uris:
        row = rows[uri]
        assert row["status"] == "ok", row
        assert row["output_key"] == uri.replace("/in/", "/out/")
        out = Image.open(io.BytesIO(storage.get(row["output_key"])))
        assert out.size == (row["width"], row["height"])
        assert out.size == Image.open(io.BytesIO(storage.get(uri))).size
    status = CliRunner().invoke(app, ["status", f"{s3_bucket}/jobs/e2e", "--json"])
    assert status.exit_code == 0 and '"ok": 10' in status.output and '"failed": 1' in status.output
    assert storage.exists(f"{s3_bucket}/jobs/e2e/summary.json")


def test_missing_weights_refuse_to_start(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["run", str(tmp_path / "src"), str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "--random-weights" in result.output


def test_rerun_after_fixing_failed_rows(shared_ray: object, tmp_path: Path) -> None:
    storage = Storage()
    src = str(tmp_path / "src")
    uris = write_inputs(storage, src, 6)
    hidden = Path(uris[2]).read_bytes()
    Path(uris[2]).unlink()
    root = str(tmp_path / "job")
    runner = CliRunner()
    # The manifest lists the missing image, so it becomes a failed row (not_found).
    manifest = tmp_path / "list.txt"
    manifest.write_text("\n".join(Path(u).relative_to(src).as_posix() for u in uris) + "\n")
    (tmp_path / "src" / "list.txt").write_text(manifest.read_text())
    first = runner.invoke(app, ["run", f"{src}/list.txt", str(tmp_path / "out"), "-q",
                                "--random-weights", "--shard-size", "2", "--job-root", root])
    assert first.exit_code == 1, first.output
    ledger = Ledger.open(storage, root)
    status = ledger.status()
    assert (status.ok, status.failed) == (5, 1) and "not_found" in status.failures_by_reason
    outputs = {r["output_key"]: Path(r["output_key"]).stat().st_mtime_ns
               for r in assert_each_row_once(ledger, 6).to_pylist() if r["status"] == "ok"}
    Path(uris[2]).write_bytes(hidden)
    second = runner.invoke(app, ["rerun", root, "-q"])
    assert second.exit_code == 0, second.output
    table = assert_each_row_once(ledger, 6)
    assert set(table["status"].to_pylist()) == {"ok"}
    for output, mtime in outputs.items():
        assert Path(output).stat().st_mtime_ns == mtime, f"{output} was rewritten"
