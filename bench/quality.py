"""Cost of the per-image quality figures at 1280x720, against the cost of decoding the image.

    .venv/bin/python bench/quality.py

Prints ms per image for sharpness (variance of the Laplacian + Tenengrad, run on the input and
on the output, as the worker does), PSNR and SSIM, and JPEG decode of the same image as the
baseline measured in the same run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import io  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from deblur import codec, quality  # noqa: E402
from deblur.config import CodecConfig  # noqa: E402
from deblur.dev.samples import make_scene, motion_blur  # noqa: E402


def per_image_ms(fn, repeats: int = 20) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    sharp = make_scene(np.random.default_rng(0), 720, 1280)
    blurry = motion_blur(sharp, 9, 30.0)
    buf = io.BytesIO()
    Image.fromarray(blurry).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    print(f"# {platform.machine()}, {os.cpu_count()} cores, numpy {np.__version__}, 1280x720")
    decode = per_image_ms(lambda: codec.decode(data, "x.jpg", CodecConfig()))
    both = per_image_ms(lambda: (quality.sharpness(blurry), quality.sharpness(sharp)))
    psnr = per_image_ms(lambda: quality.psnr(blurry, sharp))
    ssim = per_image_ms(lambda: quality.ssim(blurry, sharp), repeats=5)
    print(f"JPEG decode (baseline):              {decode:7.1f} ms")
    print(f"sharpness, input + output:           {both:7.1f} ms  ({both / decode:.2f}x decode)")
    print(f"PSNR vs reference:                   {psnr:7.1f} ms  ({psnr / decode:.2f}x decode)")
    print(f"SSIM vs reference:                   {ssim:7.1f} ms  ({ssim / decode:.2f}x decode)")


if __name__ == "__main__":
    main()
