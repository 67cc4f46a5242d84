"""What a coarse batching bucket does to outputs: each image run alone (padded only to the
network's multiple of 4, the default bucket) against the same image padded to a multiple-of-16
bucket, as ``batch.bucket_multiple: 16`` would pad it.

    .venv/bin/python bench/buckets.py

MIMO-UNet with seeded random weights, fp32 on the CPU, noise images: the figures show the
padding reaching the output, not the size of the effect with trained weights on photographs
(the first GPU run saw up to 45 levels at the border with the authors' checkpoint).
"""

from __future__ import annotations

import numpy as np
import torch

from deblur.config import ModelConfig
from deblur.model import create_model
from deblur.run.inference import Deblurrer, round_up

SIZES = [(36, 52), (100, 132), (180, 324), (360, 644)]


def main() -> None:
    torch.manual_seed(0)
    deblurrer = Deblurrer(create_model("mimo-unet"),
                          ModelConfig(random_weights=True, device="cpu", precision="fp32"))
    rng = np.random.default_rng(0)
    print("| image (HxW) | bucket (multiple 16) | max levels off | share of values off |")
    print("|---|---|---|---|")
    for h, w in SIZES:
        img = rng.integers(0, 255, (h, w, 3), np.uint8)
        alone = deblurrer.deblur([img])[0]
        bucket = (round_up(h, 16), round_up(w, 16))
        coarse = deblurrer.deblur([img], shape=bucket)[0]
        diff = np.abs(alone.astype(int) - coarse.astype(int))
        print(f"| {h}x{w} | {bucket[0]}x{bucket[1]} | {diff.max()} | {np.mean(diff > 0):.1%} |")


if __name__ == "__main__":
    main()
