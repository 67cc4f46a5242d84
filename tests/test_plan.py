"""`deblur plan`: exact counts and planted problems, header-only reads, nothing written."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from deblur import config as config_mod
from deblur.job import estimate as plan_mod
from deblur.errors import ConfigError, ManifestError, NotFoundError
from deblur.io.storage import Storage, join
from tests.conftest import CountingStorage, image_bytes, job_config
from tests.conftest import noise as noise_pixels

DEBLUR = str(Path(sys.executable).parent / "deblur")
SMALL_MP = 100 * 50 / 1e6


def _image(width: int, height: int, fmt: str, noise: bool = False, **options: object) -> bytes:
    # noise: incompressible, a big file whose header is still at the front
    img = noise_pixels(width, height) if noise else Image.new("RGB", (width, height),
                                                              (40, 90, 160))
    return image_bytes(img, fmt, **options)


def _planted(storage: Storage, root: str) -> str:
    """A manifest over images of known sizes and one of each problem; returns its URI."""
    small = _image(100, 50, "PNG")
    objects = {
        "a.png": small, "b.png": small, "sub/c.png": small, "x1.png": small,
        "big.jpg": _image(3000, 2000, "JPEG", noise=True, quality=95),  # 6 MP, several MB
        # a 200 KB ICC profile: the header runs past the first 64 KiB block
        "exif.jpg": _image(200, 100, "JPEG", icc_profile=b"\0" * 200_000),
        # libtiff writes the directory after the pixels: the header is at the end (~1.9 MB)
        "trail.tif": _image(700, 700, "TIFF", noise=True, compression="tiff_lzw"),
        "wide.png": _image(4000, 2000, "PNG"),  # 8 MP: over the test's max_pixels
        "empty.jpg": b"",
        "notes.jpg": b"hello, not an image",
        "trunc.png": small[:20],
    }
    for key, data in objects.items():
        storage.put(join(root, key), data)
    rows = [{"key": k} for k in objects]
    rows[3]["output_key"] = "same.png"
    rows += [{"key": "a.png"},  # duplicate_key
             {"key": "../escape.jpg"},  # invalid_key: escapes the output prefix
             {"key": "bell\x07.jpg"},  # invalid_key: control character
             {"key": "nul\x00.png"},  # invalid_key: NUL byte
             {"key": "k" * 1100 + ".png"},  # invalid_key: longer than 1024 bytes
             {"key": "x2.png", "output_key": "same.png"}]  # output_collision with x1.png
    manifest = join(root, "manifest.jsonl")
    storage.put(manifest, "\n".join(json.dumps(r) for r in rows).encode())
    return manifest


def _config(source: str, dest: str, **extra: object) -> config_mod.JobConfig:
    return job_config(source, dest, shard_size=5, **{"codec.max_pixels": 7_000_000}, **extra)


def test_plan_counts_sizes_problems_and_requests_exactly(storage: Storage, root: str) -> None:
    manifest = _planted(storage, root)
    report = plan_mod.estimate(_config(manifest, join(root, "out")), storage, gpus=4,
                               sample_size=1000)

    assert (report.rows, report.valid, report.shards) == (17, 11, 4)  # shards hold every row
    assert report.invalid == {"duplicate_key": 1, "invalid_key": 4, "output_collision": 1}
    shown = "\n".join(e for examples in report.invalid_examples.values() for e in examples)
    assert "bell\\x07.jpg" in shown and "\x07" not in shown and "\x00" not in shown
    assert all(len(e) <= plan_mod.EXAMPLE_CHARS + 1 for e in shown.splitlines())
    # the sample covers every valid row: megapixels are exact (images that would fail: 0)
    assert report.sampled == 11 and report.megapixels_exact and report.unverified == 0
    assert report.megapixels == pytest.approx(4 * SMALL_MP + 6.0 + 0.02 + 0.49)
    assert report.sample_problems == {"too_large": 1, "empty": 1, "unsupported_format": 1,
                                      "corrupt": 1}
    assert {k: v for k, v in report.histogram.items() if v} == {
        "<= 0.3 MP": 5, "<= 1 MP": 1, "<= 8 MP (4K)": 1}
    assert report.formats == {"png": 4, "jpeg": 2, "tiff": 1}

    mp_per_s, _ = plan_mod.THROUGHPUT[("cpu-dev", "mimo-unet")]
    assert report.gpu_hours == pytest.approx(report.megapixels / mp_per_s / 3600)
    assert report.wall_hours == pytest.approx(report.gpu_hours / 4)
    run_s = report.wall_hours * 3600  # ~25 s: no periodic index/snapshot write yet
    assert run_s < 30
    # Counted by hand from the code paths (and checked once against a real `deblur run`'s
    # storage requests, see docs/plan.md): 1 manifest + 11 images + 3 per shard + 3 index.
    assert report.requests == {
        "GET": 1 + 11 + 3 * 4 + 3,
        # 7 outputs (11 less the 4 sample failures), shard files, results, job.json,
        # summary.json, the final index and two metric snapshots
        "PUT": 7 + 4 + 4 + 1 + 1 + 1 + 2,
        "LIST": 3 + 1,
        "HEAD": 1 + 2 + math.ceil(run_s / 2),
    }
    assert report.request_cost_usd == pytest.approx(
        (27 * 0.0004 + 20 * 0.005 + 4 * 0.005 + report.requests["HEAD"] * 0.0004) / 1000)

    text = plan_mod.render(report)
    assert "images:       17 rows, 11 valid, 4 shards" in text
    assert "would fail output_collision: 1" in text and "sample too_large: 1 of 11" in text
    assert "\x07" not in text and "\x00" not in text


def test_plan_reads_headers_only_and_writes_nothing(storage: Storage, root: str) -> None:
    manifest = _planted(storage, root)
    dest = join(root, "out")
    counting = CountingStorage(storage.config)
    report = plan_mod.estimate(_config(manifest, dest), counting, sample_size=1000)

    assert counting.whole == []  # no object is read whole: no image, nor the manifest,
    # which streams by ranged GETs (one here: it is smaller than a block)
    assert [r for r in counting.ranges if r[0] == manifest] == [
        (manifest, 0, storage.head(manifest).size)]
    read: dict[str, int] = {}
    for uri, _, size in counting.ranges:
        if uri != manifest:
            read[uri] = read.get(uri, 0) + size
    assert report.header_bytes_read == sum(read.values())
    big = storage.head(join(root, "big.jpg")).size
    assert big > 20 * plan_mod.HEADER_BYTES
    assert read[join(root, "big.jpg")] == plan_mod.HEADER_BYTES  # one 64 KiB ranged read
    assert max(read.values()) <= plan_mod.HEADER_BYTES_MAX
    # the TIFF's directory was fetched where it lies (past 1 MiB), not by reading up to it
    tif = [start for uri, start, _ in counting.ranges if uri.endswith("trail.tif")]
    assert len(tif) <= 3 and max(tif) > plan_mod.HEADER_BYTES_MAX

    # reads only (Pillow's TIFF reader asks for the size: one HEAD); no PUT, DELETE, LIST
    assert report.plan_requests.keys() <= {"GET", "HEAD"}
    assert not storage.exists(join(dest, "_deblur/"))
    try:
        written = list(storage.list(dest))
    except NotFoundError:  # a local destination folder was never even created
        written = []
    assert written == []


def test_a_header_past_the_read_limit_is_unverified_not_failed(storage: Storage,
                                                                tmp_path: Path) -> None:
    root = str(tmp_path)
    storage.put(join(root, "in/ok.png"), _image(100, 50, "PNG"))
    storage.put(join(root, "in/long.jpg"), _image(100, 50, "JPEG", icc_profile=b"\0" * 1_300_000))
    report = plan_mod.estimate(_config(join(root, "in"), join(root, "out")), storage)
    assert report.unverified == 1 and report.sample_problems == {}
    assert "header_beyond_1MiB" in plan_mod.render(report)
    assert not report.megapixels_exact
    assert report.megapixels == pytest.approx(2 * SMALL_MP)  # assumed the sample's mean size
    assert report.header_bytes_read <= plan_mod.HEADER_BYTES + plan_mod.HEADER_BYTES_MAX


def test_sample_is_seeded_and_scales_to_the_job(storage: Storage, tmp_path: Path) -> None:
    root = str(tmp_path)
    for i in range(60):
        storage.put(join(root, f"in/{i:03d}.png"), _image(100 + 10 * (i % 3), 50, "PNG"))
    config = _config(join(root, "in"), join(root, "out"))
    one = plan_mod.estimate(config, storage, sample_size=10, seed=7)
    two = plan_mod.estimate(config, storage, sample_size=10, seed=7)
    assert one.to_dict() == two.to_dict() and one.sampled == 10 and not one.megapixels_exact
    others = [plan_mod.estimate(config, storage, sample_size=10, seed=s) for s in range(8, 12)]
    assert any(o.histogram != one.histogram or o.megapixels != one.megapixels for o in others)
    true_mp = sum((100 + 10 * (i % 3)) * 50 for i in range(60)) / 1e6
    assert one.megapixels == pytest.approx(true_mp, rel=0.15)
    assert one.requests["LIST"] == 1 + 3 + 1  # a listed prefix: the listing, then the ledger's


def test_bad_input_fails_with_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    config = _config(str(tmp_path / "m.jsonl"), str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="measured: cpu-dev"):
        plan_mod.estimate(config, Storage(), gpu_type="h100")
    with pytest.raises(ConfigError, match="--gpus"):
        plan_mod.estimate(config, Storage(), gpus=0)
    with pytest.raises(ManifestError, match="lists no images"):
        plan_mod.estimate(_config(str(tmp_path / "empty"), str(tmp_path / "out")), Storage())


def test_cli_plan_prints_and_writes_json_only_when_asked(storage: Storage,
                                                         tmp_path: Path) -> None:
    root = str(tmp_path / "plan")
    manifest = _planted(storage, root)
    out = tmp_path / "plan.json"
    job = tmp_path / "job.yaml"  # weights named but absent: a plan never loads them
    job.write_text("model:\n  weights: /nowhere/MIMO-UNet.pkl\ncodec:\n  max_pixels: 7000000\n")
    done = subprocess.run([DEBLUR, "plan", manifest, str(tmp_path / "dest"), "--config",
                           str(job), "--gpus", "2", "--sample", "50", "--shard-size", "5",
                           "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "images:       17 rows, 11 valid, 4 shards" in done.stdout
    saved = json.loads(out.read_text())
    assert saved["invalid"]["duplicate_key"] == 1
    assert saved["requests"]["GET"] == 27 + 1 + 2  # and the weights: the driver, 2 workers
    assert not (tmp_path / "dest").exists()

    done = subprocess.run([DEBLUR, "plan", manifest, str(tmp_path / "dest"), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and json.loads(done.stdout)["valid"] == 11

    done = subprocess.run([DEBLUR, "plan", manifest, str(tmp_path / "dest"), "--gpu-type",
                           "h100"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "measured: cpu-dev" in done.stderr
    assert "remain to be measured" in done.stderr
    assert not (tmp_path / "dest").exists()
