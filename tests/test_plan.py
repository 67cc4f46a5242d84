"""`deblur plan`: exact counts and planted problems, header-only reads, nothing written."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import config as config_mod
from pipeline import plan as plan_mod
from pipeline.errors import ConfigError, NotFoundError
from pipeline.storage import Storage, join

DEBLUR = str(Path(sys.executable).parent / "deblur")


def _image(width: int, height: int, fmt: str, noise: bool = False) -> bytes:
    if noise:  # incompressible: a big file whose header is still at the front
        pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), np.uint8)
        img = Image.fromarray(pixels)
    else:
        img = Image.new("RGB", (width, height), (40, 90, 160))
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _planted(storage: Storage, root: str) -> str:
    """A manifest over images with known sizes and one of each problem; returns its URI."""
    small = _image(100, 50, "PNG")
    objects = {
        "a.png": small, "b.png": small, "sub/c.png": small, "x1.png": small,
        "big.jpg": _image(3000, 2000, "JPEG", noise=True),  # 6 MP, several MB
        "wide.png": _image(4000, 2000, "PNG"),  # 8 MP: over the test's max_pixels
        "empty.jpg": b"",
        "notes.jpg": b"hello, not an image",
        "trunc.png": small[:20],
    }
    for key, data in objects.items():
        storage.put(join(root, key), data)
    rows = [{"key": k} for k in objects]
    rows += [{"key": "a.png"},  # duplicate_key
             {"key": "../escape.jpg"},  # invalid_key
             {"key": "bell\x07.jpg"},  # invalid_key (control character)
             {"key": "x2.png", "output_key": "same.png"}]  # output_collision with x1
    rows[3]["output_key"] = "same.png"
    manifest = join(root, "manifest.jsonl")
    storage.put(manifest, "\n".join(json.dumps(r) for r in rows).encode())
    return manifest


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "s3":
        return request.getfixturevalue("s3_bucket") + "/plan"
    return str(tmp_path / "plan")


def _config(manifest: str, dest: str, **extra: object) -> config_mod.JobConfig:
    return config_mod.load(None, {"source": manifest, "destination": dest, "shard_size": 5,
                                  "codec.max_pixels": 7_000_000, "model.random_weights": True,
                                  **extra})


def test_plan_counts_sizes_and_problems_exactly(storage: Storage, root: str) -> None:
    manifest = _planted(storage, root)
    dest = join(root, "out")
    report = plan_mod.estimate(_config(manifest, dest), storage, gpus=4, sample_size=1000)

    assert (report.rows, report.valid, report.shards) == (13, 9, 3)
    assert report.invalid == {"duplicate_key": 1, "invalid_key": 2, "output_collision": 1}
    assert any("bell\\x07.jpg" in e for e in report.invalid_examples["invalid_key"])
    # the sample covers every valid row: megapixels are exact (unreadable images count 0)
    assert report.sampled == 9 and report.megapixels_exact
    assert report.megapixels == pytest.approx(4 * 0.005 + 6.0)
    assert report.sample_problems == {"too_large": 1, "empty": 1, "unsupported_format": 1,
                                      "corrupt": 1}
    assert report.histogram["<= 0.3 MP"] == 4 and report.histogram["<= 8 MP (4K)"] == 1
    assert report.formats == {"png": 4, "jpeg": 1}
    mp_per_s, _ = plan_mod.THROUGHPUT[("cpu-dev", "mimo-unet")]
    assert report.gpu_hours == pytest.approx(report.megapixels / mp_per_s / 3600)
    assert report.wall_hours == pytest.approx(report.gpu_hours / 4)
    assert report.requests["GET"] == 9 + 2 * 3 + 1 and report.requests["LIST"] == 0
    assert report.requests["PUT"] >= 9 + 2 * 3 + 1
    text = plan_mod.render(report)
    assert "would fail output_collision: 1" in text and "sample too_large: 1 of 9" in text


def test_plan_reads_headers_only_and_writes_nothing(storage: Storage, root: str) -> None:
    manifest = _planted(storage, root)
    dest = join(root, "out")
    big = storage.head(join(root, "big.jpg")).size
    assert big > 2 * plan_mod.HEADER_BYTES
    before = dict(storage.ops)
    report = plan_mod.estimate(_config(manifest, dest), storage, sample_size=1000)
    used = {k: v - before.get(k, 0) for k, v in storage.ops.items()}
    # every sampled image cost at most a header read (64 KiB; 1 MiB for long headers only)
    assert report.header_bytes_read < 9 * plan_mod.HEADER_BYTES
    assert used.get("PUT", 0) == 0 and used.get("DELETE", 0) == 0
    assert not storage.exists(join(dest, "_deblur/"))
    try:
        written = list(storage.list(dest))
    except NotFoundError:  # a local destination folder was never even created
        written = []
    assert written == []


def test_sample_is_seeded_and_scales_to_the_job(storage: Storage, tmp_path: Path) -> None:
    root = str(tmp_path)
    for i in range(60):
        storage.put(join(root, f"in/{i:03d}.png"), _image(100 + 10 * (i % 3), 50, "PNG"))
    config = _config(join(root, "in"), join(root, "out"))
    one = plan_mod.estimate(config, storage, sample_size=10, seed=7)
    two = plan_mod.estimate(config, storage, sample_size=10, seed=7)
    other = plan_mod.estimate(config, storage, sample_size=10, seed=8)
    assert one.to_dict() == two.to_dict() and one.sampled == 10 and not one.megapixels_exact
    assert one.megapixels != other.megapixels or one.formats == other.formats
    true_mp = sum((100 + 10 * (i % 3)) * 50 for i in range(60)) / 1e6
    assert one.megapixels == pytest.approx(true_mp, rel=0.15)
    assert one.requests["LIST"] == 1  # a listed prefix, not a manifest


def test_unknown_device_type_and_bad_numbers_fail_with_what_to_do(tmp_path: Path) -> None:
    config = _config(str(tmp_path / "m.jsonl"), str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="measured: cpu-dev"):
        plan_mod.estimate(config, Storage(), gpu_type="h100")
    with pytest.raises(ConfigError, match="--gpus"):
        plan_mod.estimate(config, Storage(), gpus=0)


def test_cli_plan_prints_and_writes_json_only_when_asked(storage: Storage,
                                                         tmp_path: Path) -> None:
    root = str(tmp_path / "plan")
    manifest = _planted(storage, root)
    out = tmp_path / "plan.json"
    done = subprocess.run([DEBLUR, "plan", manifest, str(tmp_path / "dest"), "--gpus", "2",
                           "--sample", "50", "--shard-size", "5", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "images:       13 rows, 9 valid, 3 shards" in done.stdout
    assert json.loads(out.read_text())["invalid"]["duplicate_key"] == 1
    assert not (tmp_path / "dest").exists()
    done = subprocess.run([DEBLUR, "plan", manifest, str(tmp_path / "dest"), "--gpu-type",
                           "h100"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "remain to be measured" in done.stderr
