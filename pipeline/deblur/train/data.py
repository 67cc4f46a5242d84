"""Training pairs: (blurry, sharp) crops, from a paired manifest or sharp images blurred on the fly.

Sources are read with the job code (``job.manifest.read_batches``: a manifest of any supported
format, a folder or an s3:// prefix; ``io.storage``; ``io.codec.decode``), so a training set
is addressed exactly as a job's input is. Images are decoded once per worker and kept in
memory as uint8: a fine-tuning set is hundreds of images, not millions.

Sample ``i`` is a pure function of (seed, i) (``blur.sample_rng``): which image, where the crop
is, the flip and the blur. Ranks take disjoint, interleaved indices, so a run's batches do
not depend on when it was stopped and resumed, and N workers with batch B see exactly the
samples one process with batch N x B sees.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from deblur.errors import ConfigError, ManifestError, PipelineError
from deblur.train.blur import BlurConfig, convolve, degrade, max_margin, random_kernel, sample_rng


@dataclass(frozen=True)
class Pair:
    """One training image: the sharp pixels and, for paired data, the blurry ones."""

    name: str
    sharp: np.ndarray  # H x W x 3 uint8
    blurry: np.ndarray | None = None


def _decode(data: bytes, uri: str) -> np.ndarray:
    from deblur.config import CodecConfig
    from deblur.io.codec import decode

    pixels = decode(data, uri, CodecConfig()).pixels
    if pixels.dtype == np.uint16:  # 16-bit sources: train on the 8-bit range the model sees
        pixels = (pixels.astype(np.float32) / 257.0).round().astype(np.uint8)
    return np.ascontiguousarray(pixels)


def _rows(source: str) -> Iterator[tuple[str, str | None]]:
    """(key URI, reference URI or None) for every row of a manifest, folder or prefix."""
    from deblur.io.storage import get_storage
    from deblur.job.manifest import _relative, read_batches

    base, batches = read_batches(source, get_storage())
    for batch in batches:
        keys = batch.column("key").to_pylist()
        refs = (batch.column("reference").to_pylist() if "reference" in batch.schema.names
                else [None] * len(keys))
        for key, ref in zip(keys, refs):
            if key:
                yield _relative(key, base)[0], (_relative(ref, base)[0] if ref else None)


def load_images(source: str, paired: bool, limit: int | None = None) -> list[Pair]:
    """Decode a training source. ``paired``: rows need a ``reference`` (the sharp image) of
    the same size as ``key`` (the blurry one); otherwise ``key`` is a sharp image."""
    from deblur.io.storage import get_storage

    storage = get_storage()
    pairs: list[Pair] = []
    try:
        for key, ref in _rows(source):
            if paired:
                if ref is None:
                    raise ConfigError(f"training data {source}: row {key!r} has no reference "
                                      f"(the sharp image); a paired manifest needs columns "
                                      f"key (blurry) and reference (sharp), or use --synthetic")
                blurry, sharp = _decode(storage.get(key), key), _decode(storage.get(ref), ref)
                if blurry.shape != sharp.shape:
                    raise ConfigError(f"training pair {key!r}: blurry {blurry.shape[1]}x"
                                      f"{blurry.shape[0]} but reference {sharp.shape[1]}x"
                                      f"{sharp.shape[0]}; pairs must be the same size")
                pairs.append(Pair(key, sharp, blurry))
            else:
                pairs.append(Pair(key, _decode(storage.get(key), key)))
            if limit is not None and len(pairs) >= limit:
                break
    except (ConfigError, ManifestError):
        raise
    except PipelineError as exc:  # a missing object, a corrupt image: say which, stop early
        raise ConfigError(f"training data {source}: {exc}") from None
    if not pairs:
        raise ConfigError(f"training data {source}: no images found")
    return pairs


class PairDataset(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """Sample ``index`` -> (blurry, sharp) float32 C x crop x crop tensors in 0..1."""

    def __init__(self, pairs: list[Pair], crop: int, seed: int,
                 blur: BlurConfig | None = None, rotate: bool = False,
                 min_scale: float = 1.0) -> None:
        self.pairs, self.crop, self.seed = pairs, crop, seed
        self.blur = blur if blur is not None else BlurConfig()
        self.rotate, self.min_scale = rotate, min_scale

    def __len__(self) -> int:  # indices are unbounded; Dataset needs a length only for repr
        return 2 ** 62

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = sample_rng(self.seed, index)
        pair = self.pairs[int(rng.integers(len(self.pairs)))]
        if pair.blurry is not None:
            blurry, sharp = self._crop_pair(rng, pair.blurry, pair.sharp)
        else:
            blurry, sharp = self._synthetic(rng, pair.sharp)
        if rng.random() < 0.5:  # the authors' augmentation: a random horizontal flip
            blurry, sharp = blurry[:, ::-1], sharp[:, ::-1]
        if self.rotate:  # with the flip, all 8 orientations: a small set looks 8x larger
            k = int(rng.integers(4))
            blurry, sharp = np.rot90(blurry, k), np.rot90(sharp, k)
        return _tensor(blurry), _tensor(sharp)

    def _crop_pair(self, rng: np.random.Generator, blurry: np.ndarray, sharp: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
        h, w = sharp.shape[:2]
        c = self.crop
        if h < c or w < c:  # a small image: reflect it up to the crop, both sides alike
            pad = ((0, max(0, c - h)), (0, max(0, c - w)), (0, 0))
            blurry, sharp = np.pad(blurry, pad, mode="reflect"), np.pad(sharp, pad,
                                                                         mode="reflect")
            h, w = sharp.shape[:2]
        y, x = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
        return blurry[y:y + c, x:x + c], sharp[y:y + c, x:x + c]

    def _synthetic(self, rng: np.random.Generator, sharp: np.ndarray
                   ) -> tuple[np.ndarray, np.ndarray]:
        # Cut the crop with a margin as wide as the largest kernel's radius, blur, keep the
        # interior: the blurry crop sees real neighbouring pixels, never a padded border.
        margin = max_margin(self.blur)
        c, span = self.crop, self.crop + 2 * margin
        if self.min_scale < 1.0:
            sharp = self._rescaled(rng, sharp, span)
        h, w = sharp.shape[:2]
        if h < span or w < span:
            pad = ((0, max(0, span - h)), (0, max(0, span - w)), (0, 0))
            sharp = np.pad(sharp, pad, mode="reflect")
            h, w = sharp.shape[:2]
        y, x = int(rng.integers(0, h - span + 1)), int(rng.integers(0, w - span + 1))
        window = sharp[y:y + span, x:x + span].astype(np.float64) / 255.0
        kernel = random_kernel(rng, self.blur)
        r = kernel.shape[0] // 2
        if r > margin:  # a path longer than max_margin assumed: reflect the rest in
            extra = r - margin
            window = np.pad(window, ((extra, extra), (extra, extra), (0, 0)), mode="reflect")
            margin = r
        blurred = convolve(window[margin - r:margin + c + r, margin - r:margin + c + r],
                           kernel, valid=True)
        return degrade(blurred, rng, self.blur), sharp[y + margin:y + margin + c,
                                                       x + margin:x + margin + c]


    def _rescaled(self, rng: np.random.Generator, sharp: np.ndarray, span: int) -> np.ndarray:
        """A random window of ``sharp`` shown at a random scale in [min_scale, 1]: the same
        photograph yields other textures and edge widths, and downscaling (antialiased)
        sharpens what the camera left soft. Only for synthetic blur: the blur is made after."""
        from PIL import Image

        scale = float(rng.uniform(self.min_scale, 1.0))
        h, w = sharp.shape[:2]
        side = min(h, w, int(math.ceil(span / scale)))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        target = max(span, round(side * scale))
        window = Image.fromarray(np.ascontiguousarray(sharp[y:y + side, x:x + side]))
        return np.asarray(window.resize((target, target), Image.BICUBIC, reducing_gap=None))


def _tensor(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(pixels).transpose(2, 0, 1).copy()).float() / 255.0


class RankSampler(torch.utils.data.Sampler[int]):  # type: ignore[misc]
    """The sample indices of one rank from ``start_step`` to ``steps``: at step s, rank r of
    ``world`` takes indices (s * world + r) * batch ... + batch - 1."""

    def __init__(self, start_step: int, steps: int, batch: int, rank: int, world: int) -> None:
        self.start_step, self.steps, self.batch = start_step, steps, batch
        self.rank, self.world = rank, world

    def __iter__(self) -> Iterator[int]:
        for step in range(self.start_step, self.steps):
            first = (step * self.world + self.rank) * self.batch
            yield from range(first, first + self.batch)

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.batch


def holdout_set(pairs: list[Pair], size: int, seed: int, blur: BlurConfig
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed (blurry, sharp) centre crops of the held-out images, for the PSNR every K steps.

    Sizes round down to a multiple of 4 (the network's stride); the blur of held-out image j
    is sample j of a seed of its own, so it never changes during a run or across restarts.
    """
    from deblur.train.blur import blur_image

    out = []
    for j, pair in enumerate(pairs):
        h, w = pair.sharp.shape[:2]
        ch, cw = min(size, h) // 4 * 4, min(size, w) // 4 * 4
        y, x = (h - ch) // 2, (w - cw) // 2
        sharp = pair.sharp[y:y + ch, x:x + cw]
        if pair.blurry is not None:
            blurry = pair.blurry[y:y + ch, x:x + cw]
        else:
            blurry = blur_image(sharp, seed + 7919, j, blur)
        out.append((_tensor(blurry), _tensor(sharp)))
    return out
