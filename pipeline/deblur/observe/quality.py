"""Per-image quality figures: no-reference sharpness, and PSNR/SSIM against a reference.

Sharpness (no reference, on every image or a sample) is measured on luminance in [0, 1]
(Rec. 601 weights) with two classic focus measures:

- variance of the Laplacian (4-neighbour kernel, valid pixels only): ``sharpness_*``;
- Tenengrad: mean squared Sobel gradient magnitude: ``tenengrad_*``.

``sharpness_ratio`` = output / input variance of the Laplacian: above 1 the output has more
fine detail than the input. Both are cheap (a few array passes; see docs/benchmarks.md for the
cost per 720p image).

PSNR and SSIM follow the deblurring literature's GoPro protocol as the MIMO-UNet authors'
``eval.py`` runs it: RGB, data range 1, output clamped to [0, 1], full image (no border crop),
``skimage.metrics.peak_signal_noise_ratio(label, pred, data_range=1)`` and
``structural_similarity`` with its defaults (7x7 uniform window, K1=0.01, K2=0.03, sample
covariance, mean over the valid windows and the three channels). Ours is the same arithmetic in
numpy, checked against scikit-image in the tests. One difference, on purpose: we score the
output as written (quantised to 8 or 16 bits), which is what the user gets; quantisation moves
PSNR by well under 0.01 dB at the values deblurring reaches.
"""

from __future__ import annotations

import hashlib

import numpy as np

from deblur.io.codec import MAX_VALUE

_LUMA = np.array([0.299, 0.587, 0.114])


def to_unit(pixels: np.ndarray) -> np.ndarray:
    """uint8/uint16 (or float already in [0, 1]) -> float64 in [0, 1]."""
    if pixels.dtype in MAX_VALUE:
        return pixels.astype(np.float64) / MAX_VALUE[pixels.dtype]
    return np.clip(pixels.astype(np.float64), 0.0, 1.0)


def luminance(pixels: np.ndarray) -> np.ndarray:
    """Rec. 601 luma in [0, 1], float32: half the memory traffic of float64, and these
    focus measures do not need more precision (they run on every image)."""
    scale = np.float32(1.0 / MAX_VALUE.get(pixels.dtype, 1.0))
    if pixels.ndim == 2:
        return pixels.astype(np.float32) * scale
    weights = (_LUMA * scale).astype(np.float32)
    return pixels[:, :, 0] * weights[0] + pixels[:, :, 1] * weights[1] + \
        pixels[:, :, 2] * weights[2]


def laplacian_variance(lum: np.ndarray) -> float:
    if min(lum.shape) < 3:
        return 0.0
    lap = (np.float32(4.0) * lum[1:-1, 1:-1] - lum[:-2, 1:-1] - lum[2:, 1:-1]
           - lum[1:-1, :-2] - lum[1:-1, 2:])
    return float(lap.var(dtype=np.float64))


def tenengrad(lum: np.ndarray) -> float:
    if min(lum.shape) < 3:
        return 0.0
    # Sobel as separable [1 2 1] smoothing x [-1 0 1] difference, valid pixels only.
    two = np.float32(2.0)
    smooth_v = lum[:-2, :] + two * lum[1:-1, :] + lum[2:, :]
    gx = smooth_v[:, 2:] - smooth_v[:, :-2]
    smooth_h = lum[:, :-2] + two * lum[:, 1:-1] + lum[:, 2:]
    gy = smooth_h[2:, :] - smooth_h[:-2, :]
    return float(np.mean(gx * gx + gy * gy, dtype=np.float64))


def sharpness(pixels: np.ndarray) -> tuple[float, float]:
    """(variance of the Laplacian, Tenengrad) of an image's luminance."""
    lum = luminance(pixels)
    return laplacian_variance(lum), tenengrad(lum)


def psnr(output: np.ndarray, reference: np.ndarray) -> float:
    """PSNR in dB, RGB, data range 1 (inf for identical images)."""
    x, y = to_unit(output), to_unit(reference)
    _same_shape(x, y)
    mse = float(np.mean((x - y) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(1.0 / mse)


def _window_means(a: np.ndarray, size: int) -> np.ndarray:
    """Mean over every fully-inside ``size`` x ``size`` window (integral image)."""
    c = np.cumsum(np.cumsum(a, axis=0), axis=1)
    c = np.pad(c, ((1, 0), (1, 0)))
    total = c[size:, size:] - c[:-size, size:] - c[size:, :-size] + c[:-size, :-size]
    return total / (size * size)


def ssim(output: np.ndarray, reference: np.ndarray, win_size: int = 7) -> float:
    """Mean SSIM over channels, as skimage.metrics.structural_similarity with its defaults
    (uniform window, sample covariance) and data_range=1."""
    x, y = to_unit(output), to_unit(reference)
    _same_shape(x, y)
    if x.ndim == 2:
        x, y = x[:, :, None], y[:, :, None]
    if min(x.shape[:2]) < win_size:
        raise ValueError(f"image {x.shape[1]}x{x.shape[0]} is smaller than the {win_size}x"
                         f"{win_size} SSIM window")
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    n = win_size * win_size
    cov_norm = n / (n - 1.0)
    scores = []
    for ch in range(x.shape[2]):
        a, b = x[:, :, ch], y[:, :, ch]
        ux, uy = _window_means(a, win_size), _window_means(b, win_size)
        uxx, uyy = _window_means(a * a, win_size), _window_means(b * b, win_size)
        uxy = _window_means(a * b, win_size)
        vx, vy = cov_norm * (uxx - ux * ux), cov_norm * (uyy - uy * uy)
        vxy = cov_norm * (uxy - ux * uy)
        s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
        scores.append(float(s.mean()))
    return float(np.mean(scores))


def _same_shape(x: np.ndarray, y: np.ndarray) -> None:
    if x.shape != y.shape:
        raise ValueError(f"output {x.shape[1]}x{x.shape[0]} and reference "
                         f"{y.shape[1]}x{y.shape[0]} differ in size")


def row_hash(row_id: int, seed: int = 0) -> int:
    """A stable 64-bit pseudo-random number per (seed, row): the same on every run and rerun."""
    digest = hashlib.blake2b(f"{seed}:{row_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def sampled(row_id: int, rate: float, seed: int = 0) -> bool:
    """Deterministic per-row sampling: the same rows are measured on every run and rerun."""
    if rate >= 1.0:
        return True
    if rate <= 0.0:
        return False
    return row_hash(row_id, seed) / 2 ** 64 < rate
