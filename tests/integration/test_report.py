"""Evaluation job with references -> QA sample -> report.html rendered in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from deblur.cli import app
from deblur.job.ledger import Ledger, run_throughput
from deblur.observe.qa import QASample
from deblur.observe.report import build
from deblur.dev.samples import reference_folder, write_samples
from deblur.io.storage import Storage
from deblur.observe.quality import psnr, ssim
from deblur.run.worker import ShardProcessor
from tests.conftest import jpeg, job_config, make_job, unsharp

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
        # The input against the same reference, measured where it was decoded (issue 25.5).
        blurry = np.asarray(Image.open(r["key"]).convert("RGB"))
        sharp = np.asarray(Image.open(_reference_of(r["key"])).convert("RGB"))
        assert r["psnr_in"] == pytest.approx(psnr(blurry, sharp), abs=1e-4)
        assert r["ssim_in"] == pytest.approx(ssim(blurry, sharp), abs=1e-5)
        assert r["psnr_in"] != pytest.approx(r["psnr"], abs=1e-3)
    reasons = {r["reason"] for r in rows if r["status"] == "failed"}
    assert reasons == {"not_found", "unsupported_format", "invalid_key"}


def _reference_of(key: str) -> Path:
    return reference_folder(Path(key).parent) / (Path(key).stem + ".png")


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
            "lowest_gain", "lowest_psnr_gain", "largest"} <= groups
    assert len({rid for rid, _ in first}) == len(first)


@pytest.mark.integration  # headless Chromium; the rest of the module runs in the quick tier
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


def _row(page: str, label: str) -> str:
    match = re.search(rf"<th>{re.escape(label)}</th><td>([^<]*)</td>", page)
    assert match, f"{label} row missing"
    return match.group(1)


def test_report_flags_random_weights_shows_evaluation_and_the_status_throughput(
        evaluated_job: Ledger) -> None:
    # The figure `deblur status` shows: the last run's images per second while workers ran.
    summary = {"run": {"images": 9, "worker_seconds": 4.0, "seconds": 30.0,
                       "images_per_s": 0.3}}
    evaluated_job.write_summary(summary)
    page = build(evaluated_job, samples_per_group=2)
    assert _row(page, "Throughput (images/s while workers ran)") == \
        f"{run_throughput(summary):.2f}" == "2.25"
    # The test job runs with random weights (config) and job.json records no provenance flag.
    assert 'id="random-weights"' in page and _row(page, "Weights") == "random (untrained)"
    # PSNR/SSIM of the 6 reference rows, input -> output and the gain: a table of the
    # distributions, then the sampled images, worst gain first.
    evaluation = page[page.index('id="evaluation"'):page.index('id="samples"')]
    for label in ("PSNR input (dB)", "PSNR output (dB)", "PSNR gain (dB)", "SSIM input",
                  "SSIM output", "SSIM gain"):
        assert f"<th>{label}</th><td>6</td>" in evaluation, label
    rows = [r for t in evaluated_job.iter_results() for r in t.to_pylist() if r["psnr"]]
    mean_in = np.mean([r["psnr_in"] for r in rows])
    mean_out = np.mean([r["psnr"] for r in rows])
    assert (f"PSNR {mean_in:.2f} → {mean_out:.2f} dB (gain {mean_out - mean_in:+.2f} dB)"
            in evaluation), evaluation
    shown = re.findall(r"</code></td><td>([0-9.]+) → ([0-9.]+) \(([-+][0-9.]+)\)</td>",
                       evaluation)
    gains = [float(g) for _, _, g in shown]
    assert gains and gains == sorted(gains)
    assert all(abs(float(b) - float(a) - float(g)) <= 0.011 for a, b, g in shown)
    # Large before/after views with a zoomed crop of each ok pick, side by side.
    assert page.count('<div class="row crops">') == page.count('<div class="row views">') > 0
    assert 'alt="after, zoomed crop"' in page


def test_status_and_metrics_show_before_after_and_the_gain(evaluated_job: Ledger) -> None:
    from deblur.job.results import quality_means
    from deblur.observe.metrics import JobMetrics

    index = evaluated_job.index()
    quality = quality_means(index.values())  # what the driver writes in summary.json
    rows = [r for t in evaluated_job.iter_results() for r in t.to_pylist() if r["psnr"]]
    assert quality["mean_psnr_in"] == pytest.approx(np.mean([r["psnr_in"] for r in rows]))
    assert quality["psnr_gain"] == pytest.approx(quality["mean_psnr"] - quality["mean_psnr_in"])
    assert quality["ssim_gain"] == pytest.approx(quality["mean_ssim"] - quality["mean_ssim_in"])
    evaluated_job.write_summary({"quality": quality, "run": {}})

    out = CliRunner().invoke(app, ["status", evaluated_job.job_root]).output
    assert (f"against the references (6 images, input -> output): PSNR "
            f"{quality['mean_psnr_in']:.2f} -> {quality['mean_psnr']:.2f} dB "
            f"({quality['psnr_gain']:+.2f} dB), SSIM {quality['mean_ssim_in']:.3f} -> "
            f"{quality['mean_ssim']:.3f} ({quality['ssim_gain']:+.3f})") in out, out

    metrics = JobMetrics("eval", "mimo-unet")
    for summary in index.values():
        metrics.observe_shard({"ok": summary.ok, "failed": summary.failed, "summary": summary})
    value = metrics.registry.get_sample_value
    assert value("deblur_reference_psnr_db", {"job_id": "eval", "image": "input"}) == \
        pytest.approx(quality["mean_psnr_in"])
    assert value("deblur_reference_psnr_db", {"job_id": "eval", "image": "output"}) == \
        pytest.approx(quality["mean_psnr"])
    assert value("deblur_reference_psnr_gain_db", {"job_id": "eval"}) == \
        pytest.approx(quality["psnr_gain"])
    assert value("deblur_reference_ssim_gain", {"job_id": "eval"}) == \
        pytest.approx(quality["ssim_gain"])


def test_real_weights_get_no_banner_and_plain_jobs_no_evaluation(tmp_path: Path) -> None:
    ledger = make_job(str(tmp_path), {"a.jpg": jpeg(32, 32, 1)}, job_id="plain")
    # What the driver records for real weights (deblur.model.weights.provenance).
    job = ledger.job()
    job["model"] = {"name": "mimo-unet", "weights": "s3://m/w.pkl", "weights_sha256": "ab" * 32,
                    "random_weights": False}
    ledger.storage.put(ledger.job_root.rstrip("/") + "/job.json", json.dumps(job).encode())
    page = build(Ledger.open(ledger.storage, ledger.job_root))
    assert 'id="random-weights"' not in page and _row(page, "Weights") == "ab" * 32
    assert 'id="evaluation"' not in page
    assert _row(page, "Throughput (images/s while workers ran)") == "–"  # no run yet


@pytest.mark.integration  # headless Chromium
def test_report_layout_in_chromium_large_pairs_and_labelled_axes(evaluated_job: Ledger,
                                                                 tmp_path: Path) -> None:
    page = build(evaluated_job, samples_per_group=2)
    # The page has no script; a copy gets one that writes the laid-out sizes into the DOM.
    probe = ("<script>const w = s => [...document.querySelectorAll(s)].map(i => "
             "Math.round(i.getBoundingClientRect().width)).join(',');"
             "document.body.dataset.views = w('.views img');"
             "document.body.dataset.crops = w('.crops img');</script></body>")
    out = tmp_path / "probe.html"
    out.write_text(page.replace("</body>", probe))
    chromium = shutil.which("chromium")
    assert chromium, "chromium missing: scripts/install_tools.sh installs it"
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu",
                          "--disable-dev-shm-usage", "--user-data-dir=" + str(tmp_path / "p"),
                          "--window-size=1200,3000", "--dump-dom", out.as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    sizes = {k: [int(v) for v in re.search(rf'data-{k}="([0-9,]+)"', dom.stdout).group(1)
                 .split(",")] for k in ("views", "crops")}
    # Each of before / after takes about half the page width (the 96x64 inputs are scaled up
    # to it), not a thumbnail; the crops likewise.
    assert sizes["views"] and min(sizes["views"]) >= 450, sizes
    assert sizes["crops"] and min(sizes["crops"]) >= 450, sizes
    svgs = re.findall(r"<svg.*?</svg>", dom.stdout, re.S)
    assert len(svgs) >= 3  # sharpness, PSNR, SSIM
    for svg in svgs:
        assert 'class="x-label"' in svg and 'class="y-label"' in svg
