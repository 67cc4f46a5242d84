"""Evaluation job with references -> QA sample -> report.html rendered in headless Chromium."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from deblur.cli import app
from deblur.job.ledger import Ledger
from deblur.observe.qa import QASample
from deblur.dev.samples import reference_folder, write_samples
from deblur.io.storage import Storage
from deblur.run.worker import ShardProcessor
from tests.conftest import job_config, unsharp

pytestmark = [pytest.mark.integration]


@pytest.fixture(scope="module")
def evaluated_job(tmp_path_factory: pytest.TempPathFactory) -> Ledger:
    root = tmp_path_factory.mktemp("eval")
    blurry = root / "blurry"
    paths = write_samples(blurry, count=6, seed=3, size=(96, 64))
    refs = reference_folder(blurry)
    keys = [p.name for p in paths] + ["missing.jpg", "bad.jpg", "../escape.jpg"]
    (blurry / "bad.jpg").write_bytes(b"<html>not an image</html>")
    references = [str(refs / (Path(k).stem + ".png")) for k in keys[:6]] + [None] * 3
    pq.write_table(pa.table({"key": keys, "reference": references}), blurry / "eval.parquet")
    job = job_config(str(blurry / "eval.parquet"), str(root / "out"), str(root / "job"),
                     shard_size=4)
    ledger = Ledger.create(Storage(), job, job_id="eval", model_info={"name": "mimo-unet"})
    processor = ShardProcessor(job, unsharp, "w0", Storage())
    for shard in ledger.shard_ids():
        processor.process(ledger.job_root, shard, 1)
    return ledger


def test_reference_rows_get_psnr_ssim_and_sharpness(evaluated_job: Ledger) -> None:
    rows = [r for t in evaluated_job.iter_results() for r in t.to_pylist()]
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 6 and len(rows) == 9
    for r in ok:
        assert 10 < r["psnr"] < 60 and 0 < r["ssim"] < 1
        assert r["sharpness_ratio"] > 1.0 and r["tenengrad_out"] > r["tenengrad_in"]
    reasons = {r["reason"] for r in rows if r["status"] == "failed"}
    assert reasons == {"not_found", "unsupported_format", "invalid_key"}


def test_qa_sample_is_deterministic_and_covers_every_failure(evaluated_job: Ledger) -> None:
    def pick(seed: int) -> list[tuple[int, str]]:
        sample = QASample(per_group=2, seed=seed)
        for table in evaluated_job.iter_results():
            sample.add(table)
        return [(p["row_id"], p["why"]) for p in sample.picks()]

    first = pick(0)
    assert first == pick(0)
    groups = {why for _, why in first}
    assert {"failed:not_found", "failed:unsupported_format", "failed:invalid_key",
            "lowest_gain", "largest"} <= groups
    assert len({rid for rid, _ in first}) == len(first)


def test_report_renders_in_headless_chromium(evaluated_job: Ledger, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    result = CliRunner().invoke(app, ["report", evaluated_job.job_root, "--out", str(out)])
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert Path(evaluated_job.job_root, "report.html").read_text() == page
    assert "src=\"http" not in page and "<script" not in page  # self-contained
    assert "../escape.jpg" in page and "PSNR" in page
    assert list(Path(evaluated_job.job_root, "qa").glob("*_after.jpg"))
    chromium = shutil.which("chromium")
    assert chromium, "chromium missing: scripts/install_tools.sh installs it"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--user-data-dir=" + str(tmp_path / "profile")]
    dom = subprocess.run([chromium, *flags, "--dump-dom", out.as_uri()], capture_output=True,
                         text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    for section in ("summary", "failures", "quality", "samples", "config"):
        assert f'id="{section}"' in dom.stdout, f"section {section} missing from rendered DOM"
    assert dom.stdout.count("data:image/jpeg;base64") >= 2 and "<svg" in dom.stdout
    shot = tmp_path / "report.png"
    subprocess.run([chromium, *flags, f"--screenshot={shot}", "--window-size=1200,3000",
                    out.as_uri()], capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 20_000  # a rendered page, not a blank one
