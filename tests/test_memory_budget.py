"""Memory bounded by bytes: decoded pixels within worker.max_buffered_bytes, tiling bounded by
the padded pass, and weights streamed and hashed once, never held as one bytes object."""

from __future__ import annotations

import hashlib
import io
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from deblur.config import BatchConfig, ModelConfig
from deblur.io.storage import Storage, get_storage
from deblur.model import STRIDE, create_model
from deblur.model import weights as weights_mod
from deblur.run.batcher import NET_MULTIPLE, DynamicBatcher
from deblur.run.inference import Deblurrer
from deblur.run.worker import ShardProcessor, pixel_charge
from tests.conftest import identity, image_bytes, make_job

MIB = 1 << 20


def _smooth(i: int, size: int = 1024) -> np.ndarray:
    """A gradient: megapixels of pixels in a few KB of PNG, so file bytes do not blur the
    measure of pixel bytes."""
    y, x = np.mgrid[0:size, 0:size]
    return np.stack([(x + i) % 256, (y + 2 * i) % 256, ((x + y) // 2) % 256],
                    -1).astype(np.uint8)


def _slow_identity(images: list[np.ndarray], shape: tuple[int, int] | None
                   ) -> list[np.ndarray]:
    time.sleep(0.05)  # a model slower than decoding, so fetch+decode would run far ahead
    return identity(images, shape)


# -- the byte budget -----------------------------------------------------------------------

def test_decoded_pixels_stay_within_the_byte_budget(tmp_path: Path) -> None:
    files = {f"{i:02d}.png": image_bytes(_smooth(i), "PNG") for i in range(16)}
    charge = pixel_charge(files["00.png"])
    assert charge == 2 * 1024 * 1024 * 3  # the input's pixels and its output's
    budget = 13 * MIB  # two images at a time, where prefetch (32) alone would allow 16
    ledger = make_job(str(tmp_path), files, **{
        "worker.io_threads": 2, "worker.prefetch": 32, "batch.max_batch": 1,
        "worker.max_buffered_bytes": budget, "quality.sharpness_sample_rate": 0.0})
    processor = ShardProcessor(ledger.config(), _slow_identity, "w0", Storage())
    tracemalloc.start()
    try:
        report = processor.process(ledger.job_root, 0, 1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report["ok"] == 16
    assert 0 < processor.buffer.peak <= budget and processor.buffer.used == 0
    assert report["metrics"]["buffered_peak_bytes"] == processor.buffer.peak
    # Measured independently of the worker's own accounting: every numpy array the shard
    # allocated (decoded pixels, outputs) at its peak. Unbounded, this was ~42 MB.
    assert peak <= budget + 4 * MIB, f"{peak / MIB:.1f} MiB traced at the peak"


def test_an_image_larger_than_the_budget_runs_alone(tmp_path: Path) -> None:
    files = {f"{i}.png": image_bytes(_smooth(i), "PNG") for i in range(3)}
    ledger = make_job(str(tmp_path), files, **{"worker.io_threads": 2,
                                               "worker.max_buffered_bytes": MIB})
    processor = ShardProcessor(ledger.config(), identity, "w0", Storage())
    assert processor.process(ledger.job_root, 0, 1)["ok"] == 3
    assert processor.buffer.peak == pixel_charge(files["0.png"]), "more than one at a time"


# -- tiling by the padded pass -------------------------------------------------------------

def test_the_network_multiple_is_the_models() -> None:
    assert NET_MULTIPLE == STRIDE


@pytest.mark.parametrize(("height", "width", "bucket", "tiled"), [
    (1, 1_000_000, 4, True),       # 1M pixels, but a pass of 4 x 1M
    (10, 250_000, 16, True),       # 2.5M pixels, a pass of 16 x 250,000 in its bucket
    (1000, 1000, 4, False),
    (1732, 1732, 4, False),        # exactly square to the budget: no tiling needed
])
def test_the_batcher_tiles_by_padded_area(height: int, width: int, bucket: int,
                                          tiled: bool) -> None:
    batcher: DynamicBatcher[str] = DynamicBatcher(BatchConfig(bucket_multiple=bucket),
                                                  tile_pixels=3_000_000)
    closed = batcher.add("img", height, width, "uint8")
    assert bool(closed and closed[0].tiled) == tiled


class RecordingIdentity(nn.Module):
    """Identity 'network' that records the shape of every pass."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.passes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.passes.append(tuple(x.shape))
        return [x, x, x * self.scale]


def test_a_one_pixel_strip_runs_in_passes_within_tile_pixels(tmp_path: Path) -> None:
    tile_pixels = 3_000_000  # above the strip's 1M pixels, below its 4M padded pass
    strip = np.random.default_rng(0).integers(0, 255, (1, 1_000_000, 3), np.uint8)
    ledger = make_job(str(tmp_path), {"strip.png": image_bytes(strip, "PNG")},
                      **{"worker.io_threads": 1, "model.tile_pixels": tile_pixels})
    net = RecordingIdentity()
    deblurrer = Deblurrer(net, ModelConfig(random_weights=True, device="cpu",
                                           tile_pixels=tile_pixels))
    processor = ShardProcessor(ledger.config(), deblurrer.deblur, "w0", Storage(),
                               infer_tiled=deblurrer.deblur_tiled)
    assert processor.process(ledger.job_root, 0, 1)["ok"] == 1
    assert net.passes and all(b * h * w <= tile_pixels for b, _, h, w in net.passes), net.passes
    assert len(net.passes) <= 3  # cut along its length, not into thousands of squares
    [row] = ledger.read_result(0).to_pylist()
    out = np.asarray(Image.open(row["output_key"]))
    assert out.shape == (1, 1_000_000, 3)
    assert np.abs(out.astype(int) - strip.astype(int)).max() <= 1


# -- weights: streamed, hashed once, never held whole ---------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("weights") / "MIMO-UNet.pkl"
    torch.save({"model": create_model("mimo-unet").state_dict()}, path)
    return path


def test_local_weights_are_never_read_into_one_bytes_object(checkpoint: Path) -> None:
    size = checkpoint.stat().st_size
    model = create_model("mimo-unet")
    tracemalloc.start()
    try:
        digest = weights_mod.load_weights(model, str(checkpoint), "mimo-unet")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert digest == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    # The old path held the file as bytes (1x) next to the tensors parsed from it (1x more).
    assert peak < size / 4, f"{peak / MIB:.1f} MiB traced loading a {size / MIB:.1f} MiB file"


def test_s3_weights_stream_in_chunks_once_per_process(s3_bucket: str, checkpoint: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    uri = f"{s3_bucket}/models/MIMO-UNet.pkl"
    data = checkpoint.read_bytes()
    storage = get_storage()
    storage.put(uri, data)
    del data
    monkeypatch.setattr(weights_mod, "CHUNK_BYTES", 2 * MIB)
    reads: list[tuple[str, int]] = []
    get_range, get = storage.get_range, storage.get
    monkeypatch.setattr(storage, "get_range", lambda u, length, start=0: (
        reads.append((u, length)), get_range(u, length, start))[1])
    monkeypatch.setattr(storage, "get", lambda u: (reads.append((u, -1)), get(u))[1])

    # (No tracemalloc here: the moto server runs in this process and its copies would count.)
    info = weights_mod.provenance(ModelConfig(weights=uri))  # the driver's check ...
    digest = weights_mod.load_weights(create_model("mimo-unet"), uri, "mimo-unet")  # ... load
    size = checkpoint.stat().st_size
    assert info["weights_sha256"] == digest == hashlib.sha256(
        checkpoint.read_bytes()).hexdigest()
    assert all(0 < length <= 2 * MIB for _, length in reads), "not streamed in chunks"
    assert sum(length for _, length in reads) == size, "read more than once, or not whole"


def test_a_replaced_local_checkpoint_is_read_again(tmp_path: Path) -> None:
    path = tmp_path / "w.pkl"
    torch.save({"model": create_model("mimo-unet").state_dict()}, path)
    first = weights_mod.fetch(str(path))[1]
    torch.save({"model": create_model("mimo-unet").state_dict(), "epoch": 2}, path)
    assert weights_mod.fetch(str(path))[1] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert weights_mod.fetch(str(path))[1] != first


def test_weights_that_are_no_checkpoint_say_so(tmp_path: Path) -> None:
    from deblur.errors import WeightsError

    path = tmp_path / "notes.txt"
    path.write_text("these are not weights\n" * 10)
    with pytest.raises(WeightsError, match="not a PyTorch checkpoint or safetensors file"):
        weights_mod.read_state_dict(str(path))
    buf = io.BytesIO()
    torch.save({"model": {"w": torch.ones(2)}}, buf)
    (tmp_path / "tiny.pth").write_bytes(buf.getvalue())
    state, _ = weights_mod.read_state_dict(str(tmp_path / "tiny.pth"))
    assert torch.equal(state["w"], torch.ones(2))
