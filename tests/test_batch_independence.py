"""An image's output never depends on its batch: a whole shard through the real worker, engine,
batcher and network gives each image what the network gives it alone (issue: GPU engine).

The reference is the network run directly on one image, the authors' way (their eval.py: x/255,
model(x)[2], clamp, + 0.5/255, * 255, truncate), reflect-padded only to the network's multiple
of 4 when the size is not one (the authors' code cannot run such sizes at all).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from deblur.config import JobConfig
from deblur.io.storage import Storage, join
from deblur.model import STRIDE, create_model
from deblur.run.inference import Deblurrer, reflect_pad, round_up
from deblur.run.worker import ShardProcessor
from tests.conftest import image_bytes, make_job, noise

# (height, width): multiples of 4 but not of 16, a size that rounds up to one of them, exact
# multiples of 16, and pairs of equal sizes so batches really form.
SIZES = [(36, 52), (36, 52), (35, 50), (44, 60), (44, 60), (20, 28), (48, 64), (48, 64)]


def _network() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("mimo-unet")


def _alone(model: torch.nn.Module, img: np.ndarray) -> np.ndarray:
    """The network on this image by itself, quantised the authors' way."""
    h, w = img.shape[:2]
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    x = reflect_pad(x, round_up(h, STRIDE) - h, round_up(w, STRIDE) - w)
    with torch.inference_mode():
        pred = model(x)[2].clamp(0, 1)[..., :h, :w]
    return (pred + 0.5 / 255).mul(255).byte()[0].permute(1, 2, 0).numpy()


def _run_shard(tmp_path: Path, **overrides: object) -> tuple[dict[str, np.ndarray], list]:
    root = str(tmp_path)
    files = {f"img{i}_{h}x{w}.png": image_bytes(noise(w, h, seed=i), "PNG")
             for i, (h, w) in enumerate(SIZES)}
    ledger = make_job(root, files, **{"batch.max_batch": 4, "batch.max_wait_ms": 2000.0,
                                      "worker.io_threads": 2, **overrides})
    config: JobConfig = ledger.config()
    deblurrer = Deblurrer(_network(), config.model)
    processor = ShardProcessor(config, deblurrer.deblur, "test", Storage())
    report = processor.process(ledger.job_root, 0, 1)
    assert report["ok"] == len(SIZES), report
    outputs = {name: np.asarray(Image.open(join(root, f"out/{name}")))
               for name in files}
    return outputs, report["metrics"]["batches"]


def _differing(a: np.ndarray, b: np.ndarray) -> tuple[int, float]:
    diff = np.abs(a.astype(int) - b.astype(int))
    return int(diff.max()), float(np.mean(diff > 0))


def test_every_image_of_a_mixed_job_equals_the_network_on_it_alone(tmp_path: Path) -> None:
    outputs, batches = _run_shard(tmp_path)
    assert max(size for size, _ in batches) > 1, "no batch formed: the test would prove nothing"
    model = _network()
    for name, out in outputs.items():
        index = int(name[3:name.index("_")])
        alone = _alone(model, noise(SIZES[index][1], SIZES[index][0], seed=index))
        # A batch of N runs other CPU conv kernels than a batch of 1 (float sums in another
        # order, ~3e-7 apart), which can flip the rounding of a rare value by one level.
        worst, share = _differing(out, alone)
        assert worst <= 1 and share < 0.01, f"{name}: {share:.1%} differ, up to {worst}"


def test_a_coarse_bucket_changes_outputs(tmp_path: Path) -> None:
    # The opt-in trade the default avoids: 36x52 padded to a 48x64 bucket is seen padded.
    outputs, _ = _run_shard(tmp_path, **{"batch.bucket_multiple": 16})
    model = _network()
    worst, _ = _differing(outputs["img0_36x52.png"], _alone(model, noise(52, 36, seed=0)))
    assert worst > 1


def test_the_default_bucket_is_the_networks_multiple() -> None:
    assert JobConfig().batch.bucket_multiple == STRIDE
