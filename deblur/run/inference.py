"""A batch of images in, the deblurred batch out: the only code that runs the network.

Pixels arrive as H x W x 3 numpy arrays (uint8, or uint16 for 16-bit sources) and leave in the
same dtype and size. In between: upload as integers (4x less traffic than float), scale to
[0, 1] on the device, reflect-pad to a common multiple-of-4 shape, run in the configured
precision, take the full-resolution output ``out[2]``, clamp to [0, 1] and quantise with the
authors' rounding (add half a step, then truncate, as their ``eval.py`` does before saving), crop
each image back. Images over ``tile_pixels`` run as overlapping tiles blended back together, so
activation memory is bounded by the tile size, not the photo.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deblur.config import ModelConfig
from deblur.io.codec import MAX_VALUE
from deblur.errors import ModelError
from deblur.model import STRIDE

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_device(config: ModelConfig) -> torch.device:
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ModelError("model.device='cuda' but no CUDA device is visible; use auto or cpu")
        return torch.device("cuda")
    return torch.device("cpu")


def pick_dtype(config: ModelConfig, device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA (fp16's range is the riskier one), fp32 on CPU (half is slow there)."""
    if config.precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _DTYPES[config.precision]


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def reflect_pad(x: torch.Tensor, pad_h: int, pad_w: int) -> torch.Tensor:
    """Pad bottom/right by mirroring; pads wider than the image are done in several steps.

    torch's reflect mode needs pad < size, so a 20 px image padded to a 64 px bucket reflects
    repeatedly; a 1 px side cannot reflect and is replicated instead.
    """
    while pad_h > 0 or pad_w > 0:
        h, w = x.shape[-2:]
        step_h = min(pad_h, h - 1) if h > 1 else 0
        step_w = min(pad_w, w - 1) if w > 1 else 0
        if step_h == 0 and step_w == 0:  # a 1-pixel side: nothing to mirror
            return F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        x = F.pad(x, (0, step_w, 0, step_h), mode="reflect")
        pad_h, pad_w = pad_h - step_h, pad_w - step_w
    return x


@dataclass(frozen=True)
class TileGrid:
    """Where the tiles of one large image start, along each axis."""

    tile: int
    ys: list[int]
    xs: list[int]


def tile_grid(height: int, width: int, tile_pixels: int, overlap: int) -> TileGrid:
    """Square tiles (a multiple of 4, at most ``tile_pixels``), the last aligned to the edge."""
    tile = max(STRIDE * 16, int(math.isqrt(tile_pixels)) // STRIDE * STRIDE)
    if overlap >= tile // 2:
        raise ModelError(f"tile overlap {overlap} must be under half the tile size {tile}")

    def starts(size: int) -> list[int]:
        if size <= tile:
            return [0]
        step = tile - overlap
        out = list(range(0, size - tile, step))
        return out + [size - tile]

    return TileGrid(tile=tile, ys=starts(height), xs=starts(width))


def _ramp(length: int, start: int, size: int, overlap: int) -> np.ndarray:
    """1-D blend weight of a tile: rises over the overlap on inner edges, flat at image edges."""
    weights = np.ones(length, np.float32)
    if overlap == 0:
        return weights
    ramp = (np.arange(overlap, dtype=np.float32) + 1) / (overlap + 1)
    if start > 0:
        weights[:overlap] = np.minimum(weights[:overlap], ramp)
    if start + length < size:
        weights[-overlap:] = np.minimum(weights[-overlap:], ramp[::-1])
    return weights


class Deblurrer:
    """One model replica on one device, turning batches of pixels into deblurred pixels.

    Args:
        model: a network from ``deblur.model.create_model`` with its weights loaded.
        config: device, precision, channels_last and tiling settings.
    """

    def __init__(self, model: nn.Module, config: ModelConfig) -> None:
        self.config = config
        self.device = pick_device(config)
        self.dtype = pick_dtype(config, self.device)
        # channels_last helps cuDNN's tensor-core kernels; on CPU it only adds copies.
        self.memory_format = (torch.channels_last if config.channels_last
                              and self.device.type == "cuda" else torch.contiguous_format)
        self.model = model.eval().to(self.device, self.dtype, memory_format=self.memory_format)

    def deblur(self, images: list[np.ndarray], shape: tuple[int, int] | None = None
               ) -> list[np.ndarray]:
        """Deblur same-dtype images together, padded to ``shape`` (default: the largest).

        Images over ``tile_pixels`` are tiled one by one; the rest run as one batch.
        """
        if not images:
            return []
        dtypes = {img.dtype for img in images}
        if len(dtypes) != 1 or next(iter(dtypes)) not in MAX_VALUE:
            raise ModelError(f"a batch needs one dtype of uint8 or uint16, got {dtypes}")
        if any(img.shape[0] * img.shape[1] > self.config.tile_pixels for img in images):
            return [self.deblur_tiled(img) for img in images]
        return self._run_batch(images, shape)

    def _run_batch(self, images: list[np.ndarray], shape: tuple[int, int] | None
                   ) -> list[np.ndarray]:
        height = max(img.shape[0] for img in images)
        width = max(img.shape[1] for img in images)
        target_h, target_w = shape or (height, width)
        target_h, target_w = round_up(max(target_h, height), STRIDE), round_up(
            max(target_w, width), STRIDE)
        batch = torch.cat([self._to_input(img, target_h, target_w) for img in images])
        output = self.forward(batch)
        return [self._to_pixels(out, img) for out, img in zip(output, images)]

    def _to_input(self, img: np.ndarray, height: int, width: int) -> torch.Tensor:
        scale = MAX_VALUE[img.dtype]
        raw = torch.from_numpy(np.ascontiguousarray(img).view(
            np.int16) if img.dtype == np.uint16 else np.ascontiguousarray(img))
        x = raw.to(self.device, non_blocking=True).permute(2, 0, 1).unsqueeze(0)
        if img.dtype == np.uint16:  # torch has no uint16 arithmetic: reinterpret, then unwrap
            x = x.to(torch.int32) & 0xFFFF
        x = x.to(torch.float32) / scale
        x = reflect_pad(x, height - img.shape[0], width - img.shape[1])
        return x.to(self.dtype).contiguous(memory_format=self.memory_format)

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Network pass on a prepared NCHW batch; the full-resolution output, clamped, fp32."""
        with torch.inference_mode():
            return self.model(batch)[2].float().clamp_(0.0, 1.0)

    def _to_pixels(self, out: torch.Tensor, like: np.ndarray) -> np.ndarray:
        """Crop, quantise the authors' way ((x + 0.5/max) * max, truncated), back to HWC."""
        height, width = like.shape[:2]
        scale = MAX_VALUE[like.dtype]
        q = (out[:, :height, :width] + 0.5 / scale).mul_(scale).clamp_(0, scale)
        q = q.to(torch.int32).permute(1, 2, 0).cpu().numpy()
        return q.astype(like.dtype)

    def deblur_tiled(self, img: np.ndarray) -> np.ndarray:
        """Overlapping tiles, each run alone, blended with separable linear ramps.

        The blend weight of a pixel is wy(y) * wx(x) summed over the tiles covering it; that sum
        is separable too, so only two 1-D normalisers are kept instead of a full weight image.
        The accumulator is float32 H x W x 3 on the host (12 bytes per pixel).
        """
        height, width = img.shape[:2]
        grid = tile_grid(height, width, self.config.tile_pixels, self.config.tile_overlap)
        overlap = self.config.tile_overlap
        acc = np.zeros((height, width, 3), np.float32)
        norm_y = np.zeros(height, np.float32)
        norm_x = np.zeros(width, np.float32)
        scale = MAX_VALUE[img.dtype]
        for y in grid.ys:
            th = min(grid.tile, height - y)
            wy = _ramp(th, y, height, overlap)
            norm_y[y:y + th] += wy
            for x in grid.xs:
                tw = min(grid.tile, width - x)
                wx = _ramp(tw, x, width, overlap)
                if y == grid.ys[0]:
                    norm_x[x:x + tw] += wx
                tile = img[y:y + th, x:x + tw]
                batch = self._to_input(tile, round_up(th, STRIDE), round_up(tw, STRIDE))
                out = self.forward(batch)[0, :, :th, :tw].permute(1, 2, 0).cpu().numpy()
                acc[y:y + th, x:x + tw] += out * (wy[:, None, None] * wx[None, :, None])
        acc /= norm_y[:, None, None]
        acc /= norm_x[None, :, None]
        np.clip(acc, 0.0, 1.0, out=acc)
        # Same rounding as the untiled path.
        acc += 0.5 / scale
        acc *= scale
        np.clip(acc, 0, scale, out=acc)
        return acc.astype(img.dtype)
