"""Codec backends: selection, the Pillow process pool, the nvJPEG glue, and the worker's use.

Without CUDA the nvJPEG backend runs here on the CPU with a Pillow stand-in for torchvision.io
(``_PillowOps``), which checks everything but the nvJPEG kernels: header verdicts, orientation,
metadata, grey, fallbacks, batching and the EXIF/ICC segments. The ``gpu`` tests pin the real
nvJPEG against Pillow.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.abc
import io
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms

from deblur import config as config_mod
from deblur.config import CodecConfig
from deblur.errors import ConfigError, ImageError
from deblur.io import codec
from deblur.io.codec import DecodedImage, PillowCodec, PillowProcessCodec
from deblur.io.codec_choice import make_codec, pool_processes
from deblur.io.nvjpeg import Coalescer, NvJpegCodec, orient, with_metadata
from deblur.io.storage import Storage
from deblur.run.worker import ShardProcessor
from tests.conftest import identity, image_bytes, jpeg, make_job, noise
from tests.pool_jobs import maybe_crash
from tests.test_codec import png16

CFG = CodecConfig()
ROOT = Path(__file__).resolve().parents[1]
ICC = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _exif(orientation: int | None = None) -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "TestCam"  # Make
    exif[0x0110] = "Model 1"  # Model
    if orientation is not None:
        exif[0x0112] = orientation
    return exif.tobytes()


def _rgb(w: int = 40, h: int = 30, seed: int = 0) -> Image.Image:
    return Image.fromarray(noise(w, h, seed))


def _with_alpha(mode: str) -> Image.Image:
    img = _rgb().convert(mode)
    img.putalpha(Image.fromarray(np.random.default_rng(1).integers(0, 255, (30, 40), np.uint8)))
    return img


def _palette_with_transparency() -> bytes:
    return image_bytes(_rgb().convert("P"), "PNG", transparency=0)


FIXTURES = {
    "orient6-icc.jpg": image_bytes(_rgb(40, 20), "JPEG", exif=_exif(6), icc_profile=ICC),
    "orient3.jpg": image_bytes(_rgb(40, 20, 1), "JPEG", exif=_exif(3)),
    "plain.jpg": image_bytes(_rgb(), "JPEG", quality=90),
    "grey.jpg": image_bytes(_rgb().convert("L"), "JPEG"),
    "cmyk.jpg": image_bytes(_rgb().convert("CMYK"), "JPEG"),
    "keep-rgb.jpg": image_bytes(_rgb(), "JPEG", keep_rgb=True),  # RGB, Adobe transform 0
    "rgba.png": image_bytes(_with_alpha("RGBA"), "PNG"),
    "la.png": image_bytes(_with_alpha("LA"), "PNG"),
    "palette-transparent.png": _palette_with_transparency(),
    "grey.png": image_bytes(_rgb().convert("L"), "PNG"),
    "sixteen.png": image_bytes(Image.fromarray(
        np.random.default_rng(2).integers(0, 65535, (30, 40)).astype(np.uint16)), "PNG"),
    "exif.webp": image_bytes(_rgb(), "WEBP", exif=_exif(8), icc_profile=ICC),
}


def _bomb() -> bytes:
    return image_bytes(Image.new("L", (20000, 20000)), "PNG")  # tiny file, 400M pixels


def _corrupt_png() -> bytes:
    data = bytearray(image_bytes(_rgb(64, 64), "PNG"))
    data[60:200] = b"\x00" * 140
    return bytes(data)


BAD = {
    "empty.jpg": b"",
    "text.jpg": b"just some text, not an image",
    "truncated-header.jpg": jpeg(64, 64, 9)[:300],
    "truncated.jpg": jpeg(64, 64, 9)[:2000],  # the header whole, the scan cut short
    "anim.gif": image_bytes(_rgb(), "GIF"),
    "bomb.png": _bomb(),
    "float.tif": image_bytes(Image.fromarray(np.zeros((8, 8), np.float32), "F"), "TIFF"),
    "corrupt.png": _corrupt_png(),
    "passwd.jpg": b"root:x:0:0:root:/root:/bin/bash\nalice:x:1000:1000::/home/alice:/bin/sh\n",
    "report.jpg": b"%PDF-1.7\n1 0 obj <</Title (secret)>>",
    # what Pillow would silently reduce to one 8-bit frame (tests/test_codec.py has them all)
    "animated.webp": image_bytes(_rgb(), "WEBP", save_all=True, duration=100,
                                 append_images=[_rgb(seed=i) for i in range(1, 4)]),
    "animated.png": image_bytes(_rgb(), "PNG", save_all=True, append_images=[_rgb(seed=1)]),
    "pages.tif": image_bytes(_rgb(), "TIFF", save_all=True,
                             append_images=[_rgb(seed=1), _rgb(seed=2)]),
    "rgb48.png": png16(np.random.default_rng(3).integers(0, 65535, (6, 5, 3)).astype(np.uint16)),
}


BAD_REASONS = {"passwd.jpg": "unsupported_format", "report.jpg": "unsupported_format",
               "animated.webp": "multi_frame", "animated.png": "multi_frame",
               "pages.tif": "multi_frame", "rgb48.png": "unsupported_depth"}


def _inverted(pixels: np.ndarray) -> np.ndarray:
    return np.iinfo(pixels.dtype).max - pixels  # some "model output" other than the input


def assert_same_image(a: DecodedImage, b: DecodedImage) -> None:
    """Every field equal; pixels and alpha equal in value, dtype and shape."""
    for f in dataclasses.fields(DecodedImage):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            assert x is not None and y is not None, f.name
            assert x.dtype == y.dtype and x.shape == y.shape, f.name
            np.testing.assert_array_equal(x, y, err_msg=f.name)
        else:
            assert x == y, f.name


def _error(fn, *args) -> tuple[type, str, str]:
    with pytest.raises(Exception) as info:
        fn(*args)
    exc = info.value
    return type(exc), getattr(exc, "reason", ""), str(exc)


# -- configuration and selection -----------------------------------------------------------

@pytest.mark.parametrize(("overrides", "message"), [
    ({"codec.processes": -1}, "codec.processes=-1"),
    ({"codec.backend": "gpu"}, "codec.backend='gpu'"),
])
def test_codec_settings_are_validated(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_mod.load(None, {"model.random_weights": True, **overrides})


def test_codec_settings_load_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("codec:\n  processes: 3\n  backend: pillow\n")
    job = config_mod.load(path, {"model.random_weights": True})
    assert (job.codec.processes, job.codec.backend) == (3, "pillow")
    path.write_text("codec:\n  processes: null\n")
    assert config_mod.load(path, {"model.random_weights": True}).codec.processes is None
    assert config_mod.from_dict(job.to_dict()) == job


@pytest.mark.parametrize(("processes", "cuda", "cpus", "expected"), [
    (None, True, 16.0, 15), (None, True, 8.0, 7), (None, True, 3.0, 2), (None, True, 2.0, 0),
    (None, True, 1.0, 0), (None, True, 2.5, 0), (None, False, 16.0, 0),
    (0, True, 16.0, 0), (4, False, 1.0, 4),
])
def test_pool_size_rule(processes: int | None, cuda: bool, cpus: float, expected: int,
                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert pool_processes(CodecConfig(processes=processes), cuda, cpus) == expected


def test_auto_pool_never_exceeds_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    assert pool_processes(CFG, True, 16.0) == 3


class _ImportRecorder(importlib.abc.MetaPathFinder):
    """Records (and refuses) every import of torchvision."""

    def __init__(self) -> None:
        self.attempts: list[str] = []

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001
        if name == "torchvision" or name.startswith("torchvision."):
            self.attempts.append(name)
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


@pytest.fixture()
def torchvision_imports(monkeypatch: pytest.MonkeyPatch) -> Iterator[_ImportRecorder]:
    recorder = _ImportRecorder()
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [recorder, *sys.meta_path])
    yield recorder


@pytest.mark.parametrize(("device", "reason"), [
    ("auto", "no CUDA device"), ("cpu", "model.device=cpu"), ("cuda", "no CUDA device")])
def test_cpu_selects_pillow_without_importing_torchvision(
        device: str, reason: str, torchvision_imports: _ImportRecorder,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.INFO, logger="deblur.io.codec_choice"):
        chosen = make_codec(CFG, device, 16.0)
    assert isinstance(chosen, PillowCodec)  # auto: a CPU model keeps its cores, no pool
    lines = [r.getMessage() for r in caplog.records if r.name == "deblur.io.codec_choice"]
    assert len(lines) == 1 and "pillow in-process" in lines[0] and reason in lines[0], lines
    assert torchvision_imports.attempts == [] and "torchvision" not in sys.modules


def test_cuda_without_torchvision_falls_back_with_the_reason(
        torchvision_imports: _ImportRecorder, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with caplog.at_level(logging.INFO, logger="deblur.io.codec_choice"):
        chosen = make_codec(CodecConfig(processes=0), "auto", 8.0)
    assert isinstance(chosen, PillowCodec)
    assert torchvision_imports.attempts, "with CUDA, nvJPEG should have been tried"
    (line,) = [r.getMessage() for r in caplog.records if r.name == "deblur.io.codec_choice"]
    assert "torchvision is not installed" in line and "docs/deploy.md" in line
    with pytest.raises(ConfigError, match="codec.backend=nvjpeg"):
        make_codec(CodecConfig(processes=0, backend="nvjpeg"), "auto", 8.0)


def test_backend_pillow_is_never_nvjpeg(torchvision_imports: _ImportRecorder,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    chosen = make_codec(CodecConfig(backend="pillow", processes=0), "cuda", 8.0)
    assert isinstance(chosen, PillowCodec) and torchvision_imports.attempts == []


def test_auto_pool_on_a_gpu_actor(torchvision_imports: _ImportRecorder,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    chosen = make_codec(CFG, "auto", 4.0)
    try:
        assert isinstance(chosen, PillowProcessCodec) and chosen.name == "pillow in 3 processes"
    finally:
        chosen.close()


# -- the process pool ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def pool() -> Iterator[PillowProcessCodec]:
    codec_ = PillowProcessCodec(CFG, 2)
    yield codec_
    codec_.close()


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_pool_decodes_and_encodes_exactly_like_in_process(pool: PillowProcessCodec,
                                                          name: str) -> None:
    data = FIXTURES[name]
    here = codec.decode(data, name, CFG)
    there = pool.decode(data, name)
    assert_same_image(there, here)
    output = _inverted(here.pixels)
    assert pool.encode(there, output) == codec.encode(here, output, CFG)


def test_pool_writes_forced_formats_exactly_like_in_process() -> None:
    cfg = CodecConfig(output_format="jpeg", quality=80)
    pooled = PillowProcessCodec(cfg, 1)
    try:
        for name in ("orient6-icc.jpg", "rgba.png", "sixteen.png", "exif.webp"):
            image = codec.decode(FIXTURES[name], name, cfg)
            assert pooled.encode(image, image.pixels) == codec.encode(image, image.pixels, cfg)
    finally:
        pooled.close()


@pytest.mark.parametrize("name", sorted(BAD))
def test_pool_errors_keep_reason_and_message(pool: PillowProcessCodec, name: str) -> None:
    here = _error(codec.decode, BAD[name], f"s3://b/{name}", CFG)
    there = _error(pool.decode, BAD[name], f"s3://b/{name}")
    assert there == here and here[0] is ImageError and f"s3://b/{name}" in here[2]
    assert here[1] == BAD_REASONS.get(name, here[1])
    assert "root:x" not in here[2] and "%PDF" not in here[2]  # never the object's bytes


def test_pool_encode_errors_keep_reason_and_message(pool: PillowProcessCodec) -> None:
    image = codec.decode(FIXTURES["plain.jpg"], "x.jpg", CFG)
    huge = Image.Exif()
    huge[0x9286] = "x" * 70_000  # UserComment: longer than a JPEG marker holds
    image.exif = huge.tobytes()
    here = _error(codec.encode, image, image.pixels, CFG)
    assert here[:2] == (ImageError, "encode_failed")
    assert _error(pool.encode, image, image.pixels) == here


def test_a_process_that_dies_fails_only_its_image() -> None:
    pooled = PillowProcessCodec(CFG, 3)
    crashed = ImageError("corrupt", "died")
    try:
        values = ["a", "b", "crash", "c", "d"]
        with ThreadPoolExecutor(len(values)) as threads:
            futures = [threads.submit(pooled._run, maybe_crash, (v,), crashed) for v in values]
        outcomes = {}
        for value, future in zip(values, futures):
            exc = future.exception()
            outcomes[value] = exc if exc is not None else future.result()
        assert outcomes.pop("crash") is crashed
        assert outcomes == {"a": "A", "b": "B", "c": "C", "d": "D"}
        assert pooled.restarts == 1 and not pooled.in_process
        image = pooled.decode(FIXTURES["plain.jpg"], "x.jpg")  # and the pool works again
        assert_same_image(image, codec.decode(FIXTURES["plain.jpg"], "x.jpg", CFG))
    finally:
        pooled.close()


_ORPHAN_SCRIPT = """
import os, signal
from deblur.config import CodecConfig
from deblur.io.codec import PillowProcessCodec, _ping
if __name__ == "__main__":
    pooled = PillowProcessCodec(CodecConfig(), 2)
    pids = set()
    while len(pids) < 2:  # both processes started
        pids |= set(pooled._pool._processes)
        [pooled._pool.submit(_ping) for _ in range(4)]
    print(" ".join(map(str, sorted(pids))), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # like Ray killing an actor: no cleanup runs
"""


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_pool_processes_leave_when_the_actor_is_killed(tmp_path: Path) -> None:
    script, out = tmp_path / "actor.py", tmp_path / "out.txt"
    script.write_text(_ORPHAN_SCRIPT)
    with out.open("w") as stream:  # not a pipe: do not wait for the pool processes to close it
        code = subprocess.run([sys.executable, str(script)], stdout=stream,
                              stderr=subprocess.STDOUT, timeout=120, cwd=ROOT).returncode
    assert code == -9, out.read_text()
    pids = [int(p) for p in out.read_text().split()]
    assert len(pids) == 2
    try:
        deadline = time.monotonic() + 15
        while any(_running(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_running(p) for p in pids), "pool processes outlived their actor"
    finally:
        for pid in pids:  # the test's own processes, should they have stayed
            if _running(pid):
                os.kill(pid, 9)


# -- the nvJPEG backend, on the CPU with Pillow standing in for nvJPEG ---------------------

class _PillowOps:
    """``torchvision.io`` as far as NvJpegCodec uses it, done with Pillow on the CPU: decoding
    ignores EXIF like nvJPEG does; encoding writes what Pillow's ``encode`` would, minus the
    metadata (which NvJpegCodec adds)."""

    class ImageReadMode(enum.Enum):
        GRAY = 1
        RGB = 3

    def __init__(self, fail_on: bytes | None = None, tolerant: bool = False) -> None:
        self.fail_on = fail_on
        self.tolerant = tolerant  # decode what Pillow refuses, as a lenient decoder might
        self.decode_calls: list[int] = []

    def decode_jpeg(self, input, mode, device):  # noqa: A002, ANN001
        single = isinstance(input, torch.Tensor)
        inputs = [input] if single else list(input)
        self.decode_calls.append(len(inputs))
        out = []
        for tensor in inputs:
            data = tensor.numpy().tobytes()
            if data == self.fail_on:
                raise RuntimeError("nvjpeg: simulated failure")
            img = Image.open(io.BytesIO(data))
            try:
                img = img.convert("L" if mode == self.ImageReadMode.GRAY else "RGB")
            except OSError:
                if not self.tolerant:
                    raise
                img = Image.new("L" if mode == self.ImageReadMode.GRAY else "RGB", img.size)
            array = np.asarray(img).reshape(img.height, img.width, -1).copy()
            out.append(torch.from_numpy(array).permute(2, 0, 1).to(device))
        return out[0] if single else out

    def encode_jpeg(self, input, quality):  # noqa: A002, ANN001
        single = isinstance(input, torch.Tensor)
        out = []
        for tensor in [input] if single else list(input):
            array = tensor.permute(1, 2, 0).contiguous().numpy()
            out.append(torch.frombuffer(bytearray(image_bytes(
                array, "JPEG", quality=quality, optimize=False)), dtype=torch.uint8))
        return out[0] if single else out


def _stand_in(cfg: CodecConfig = CFG, ops: _PillowOps | None = None) -> NvJpegCodec:
    return NvJpegCodec(cfg, PillowCodec(cfg), device="cpu", ops=ops or _PillowOps())


def _xmp_orientation(value: int) -> bytes:
    return (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/'
            b'02/22-rdf-syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/"'
            b' tiff:Orientation="%d"/></rdf:RDF></x:xmpmeta>' % value)


@pytest.mark.parametrize("method", [None, *Image.Transpose])
def test_orient_matches_pillow_transpose(method: Image.Transpose | None) -> None:
    img = _rgb(7, 5)
    expected = np.asarray(img if method is None else img.transpose(method))
    chw = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)
    np.testing.assert_array_equal(orient(chw, method).permute(1, 2, 0).numpy(), expected)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_stand_in_decode_applies_orientation_and_metadata_like_pillow(orientation: int) -> None:
    data = image_bytes(_rgb(40, 20, orientation), "JPEG", exif=_exif(orientation),
                       icc_profile=ICC)
    assert_same_image(_stand_in().decode(data, "x.jpg"), codec.decode(data, "x.jpg", CFG))


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_stand_in_decode_matches_pillow_on_every_fixture(name: str) -> None:
    assert_same_image(_stand_in().decode(FIXTURES[name], name),
                      codec.decode(FIXTURES[name], name, CFG))


def test_stand_in_follows_xmp_orientation_and_odd_exif() -> None:
    cases = {
        "xmp-only.jpg": image_bytes(_rgb(40, 20), "JPEG", xmp=_xmp_orientation(6)),
        "xmp-upright.jpg": image_bytes(_rgb(40, 20), "JPEG", xmp=_xmp_orientation(1)),
        "broken-exif.jpg": image_bytes(_rgb(40, 20), "JPEG", exif=b"Exif\x00\x00garbage"),
        "no-metadata.jpg": image_bytes(_rgb(40, 20), "JPEG"),
    }
    for name, data in cases.items():
        assert_same_image(_stand_in().decode(data, name), codec.decode(data, name, CFG))


@pytest.mark.parametrize("name", sorted(BAD))
def test_stand_in_bad_inputs_get_pillows_verdict(name: str) -> None:
    # A lenient stand-in: a truncated file must still be Pillow's to judge.
    stand_in = _stand_in(ops=_PillowOps(tolerant=True))
    verdict = _error(stand_in.decode, BAD[name], f"s3://b/{name}")
    assert verdict == _error(codec.decode, BAD[name], f"s3://b/{name}", CFG)
    assert verdict[1] == BAD_REASONS.get(name, verdict[1])


def test_only_rgb_and_grey_jpegs_reach_nvjpeg() -> None:
    ops = _PillowOps()
    stand_in = _stand_in(ops=ops)
    ops.decode_calls.clear()  # the self-test's
    for name in sorted(FIXTURES):
        stand_in.decode(FIXTURES[name], name)
    nvjpeg_names = {"orient6-icc.jpg", "orient3.jpg", "plain.jpg", "grey.jpg"}
    assert sum(ops.decode_calls) == len(nvjpeg_names)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_stand_in_encode_is_byte_identical_to_pillow(name: str) -> None:
    image = codec.decode(FIXTURES[name], name, CFG)
    output = _inverted(image.pixels)
    assert _stand_in().encode(image, output) == codec.encode(image, output, CFG)


def test_stand_in_encode_forced_jpeg_carries_metadata_like_pillow() -> None:
    cfg = CodecConfig(output_format="jpeg", quality=80)
    for name in ("orient6-icc.jpg", "exif.webp", "rgba.png", "sixteen.png", "grey.png"):
        image = codec.decode(FIXTURES[name], name, cfg)
        assert _stand_in(cfg).encode(image, image.pixels) == codec.encode(image, image.pixels,
                                                                          cfg), name


def test_nvjpeg_failure_falls_back_to_pillow_for_that_image(
        caplog: pytest.LogCaptureFixture) -> None:
    bad = FIXTURES["plain.jpg"]
    stand_in = _stand_in(ops=_PillowOps(fail_on=bad))
    with caplog.at_level(logging.WARNING, logger="deblur.io.nvjpeg"):
        assert_same_image(stand_in.decode(bad, "x.jpg"), codec.decode(bad, "x.jpg", CFG))
        good = FIXTURES["orient3.jpg"]
        assert_same_image(stand_in.decode(good, "y.jpg"), codec.decode(good, "y.jpg", CFG))
    assert stand_in.fallbacks == {"decode": 1, "encode": 0}
    assert any("Pillow used instead" in r.getMessage() for r in caplog.records)


def test_with_metadata_lays_segments_out_as_pillow_does() -> None:
    pixels = noise(64, 48, 3)
    big_icc = ICC + bytes(np.random.default_rng(0).integers(0, 255, 140_000, np.uint8))
    for exif, icc in [(_exif(1), ICC), (_exif(1), None), (None, big_icc), (None, None)]:
        options = {k: v for k, v in (("exif", exif), ("icc_profile", icc)) if v}
        expected = image_bytes(pixels, "JPEG", quality=90, **options)
        assert with_metadata(image_bytes(pixels, "JPEG", quality=90), exif, icc) == expected
    assert Image.open(io.BytesIO(with_metadata(image_bytes(pixels, "JPEG"), None, big_icc))
                      ).info["icc_profile"] == big_icc


def test_coalescer_batches_concurrent_callers() -> None:
    def run(items: list[int]) -> list[int | Exception]:
        time.sleep(0.05)
        return [ValueError(f"bad {i}") if i == 13 else i * 10 for i in items]

    coalescer: Coalescer[int, int] = Coalescer(run, max_items=4)
    assert coalescer(1) == 10 and coalescer.batches == [1]  # alone: at once, by itself
    coalescer.batches.clear()
    values = [*range(12), 13]
    with ThreadPoolExecutor(len(values)) as threads:
        futures = {v: threads.submit(coalescer, v) for v in values}
    for value, future in futures.items():
        if value == 13:
            assert isinstance(future.exception(), ValueError)
        else:
            assert future.result() == value * 10
    assert sum(coalescer.batches) == len(values) and max(coalescer.batches) <= 4
    assert len(coalescer.batches) < len(values), coalescer.batches


def test_coalescer_survives_a_failing_batch() -> None:
    calls: list[list[int]] = []

    def run(items: list[int]) -> list[int]:
        calls.append(items)
        if len(calls) == 1:
            raise RuntimeError("device lost")
        return items

    coalescer: Coalescer[int, int] = Coalescer(run)
    with pytest.raises(RuntimeError, match="device lost"):
        coalescer(1)
    assert coalescer(2) == 2


# -- the worker uses the configured backend ------------------------------------------------

_VARYING = {"finished_at", "fetch_ms", "decode_ms", "infer_ms", "encode_ms", "upload_ms"}


def _run_shard(root: Path, files: dict[str, bytes], processes: int) -> tuple[list, dict]:
    ledger = make_job(str(root), files, **{"worker.io_threads": 3, "codec.processes": processes})
    processor = ShardProcessor(ledger.config(), identity, "w0", Storage())
    try:
        expected = PillowProcessCodec if processes else PillowCodec
        assert type(processor.codec) is expected
        processor.process(ledger.job_root, 0, 1)
    finally:
        processor.codec.close()
    table = ledger.read_result(0)
    assert table is not None
    rows = sorted(table.to_pylist(), key=lambda r: r["row_id"])
    outputs = {r["key"].rsplit("/", 1)[1]: Path(r["output_key"]).read_bytes()
               for r in rows if r["status"] == "ok"}
    for row in rows:  # the same message, under another root
        row["error"] = row["error"] and row["error"].replace(str(root), "ROOT")
    return [{k: v for k, v in r.items() if k not in _VARYING} for r in rows], outputs


def _without_keys(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("key", "output_key")} for r in rows]


def test_worker_decodes_and_encodes_in_the_pool(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    files = {name: FIXTURES[name] for name in
             ("orient6-icc.jpg", "grey.jpg", "cmyk.jpg", "rgba.png", "sixteen.png")}
    files |= {"empty.jpg": b"", "truncated.jpg": BAD["truncated.jpg"]}
    rows_0, outputs_0 = _run_shard(tmp_path / "in-process", files, 0)
    assert sum(r["status"] == "ok" for r in rows_0) == 5

    # The pool's processes have their own codec module: breaking this process's copy shows
    # that the worker decodes and encodes through the pool, and nothing else.
    def broken(*args: object, **kwargs: object) -> None:
        raise AssertionError("decoded or encoded in the actor's process")

    monkeypatch.setattr(codec, "decode", broken)
    monkeypatch.setattr(codec, "encode", broken)
    rows_2, outputs_2 = _run_shard(tmp_path / "pool", files, 2)
    assert _without_keys(rows_2) == _without_keys(rows_0)
    assert outputs_2 == outputs_0


# -- the real nvJPEG -----------------------------------------------------------------------

def _has_nvjpeg() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import torchvision.io  # noqa: F401
    except Exception:  # noqa: BLE001
        return False
    return True


def _smooth(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Low-frequency colour: no edge for chroma upsampling to disagree on."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = [128 + 90 * np.sin(xx / rng.uniform(20, 40) + rng.uniform(0, 6))
                * np.cos(yy / rng.uniform(20, 40)) for _ in range(3)]
    return np.stack(channels, axis=2).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def nvjpeg() -> Iterator[NvJpegCodec]:
    real = NvJpegCodec(CFG, PillowCodec(CFG))
    yield real
    real.close()


def _levels(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.int16) - b.astype(np.int16))


GPU_JPEGS = {
    "444.jpg": image_bytes(_smooth(120, 160), "JPEG", quality=95, subsampling=0),
    "orient6-icc-444.jpg": image_bytes(_smooth(90, 160, 1), "JPEG", quality=95, subsampling=0,
                                       exif=_exif(6), icc_profile=ICC),
    "grey.jpg": image_bytes(Image.fromarray(_smooth(120, 160, 2)).convert("L"), "JPEG"),
    "420.jpg": image_bytes(_smooth(120, 160, 3), "JPEG", quality=95),
}


@pytest.mark.gpu
@pytest.mark.skipif(not _has_nvjpeg(), reason="needs a CUDA device and torchvision")
@pytest.mark.parametrize("name", sorted(GPU_JPEGS))
def test_nvjpeg_decode_matches_pillow(nvjpeg: NvJpegCodec, name: str) -> None:
    data = GPU_JPEGS[name]
    ours, reference = nvjpeg.decode(data, name), codec.decode(data, name, CFG)
    assert nvjpeg.fallbacks["decode"] == 0, "nvJPEG did not decode it"
    diff = _levels(ours.pixels, reference.pixels)
    if name == "420.jpg":  # chroma upsampling may differ from libjpeg's by a level or so
        assert np.percentile(diff, 99) <= 2 and diff.mean() < 0.5, (diff.max(), diff.mean())
    else:
        assert diff.max() <= 2, diff.max()
    assert_same_image(dataclasses.replace(ours, pixels=reference.pixels), reference)


@pytest.mark.gpu
@pytest.mark.skipif(not _has_nvjpeg(), reason="needs a CUDA device and torchvision")
@pytest.mark.parametrize("name", ["cmyk.jpg", "rgba.png", "sixteen.png", "grey.png",
                                  "exif.webp"])
def test_nvjpeg_leaves_other_images_to_pillow(nvjpeg: NvJpegCodec, name: str) -> None:
    data = FIXTURES[name]
    image = nvjpeg.decode(data, name)
    reference = codec.decode(data, name, CFG)
    assert_same_image(image, reference)
    if reference.source_format != "jpeg":  # (a CMYK JPEG's pixels are written by nvJPEG)
        output = _inverted(reference.pixels)
        assert nvjpeg.encode(image, output) == codec.encode(reference, output, CFG)


@pytest.mark.gpu
@pytest.mark.skipif(not _has_nvjpeg(), reason="needs a CUDA device and torchvision")
def test_nvjpeg_encode_keeps_metadata_and_pixels(nvjpeg: NvJpegCodec) -> None:
    data = GPU_JPEGS["orient6-icc-444.jpg"]
    image = codec.decode(data, "x.jpg", CFG)
    ours = Image.open(io.BytesIO(nvjpeg.encode(image, image.pixels)))
    theirs = Image.open(io.BytesIO(codec.encode(image, image.pixels, CFG)))
    assert nvjpeg.fallbacks["encode"] == 0, "nvJPEG did not encode it"
    assert ours.format == "JPEG" and ours.size == theirs.size == (image.width, image.height)
    assert ours.info.get("icc_profile") == theirs.info.get("icc_profile") == ICC
    assert dict(ours.getexif()) == dict(theirs.getexif())
    assert ours.getexif().get(0x0112) == 1
    assert _levels(np.asarray(ours.convert("RGB")), image.pixels).mean() < 1.5


@pytest.mark.gpu
@pytest.mark.skipif(not _has_nvjpeg(), reason="needs a CUDA device and torchvision")
def test_nvjpeg_concurrent_callers_share_batches(nvjpeg: NvJpegCodec) -> None:
    data = [image_bytes(_smooth(120, 160, seed), "JPEG", quality=95) for seed in range(32)]
    serial = [nvjpeg.decode(d, f"{i}.jpg").pixels for i, d in enumerate(data)]
    with ThreadPoolExecutor(8) as threads:
        parallel = list(threads.map(lambda i: nvjpeg.decode(data[i], f"{i}.jpg").pixels,
                                    range(len(data))))
    for a, b in zip(serial, parallel):
        np.testing.assert_array_equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not _has_nvjpeg(), reason="needs a CUDA device and torchvision")
def test_make_codec_picks_nvjpeg_on_a_gpu() -> None:
    chosen = make_codec(CodecConfig(processes=0), "auto", 8.0)
    try:
        assert isinstance(chosen, NvJpegCodec)
    finally:
        chosen.close()
