"""No host bounce on the GPU path: pixels nvJPEG decoded stay torch tensors on the device through
the engine to nvJPEG's encode (docs/architecture.md, "The codec").

Everything but the device itself is checked here on the CPU: the Deblurrer takes CPU tensors
through the same packing and unpacking it uses on CUDA, and the worker runs the nvJPEG
backend with Pillow standing in for torchvision.io (``_PillowOps``), with and without
``device_pixels``. The ``gpu`` test runs the real thing against the host path.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deblur.config import CodecConfig, ModelConfig
from deblur.errors import ModelError
from deblur.io import codec
from deblur.io.codec import PillowCodec, host_pixels
from deblur.io.nvjpeg import NvJpegCodec
from deblur.io.storage import Storage
from deblur.model.weights import load_model
from deblur.run.inference import Deblurrer, pack_tensors, unpack_tensors
from deblur.run.worker import ShardProcessor
from tests.conftest import image_bytes, make_job, noise
from tests.test_codec_backends import FIXTURES, _PillowOps

CFG = CodecConfig()


@pytest.fixture(scope="module")
def deblurrer() -> Deblurrer:
    torch.manual_seed(0)
    config = ModelConfig(random_weights=True, compile="off", device="cpu")
    return Deblurrer(load_model(config), config)


def _tensors(images: list[np.ndarray]) -> list[torch.Tensor]:
    return [torch.from_numpy(img.copy()) for img in images]


def test_pack_tensors_puts_each_image_top_left_and_zeroes_spare_rows() -> None:
    images = _tensors([noise(6, 4, 1), noise(3, 5, 2)])
    batch = pack_tensors(images, 4, 8, 8)
    assert batch.shape == (4, 8, 8, 3) and batch.dtype == torch.uint8
    assert torch.equal(batch[0, :4, :6], images[0])
    assert torch.equal(batch[1, :5, :3], images[1])
    assert not batch[2:].any()  # rows that only pad a compiled batch


def test_unpack_tensors_gives_each_images_corner_as_a_view() -> None:
    quantised = torch.arange(2 * 8 * 8 * 3, dtype=torch.int32).to(torch.uint8).reshape(2, 8, 8, 3)
    sizes = [np.zeros((4, 6, 3), np.uint8), np.zeros((5, 3, 3), np.uint8)]
    out = unpack_tensors(quantised, sizes)
    assert [tuple(o.shape) for o in out] == [(4, 6, 3), (5, 3, 3)]
    assert torch.equal(out[1], quantised[1, :5, :3])
    assert out[0].data_ptr() == quantised.data_ptr()  # no copy


def test_tensor_images_give_the_host_paths_outputs(deblurrer: Deblurrer) -> None:
    """Same pixels whether they came as numpy or as tensors, mixed sizes padded to one shape
    and two batches in flight (the engine's launch/collect); tensors in, tensors out."""
    first = [noise(24, 16, 1), noise(20, 13, 2), noise(17, 16, 3)]
    second = [noise(24, 16, 4), noise(24, 16, 5)]
    expected = deblurrer.deblur(first, (16, 24)) + deblurrer.deblur(second)
    collect_first = deblurrer.launch(_tensors(first), (16, 24))
    collect_second = deblurrer.launch(_tensors(second))
    got = collect_first() + collect_second()
    for want, have in zip(expected, got):
        assert isinstance(have, torch.Tensor) and have.dtype == torch.uint8
        assert np.array_equal(want, host_pixels(have))


def test_a_tiled_tensor_image_matches_the_host_path() -> None:
    torch.manual_seed(0)
    config = ModelConfig(random_weights=True, compile="off", device="cpu",
                         tile_pixels=64 * 64, tile_overlap=8)
    tiled = Deblurrer(load_model(config), config)
    img = noise(100, 70, 7)  # over tile_pixels: cut into tiles
    (want,) = tiled.deblur([img])
    (have,) = tiled.launch(_tensors([img]))()
    assert np.array_equal(want, host_pixels(have))


def test_a_batch_mixing_numpy_and_tensors_is_refused(deblurrer: Deblurrer) -> None:
    img = noise(8, 8)
    with pytest.raises(ModelError, match="one dtype"):
        deblurrer.deblur([img, torch.from_numpy(img.copy())])
    with pytest.raises(ModelError, match="one dtype"):
        deblurrer.deblur([torch.zeros((8, 8, 3), dtype=torch.float32)])


def _stand_in() -> NvJpegCodec:
    return NvJpegCodec(CFG, PillowCodec(CFG), device="cpu", ops=_PillowOps())


def test_kept_pixels_are_tensors_and_encode_like_numpy() -> None:
    nvjpeg = _stand_in()
    data = FIXTURES["orient6-icc.jpg"]
    on_host = nvjpeg.decode(data, "a.jpg")
    nvjpeg.keep_on_device = True
    kept = nvjpeg.decode(data, "a.jpg")
    assert isinstance(on_host.pixels, np.ndarray) and isinstance(kept.pixels, torch.Tensor)
    assert np.array_equal(host_pixels(kept.pixels), on_host.pixels)
    assert (kept.width, kept.height, kept.exif) == (on_host.width, on_host.height, on_host.exif)
    assert nvjpeg.encode(kept, kept.pixels) == nvjpeg.encode(on_host, on_host.pixels)
    # What nvJPEG does not encode (grey output) reaches Pillow as numpy.
    grey = nvjpeg.decode(FIXTURES["grey.jpg"], "g.jpg")
    assert isinstance(grey.pixels, torch.Tensor) and grey.grey
    assert nvjpeg.encode(grey, grey.pixels) == codec.encode(grey, host_pixels(grey.pixels), CFG)


class _Recorder:
    """The Deblurrer's launch, noting what kind of pixels each batch brought."""

    def __init__(self, deblurrer: Deblurrer) -> None:
        self.deblurrer = deblurrer
        self.kinds: list[str] = []

    def launch(self, images: list, shape: tuple[int, int] | None):  # noqa: ANN201
        self.kinds += [type(img).__name__ for img in images]
        return self.deblurrer.launch(images, shape)


def _run(root: Path, files: dict[str, bytes], deblurrer: Deblurrer, device_pixels: bool
         ) -> tuple[dict[str, bytes], list[str], list[dict]]:
    ledger = make_job(str(root), files, **{"worker.io_threads": 3})
    recorder = _Recorder(deblurrer)
    processor = ShardProcessor(ledger.config(), deblurrer.deblur, "w0", Storage(),
                               infer_tiled=deblurrer.deblur_tiled, launch=recorder.launch,
                               device_pixels=device_pixels, codec_backend=_stand_in())
    try:
        processor.process(ledger.job_root, 0, 1)
    finally:
        processor.codec.close()
    table = ledger.read_result(0)
    assert table is not None
    rows = sorted(table.to_pylist(), key=lambda r: r["row_id"])
    outputs = {Path(r["key"]).name: Path(r["output_key"]).read_bytes()
               for r in rows if r["status"] == "ok"}
    return outputs, recorder.kinds, rows


def test_worker_keeps_nvjpeg_pixels_on_the_device_and_writes_the_same_files(
        tmp_path: Path, deblurrer: Deblurrer) -> None:
    files = {"a.jpg": image_bytes(noise(24, 16, 1), "JPEG", quality=90),
             "b.jpg": image_bytes(noise(24, 16, 2), "JPEG", quality=90),
             "oriented.jpg": FIXTURES["orient6-icc.jpg"],
             "grey.jpg": FIXTURES["grey.jpg"],
             "c.png": image_bytes(noise(20, 12, 3), "PNG")}
    host, host_kinds, host_rows = _run(tmp_path / "host", files, deblurrer, False)
    kept, kept_kinds, kept_rows = _run(tmp_path / "kept", files, deblurrer, True)
    assert set(host_kinds) == {"ndarray"}
    # The JPEGs reached the engine as tensors; the PNG (Pillow's) as numpy.
    assert sorted(kept_kinds) == ["Tensor"] * 4 + ["ndarray"]
    assert len(kept) == len(files) and kept == host  # byte for byte
    for a, b in zip(host_rows, kept_rows):  # sharpness figures from the same pixels
        assert a["status"] == b["status"] == "ok"
        assert a["sharpness_out"] == pytest.approx(b["sharpness_out"])
    assert Image.open(Path(kept_rows[0]["output_key"])).size == (24, 16)


# -- the real device -----------------------------------------------------------------------

def _has_nvjpeg() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import torchvision.io  # noqa: F401
    except Exception:  # noqa: BLE001 - absent, or a build that does not match torch
        return False
    return True


def _smooth(height: int, width: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = [128 + 90 * np.sin(xx / rng.uniform(20, 40) + rng.uniform(0, 6))
                * np.cos(yy / rng.uniform(20, 40)) for _ in range(3)]
    return np.stack(channels, axis=2).clip(0, 255).astype(np.uint8)


@pytest.mark.gpu
@pytest.mark.skipif(not _has_nvjpeg(), reason="needs a CUDA device and torchvision")
def test_on_cuda_the_device_path_matches_the_host_path(tmp_path: Path) -> None:
    """nvJPEG decode -> network -> nvJPEG encode with the pixels kept on the GPU, against the
    same codec and model with them bounced through the host: decoded outputs within 1 level
    (the same kernels on the same values; the two paths differ only in where pixels wait)."""
    torch.manual_seed(0)
    config = ModelConfig(random_weights=True, compile="off", device="cuda")
    model = Deblurrer(load_model(config), config)
    files = {f"{i}.jpg": image_bytes(_smooth(120 + 8 * (i % 2), 160, i), "JPEG", quality=95,
                                     subsampling=0) for i in range(6)}

    def run(root: Path, keep: bool) -> tuple[dict[str, bytes], list[str]]:
        ledger = make_job(str(root), files, **{"worker.io_threads": 3,
                                               "model.device": "cuda"})
        recorder = _Recorder(model)
        gpu = NvJpegCodec(CFG, PillowCodec(CFG))
        processor = ShardProcessor(ledger.config(), model.deblur, "w0", Storage(),
                                   launch=recorder.launch, device_pixels=keep,
                                   codec_backend=gpu)
        try:
            report = processor.process(ledger.job_root, 0, 1)
        finally:
            processor.codec.close()
        assert report["failed"] == 0 and gpu.fallbacks == {"decode": 0, "encode": 0}
        table = ledger.read_result(0)
        assert table is not None
        return ({Path(r["key"]).name: Path(r["output_key"]).read_bytes()
                 for r in table.to_pylist()}, recorder.kinds)

    host, host_kinds = run(tmp_path / "host", False)
    kept, kept_kinds = run(tmp_path / "kept", True)
    assert set(host_kinds) == {"ndarray"} and set(kept_kinds) == {"Tensor"}
    for name in files:
        a = np.asarray(Image.open(io.BytesIO(host[name])).convert("RGB"))
        b = np.asarray(Image.open(io.BytesIO(kept[name])).convert("RGB"))
        diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
        assert int(diff.max()) <= 1, (name, int(diff.max()))
