"""Synthetic blurry photos with known ground truth, so a demo and the quality checks need no
downloads: a sharp procedural scene (edges, text-like strokes, texture, gradients), blurred
by a random linear motion kernel, plus a little noise and JPEG compression, as a camera shake
would produce. The sharp originals go to a sibling folder (``<folder>-reference``), not into
the folder a job lists, so a job over ``<folder>`` sees only the blurry inputs.
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def make_scene(rng: np.random.Generator, height: int = 256, width: int = 256) -> np.ndarray:
    """A sharp H x W x 3 uint8 scene with strong edges at many orientations."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([
        60 + 80 * (xx / width), 60 + 80 * (yy / height),
        100 + 60 * np.sin(xx / 17.0 + rng.uniform(0, 6)) * np.cos(yy / 23.0)], axis=2)
    img = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(12, 20))):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        x1, y1 = x0 + rng.integers(10, width // 3), y0 + rng.integers(10, height // 3)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.rectangle([int(x0), int(y0), int(x1), int(y1)], fill=colour)
        else:
            draw.ellipse([int(x0), int(y0), int(x1), int(y1)], fill=colour,
                         outline=(0, 0, 0), width=2)
    for row in range(4):  # text-like strokes: thin dark bars of varying length
        y = int(rng.integers(0, height - 12))
        x = int(rng.integers(0, width // 2))
        for _ in range(int(rng.integers(4, 10))):
            w = int(rng.integers(2, 8))
            draw.rectangle([x, y, x + w, y + 10], fill=(20, 20, 20))
            x += w + int(rng.integers(2, 5))
    checker = ((xx // 8 + yy // 8) % 2).astype(bool)
    out = np.asarray(img).copy()
    patch = (slice(height // 2, height // 2 + height // 6), slice(0, width // 5))
    out[patch][checker[patch]] = 235
    return out


def motion_kernel(length: int, angle_deg: float) -> list[tuple[float, float]]:
    """Sample offsets along a line of ``length`` px at ``angle_deg`` (a linear shake)."""
    steps = max(2, length)
    angle = math.radians(angle_deg)
    return [((t - (steps - 1) / 2) * math.sin(angle), (t - (steps - 1) / 2) * math.cos(angle))
            for t in range(steps)]


def motion_blur(sharp: np.ndarray, length: int, angle_deg: float) -> np.ndarray:
    """Average of the image shifted along the kernel (edge-replicated), uint8 in and out."""
    acc = np.zeros(sharp.shape, np.float64)
    pad = length + 1
    padded = np.pad(sharp.astype(np.float64), ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    h, w = sharp.shape[:2]
    offsets = motion_kernel(length, angle_deg)
    for dy, dx in offsets:
        y0, x0 = int(round(pad + dy)), int(round(pad + dx))
        acc += padded[y0:y0 + h, x0:x0 + w]
    return (acc / len(offsets)).round().clip(0, 255).astype(np.uint8)


def write_samples(folder: str | Path, count: int = 8, seed: int = 0,
                  size: tuple[int, int] = (256, 256)) -> list[Path]:
    """Write ``count`` blurry JPEGs to ``folder`` and their sharp PNGs beside it.

    Returns the blurry files' paths. The reference of ``folder/x.jpg`` is
    ``folder-reference/x.png``.
    """
    folder = Path(folder)
    reference = reference_folder(folder)
    folder.mkdir(parents=True, exist_ok=True)
    reference.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        sharp = make_scene(rng, size[1], size[0])
        blurry = motion_blur(sharp, int(rng.integers(7, 15)), float(rng.uniform(0, 180)))
        noisy = (blurry + rng.normal(0, 2.0, blurry.shape)).round().clip(0, 255).astype(np.uint8)
        name = f"sample_{i:03d}"
        buf = io.BytesIO()
        Image.fromarray(noisy).save(buf, "JPEG", quality=92)
        path = folder / f"{name}.jpg"
        path.write_bytes(buf.getvalue())
        Image.fromarray(sharp).save(reference / f"{name}.png")
        paths.append(path)
    return paths


def reference_folder(folder: str | Path) -> Path:
    folder = Path(folder)
    return folder.parent / f"{folder.name}-reference"
