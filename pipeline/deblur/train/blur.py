"""Synthetic camera shake: random blur kernels, applied with sensor noise and JPEG re-compression.

A kernel is the path the image travelled over the sensor during the exposure: a trajectory
(a straight line, or a curve whose direction turns and wobbles as a hand does) sampled finely
and splatted bilinearly onto a pixel grid, with a random speed profile along it (the shake
accelerates and stops), normalised to sum 1. Lengths vary per sample. After the convolution
come signal-dependent sensor noise (shot + read) and, usually, JPEG re-compression at a random
quality, because what users feed the network is a camera's or a phone's JPEG.

Everything is drawn from ``numpy.random.default_rng([seed, index])``: sample ``index`` of a run
with ``seed`` is the same image on every machine, worker count and restart, which is what lets
a resumed training see exactly the batches it would have seen, and the evaluation use the same
blurred set every time.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class BlurConfig:
    """How hard the synthetic blur is. The defaults are moderate camera shake at ~0.3 MP."""

    min_length: float = 3.0
    """Shortest trajectory, in pixels of the image being blurred."""
    max_length: float = 15.0
    """Longest trajectory, in pixels."""
    linear_fraction: float = 0.3
    """Share of straight-line kernels; the rest are curved, wobbling paths."""
    max_read_noise: float = 0.01
    """Largest read-noise standard deviation (image range 0..1); drawn uniformly from 0."""
    max_shot_noise: float = 0.0003
    """Largest shot-noise variance per unit signal (noise grows with brightness)."""
    jpeg_fraction: float = 0.7
    """Share of samples re-compressed as JPEG."""
    jpeg_quality: tuple[int, int] = (70, 95)
    """JPEG quality range, inclusive."""

    def validate(self) -> None:
        from deblur.errors import ConfigError

        if not 1.0 <= self.min_length <= self.max_length:
            raise ConfigError(f"blur lengths {self.min_length}..{self.max_length}: need "
                              f"1 <= min_length <= max_length")
        if not 0.0 <= self.linear_fraction <= 1.0 or not 0.0 <= self.jpeg_fraction <= 1.0:
            raise ConfigError("blur linear_fraction and jpeg_fraction must be within 0..1")
        low, high = self.jpeg_quality
        if not 1 <= low <= high <= 100:
            raise ConfigError(f"blur jpeg_quality {self.jpeg_quality}: need 1 <= low <= high "
                              f"<= 100")


def sample_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of one sample: the same (seed, index) gives the same draws anywhere."""
    return np.random.default_rng([seed, index])


def trajectory(rng: np.random.Generator, length: float, linear: bool) -> np.ndarray:
    """(N, 2) points (y, x) of a path of arc length ``length``, centred on its mean."""
    n = max(32, int(math.ceil(length * 4)))
    step = length / (n - 1)
    angle = rng.uniform(0, 2 * math.pi)
    if linear:
        headings = np.full(n - 1, angle)
    else:
        # A hand turns smoothly (a constant turn rate up to ~1.5 turns of a quarter circle over
        # the path) and wobbles (an integrated random walk), so paths range from arcs to
        # S-shapes and hooks.
        turn = rng.uniform(-1.5, 1.5) * (math.pi / 2)
        wobble = np.cumsum(rng.normal(0, 1, n - 1)) * rng.uniform(0.0, 0.25) / math.sqrt(n)
        headings = angle + np.linspace(0, turn, n - 1) + wobble * math.pi
    steps = step * np.stack([np.sin(headings), np.cos(headings)], axis=1)
    points = np.concatenate([np.zeros((1, 2)), np.cumsum(steps, axis=0)])
    return points - points.mean(axis=0)


def rasterise(points: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Splat weighted points bilinearly onto the smallest odd square grid, normalised to 1."""
    radius = int(math.ceil(np.abs(points).max())) + 1
    size = 2 * radius + 1
    kernel = np.zeros((size, size), np.float64)
    ys, xs = points[:, 0] + radius, points[:, 1] + radius
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    fy, fx = ys - y0, xs - x0
    for dy, dx, w in ((0, 0, (1 - fy) * (1 - fx)), (0, 1, (1 - fy) * fx),
                      (1, 0, fy * (1 - fx)), (1, 1, fy * fx)):
        np.add.at(kernel, (y0 + dy, x0 + dx), w * weights)
    return kernel / kernel.sum()


def random_kernel(rng: np.random.Generator, config: BlurConfig = BlurConfig()) -> np.ndarray:
    """A normalised camera-shake kernel (odd square, float64)."""
    length = rng.uniform(config.min_length, config.max_length)
    linear = bool(rng.random() < config.linear_fraction)
    points = trajectory(rng, length, linear)
    # Exposure time per point: a smooth random speed profile (slow parts of the shake leave
    # brighter kernel segments), never zero so the path stays connected.
    knots = rng.uniform(0.3, 1.0, 4)
    weights = np.interp(np.linspace(0, 3, len(points)), np.arange(4), knots)
    # Centre the kernel on its centre of mass, not on the path's midpoint: otherwise the
    # uneven speed shifts the blurry image against the sharp one by a pixel or two in a
    # direction the network cannot see, and the cheapest answer to an unknowable shift is to
    # blur (the first trained checkpoint lost PSNR on every mildly blurred photograph).
    points = points - (weights[:, None] * points).sum(axis=0) / weights.sum()
    return rasterise(points, weights)


def convolve(image: np.ndarray, kernel: np.ndarray, valid: bool = False) -> np.ndarray:
    """Blur an H x W x C float image by ``kernel``.

    ``valid``: the input carries a margin of kernel_size // 2 on each side and the result is
    the interior only (no border effects, for crops cut with that margin); otherwise the
    image is reflect-padded and keeps its size.
    """
    from scipy.signal import fftconvolve

    pad = kernel.shape[0] // 2
    if not valid:
        image = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    return np.stack([fftconvolve(image[..., c], kernel, mode="valid")
                     for c in range(image.shape[2])], axis=2)


def degrade(blurred: np.ndarray, rng: np.random.Generator, config: BlurConfig = BlurConfig()
            ) -> np.ndarray:
    """Sensor noise and maybe JPEG on a blurred float image in 0..1; returns uint8."""
    read = rng.uniform(0, config.max_read_noise)
    shot = rng.uniform(0, config.max_shot_noise)
    sigma = np.sqrt(read ** 2 + shot * np.clip(blurred, 0, 1))
    noisy = blurred + sigma * rng.standard_normal(blurred.shape)
    out = np.clip(np.round(noisy * 255.0), 0, 255).astype(np.uint8)
    if rng.random() < config.jpeg_fraction:
        quality = int(rng.integers(config.jpeg_quality[0], config.jpeg_quality[1] + 1))
        buf = io.BytesIO()
        Image.fromarray(out).save(buf, "JPEG", quality=quality)
        out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return out


def max_margin(config: BlurConfig = BlurConfig()) -> int:
    """The largest kernel_size // 2 ``random_kernel`` can return (crop margin to cut)."""
    return int(math.ceil(config.max_length / 2)) + 2


def blur_image(sharp: np.ndarray, seed: int, index: int, config: BlurConfig = BlurConfig()
               ) -> np.ndarray:
    """A whole uint8 image blurred as sample ``index`` of ``seed`` (same size, uint8)."""
    rng = sample_rng(seed, index)
    kernel = random_kernel(rng, config)
    blurred = convolve(sharp.astype(np.float64) / 255.0, kernel)
    return degrade(blurred, rng, config)
