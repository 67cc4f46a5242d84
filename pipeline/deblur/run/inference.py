"""A batch of images in, the deblurred batch out: the only code that runs the network.

Pixels arrive as H x W x 3 numpy arrays (uint8, or uint16 for 16-bit sources) and leave in the
same dtype and size. A batch is copied into one reused host buffer (pinned on CUDA) and
crosses to the device in one copy, as integers (4x less traffic than float); on the device it
is scaled to [0, 1], each image reflect-padded to the batch's multiple-of-4 shape, run in the
configured precision, clamped and quantised with the authors' rounding (add half a step, then
truncate, as their ``eval.py`` does before saving), and the quantised batch comes back in one
copy. Images that are already torch tensors (H x W x 3 uint8, decoded on the device by nvJPEG)
never touch the host: they are packed into the batch on their device, and the outputs are
handed back as views of the quantised batch on the device, for nvJPEG to encode there; only
the fp16 finite flag crosses the bus (tiled images do go through the host). Images whose
padded pass would be over ``tile_pixels`` run as overlapping tiles blended back together, so
activation memory is bounded by the tile size, not the photo; a strip (1 x 1,000,000) is cut
along its length, each tile's padded area within the budget.

Precision: ``auto`` is fp16 on CUDA (measured ten times closer to fp32 than bf16 at the same
speed) and fp32 on CPU. 16-bit sources always run in fp32 (bf16 keeps ~8 bits of mantissa),
and a batch whose output is not finite in reduced precision is rerun in fp32 and counted.

Compilation: with ``model.compile`` on, the network runs through ``torch.compile`` with static
shapes; batches are padded to a power-of-two size so a (bucket, batch size) pair, not every
count of images, makes a graph. A compile failure falls back to eager with one logged reason.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from deblur.config import ModelConfig
from deblur.io.codec import MAX_VALUE, host_pixels
from deblur.errors import ModelError, one_line
from deblur.model import STRIDE

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

Pixels = np.ndarray | torch.Tensor
"""An H x W x 3 image: numpy on the host, or a uint8 tensor where a codec decoded it (nvJPEG:
on the device)."""

log = logging.getLogger("deblur.run.inference")


def pick_device(config: ModelConfig) -> torch.device:
    if config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ModelError("model.device='cuda' but no CUDA device is visible; use auto or cpu")
        return torch.device("cuda")
    return torch.device("cpu")


def pick_dtype(config: ModelConfig, device: torch.device) -> torch.dtype:
    """auto: fp16 on CUDA, fp32 on CPU (half precision is slow there).

    fp16 over bf16: on an H200 at 720p, against fp32 in 8-bit levels, fp16 was off by 0.02 on
    average (max 1) and bf16 by 0.25 (max 2), at the same speed; fp16's narrower range is
    covered by the fp32 rerun of any batch whose output is not finite.
    """
    if config.precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
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


def pack_tensors(images: list[torch.Tensor], rows: int, height: int, width: int
                 ) -> torch.Tensor:
    """Tensor images (H x W x 3 uint8, all on one device) in one new (rows, height, width, 3)
    batch on that device, each at the top left: ``_host_batch``'s twin for pixels that are
    already on the device (one device-side copy each, nothing through the host). Rows past the
    images (the padding of a compiled batch) are zero."""
    device = images[0].device
    batch = torch.empty((rows, height, width, 3), dtype=torch.uint8, device=device)
    if rows > len(images):
        batch[len(images):].zero_()
    for i, img in enumerate(images):
        batch[i, :img.shape[0], :img.shape[1]].copy_(img)
        if device.type == "cuda":
            # Decoded on the codec's stream, read here on this one: keep the allocator from
            # reusing its memory before this stream's copy ran (the decoder drops it earlier).
            img.record_stream(torch.cuda.current_stream(device))
    return batch


def unpack_tensors(quantised: torch.Tensor, images: list[Pixels]) -> list[torch.Tensor]:
    """Each image's output: its top-left H x W corner of the quantised NHWC batch, as a view on
    the batch's device (no copy: the encoder reads it where it is)."""
    return [quantised[i, :img.shape[0], :img.shape[1]] for i, img in enumerate(images)]


@dataclass(frozen=True)
class TileGrid:
    """Where the tiles of one large image start, along each axis, and their size."""

    tile: int
    """The side of a square tile (config.tile_side): what a large photo is cut into."""
    ys: list[int]
    xs: list[int]
    tile_h: int = 0
    """Height and width of a tile (multiples of 4, so a tile's padded area is at most
    ``tile_h * tile_w``); a strip narrower than ``tile`` keeps its whole padded extent on that
    axis and its tiles get the rest of the budget along the other."""
    tile_w: int = 0


def padded_pixels(height: int, width: int) -> int:
    """Pixels of the pass the network makes over an image alone (each side padded to 4)."""
    return round_up(height, STRIDE) * round_up(width, STRIDE)


def tile_grid(height: int, width: int, tile_pixels: int, overlap: int) -> TileGrid:
    """Tiles whose padded area is at most ``tile_pixels``, the last aligned to the edge."""
    side = max(STRIDE * 16, int(math.isqrt(tile_pixels)) // STRIDE * STRIDE)
    full_h, full_w = round_up(height, STRIDE), round_up(width, STRIDE)
    tile_h, tile_w = min(full_h, side), min(full_w, side)
    # A thin axis is never split: the other takes what it leaves of the budget.
    if tile_h < side:
        tile_w = min(full_w, max(side, tile_pixels // tile_h // STRIDE * STRIDE))
    elif tile_w < side:
        tile_h = min(full_h, max(side, tile_pixels // tile_w // STRIDE * STRIDE))
    for size, tile in ((height, tile_h), (width, tile_w)):
        if size > tile and overlap >= tile // 2:
            raise ModelError(f"tile overlap {overlap} must be under half the tile size {tile}")

    def starts(size: int, tile: int) -> list[int]:
        if size <= tile:
            return [0]
        step = tile - overlap
        out = list(range(0, size - tile, step))
        return out + [size - tile]

    return TileGrid(tile=side, ys=starts(height, tile_h), xs=starts(width, tile_w),
                    tile_h=tile_h, tile_w=tile_w)


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
        config: device, precision, compilation, channels_last and tiling settings.
    """

    def __init__(self, model: nn.Module, config: ModelConfig) -> None:
        self.config = config
        self.device = pick_device(config)
        self.dtype = pick_dtype(config, self.device)
        # channels_last helps cuDNN's tensor-core kernels; on CPU it only adds copies.
        self.memory_format = (torch.channels_last if config.channels_last
                              and self.device.type == "cuda" else torch.contiguous_format)
        # fp32 weights kept on the host for the batches that must run in fp32 (16-bit sources,
        # non-finite outputs): casting the reduced-precision copy back would not restore them.
        self._fp32_weights = (copy.deepcopy(model).eval().float().cpu()
                              if self.dtype != torch.float32 else None)
        self.model = model.eval().to(self.device, self.dtype, memory_format=self.memory_format)
        self._fp32_model: nn.Module | None = None if self.dtype != torch.float32 else self.model
        self.fp32_reruns = 0
        """Images rerun in fp32 because their reduced-precision output was not finite."""
        self._compiled: Any = None
        self.compile_error: str | None = None
        if _compile_wanted(config, self.device):
            self._compiled = _compile(self.model, config)
        self._buffers: dict[tuple[tuple[int, ...], torch.dtype, int], torch.Tensor] = {}
        self._slot = 0  # which of a shape's two host buffers the next batch packs into
        self._copy_stream = (torch.cuda.Stream(self.device) if self.device.type == "cuda"
                             else None)

    # -- public ----------------------------------------------------------------------------

    def launch(self, images: list[Pixels], shape: tuple[int, int] | None = None
               ) -> Callable[[], list[Pixels]]:
        """Queue ``deblur(images, shape)`` on the device and return at once with a function
        that waits for and returns its outputs.

        The engine queues batch k+1 before it collects batch k, so the device goes from one
        batch to the next while the host unpacks k and packs k+2. At most two batches may be
        in flight (host buffers alternate between two); collect them in launch order. Tiled
        images (and every batch on a CPU, where nothing runs asynchronously) are computed here.
        Tensor images give tensor outputs on the device (see the module); the rest numpy.
        """
        if not images or any(padded_pixels(*img.shape[:2]) > self.config.tile_pixels
                             for img in images):
            outputs = self.deblur(images, shape)
            return lambda: outputs
        self._check_dtypes(images)
        return self._launch_batch(images, shape)

    def deblur(self, images: list[Pixels], shape: tuple[int, int] | None = None
               ) -> list[Pixels]:
        """Deblur same-dtype images together, padded to ``shape`` (default: the largest).

        Images whose padded pass is over ``tile_pixels`` are tiled one by one; the rest run as
        one batch. An image is padded only up to a multiple of 4 of its own size unless a larger
        ``shape`` (a coarse bucket, opt-in) asks for more, so by default an output never
        depends on the batch it ran in.
        """
        if not images:
            return []
        self._check_dtypes(images)
        if any(padded_pixels(*img.shape[:2]) > self.config.tile_pixels for img in images):
            return [self.deblur_tiled(img) for img in images]
        return self._launch_batch(images, shape)()

    def warm(self, shape: tuple[int, int], batch_sizes: list[int]) -> None:
        """Compile (or, eager, allocate) for ``shape`` at each batch size before real work."""
        height, width = round_up(shape[0], STRIDE), round_up(shape[1], STRIDE)
        for size in sorted({_graph_batch(b) for b in batch_sizes}):
            self._launch_batch([np.zeros((height, width, 3), np.uint8)] * size, None)()

    @staticmethod
    def _check_dtypes(images: list[Pixels]) -> None:
        dtypes = {img.dtype for img in images}
        if dtypes == {torch.uint8}:  # tensors (a device decoder's): uint8 only
            return
        if len(dtypes) != 1 or next(iter(dtypes)) not in MAX_VALUE:
            raise ModelError(f"a batch needs one dtype of uint8 or uint16 (or uint8 tensors), "
                             f"got {dtypes}")

    # -- one batch -------------------------------------------------------------------------

    @torch.inference_mode()
    def _launch_batch(self, images: list[Pixels], shape: tuple[int, int] | None
                      ) -> Callable[[], list[Pixels]]:
        """Pack, upload, pad, run, quantise and start the download of one batch; nothing here
        waits for the device. The returned function does the batch's one wait. Tensor images
        are packed where they are and their outputs stay there (nothing is downloaded but the
        finite flag)."""
        height = max(img.shape[0] for img in images)
        width = max(img.shape[1] for img in images)
        target_h, target_w = shape or (height, width)
        target_h = round_up(max(target_h, height), STRIDE)
        target_w = round_up(max(target_w, width), STRIDE)
        resident = isinstance(images[0], torch.Tensor)
        sixteen = not resident and images[0].dtype == np.uint16
        scale = 255.0 if resident else MAX_VALUE[images[0].dtype]
        count = len(images)
        rows = count if self._compiled is None or sixteen else _graph_batch(count)
        if resident:  # already on the device: packed there (``to`` is then a no-op)
            x = pack_tensors(images, rows, target_h, target_w)  # type: ignore[arg-type]
        else:
            x = self._host_batch(images, rows, target_h, target_w)  # type: ignore[arg-type]
        x = x.to(self.device, non_blocking=True)  # the batch's one host-to-device copy
        x = _unsigned(x).to(torch.float32).div_(scale).permute(0, 3, 1, 2)  # (B, 3, H, W)
        x = torch.cat([reflect_pad(x[i:i + 1, :, :img.shape[0], :img.shape[1]],
                                   target_h - img.shape[0], target_w - img.shape[1])
                       for i, img in enumerate(images)] + [x[count:]])
        out = self._network(x, sixteen)
        # Whether a reduced-precision output is finite is read with the pixels, not here: a
        # check now would wait for the device and stall the next batch's launch.
        reduced = not sixteen and self.dtype != torch.float32
        finite = torch.isfinite(out[:count]).all().reshape(1) if reduced else None
        quantised = self._quantise(out, scale, sixteen)[:count]
        wait = self._download(None if resident else quantised, finite)

        def collect() -> list[Pixels]:
            nonlocal quantised
            pixels, ok = wait()
            if not ok:  # fp16 overflows on rare inputs: this batch alone goes again in fp32
                log.warning("non-finite %s output in a batch of %d: rerunning it in fp32",
                            str(self.dtype).removeprefix("torch."), count)
                self.fp32_reruns += count
                with torch.inference_mode():
                    quantised = self._quantise(self._network(x, True), scale, sixteen)[:count]
                    # Resident: the wait alone (the encoders read the outputs on other streams).
                    pixels, _ = self._download(None if resident else quantised, None)()
            if resident:
                return unpack_tensors(quantised, images)  # type: ignore[return-value]
            assert pixels is not None
            return [np.ascontiguousarray(pixels[i, :img.shape[0], :img.shape[1]],
                                         dtype=img.dtype) for i, img in enumerate(images)]

        return collect

    @staticmethod
    def _quantise(out: torch.Tensor, scale: int, sixteen: bool) -> torch.Tensor:
        """Clamped, then the authors' rounding (half a step up, truncate); NHWC integers."""
        return (out.clamp_(0.0, 1.0).add_(0.5 / scale).mul_(scale).clamp_(0, scale)
                .to(torch.int32 if sixteen else torch.uint8).permute(0, 2, 3, 1))

    def _host_batch(self, images: list[np.ndarray], rows: int, height: int, width: int
                    ) -> torch.Tensor:
        """The batch in a reused host buffer (pinned on CUDA), images at the top left.

        Two buffers per shape alternate: the upload of batch k may still be queued while batch
        k+1 is packed, and batch k-1 (the other buffer's last user) was collected before k+1
        was launched. uint16 travels as int16 (no uint16 arithmetic in torch); ``_unsigned``
        undoes it.
        """
        dtype = torch.int16 if images[0].dtype == np.uint16 else torch.uint8
        self._slot ^= 1
        key = ((rows, height, width), dtype, self._slot)
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = torch.empty((rows, height, width, 3), dtype=dtype,
                                 pin_memory=self.device.type == "cuda")
            self._buffers[key] = buffer
        view = buffer.numpy().view(np.uint16 if dtype == torch.int16 else np.uint8)
        for i, img in enumerate(images):
            view[i, :img.shape[0], :img.shape[1]] = img
        return buffer

    def _download(self, quantised: torch.Tensor | None, finite: torch.Tensor | None
                  ) -> Callable[[], tuple[np.ndarray | None, bool]]:
        """Start copying the quantised batch (and its finite flag) to the host in one copy on
        a side stream; the returned function waits for it: the batch's one synchronisation.
        ``quantised`` None (outputs that stay on the device): only the flag is copied, and the
        wait still covers the whole batch, so its outputs are complete when it returns."""
        if self._copy_stream is None:
            return lambda: (None if quantised is None else quantised.numpy(),
                            finite is None or bool(finite.item()))
        done = torch.cuda.Event()
        self._copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._copy_stream):
            host = None
            if quantised is not None:
                host = torch.empty(quantised.shape, dtype=quantised.dtype, pin_memory=True)
                host.copy_(quantised, non_blocking=True)
            flag = None
            if finite is not None:
                flag = torch.empty(finite.shape, dtype=finite.dtype, pin_memory=True)
                flag.copy_(finite, non_blocking=True)
            done.record()
        # The side stream uses tensors the main stream allocated: keep the allocator from
        # handing their memory out again before the copy is done.
        if quantised is not None:
            quantised.record_stream(self._copy_stream)
        if finite is not None:
            finite.record_stream(self._copy_stream)

        def wait() -> tuple[np.ndarray | None, bool]:
            done.synchronize()
            return (None if host is None else host.numpy()), flag is None or bool(flag.item())

        return wait

    # -- the network -----------------------------------------------------------------------

    def forward(self, batch: torch.Tensor, fp32: bool = False, count: int | None = None
                ) -> torch.Tensor:
        """Network pass on an NCHW float batch in [0, 1]: the full-resolution output, clamped,
        fp32. ``fp32`` runs the float32 network whatever the precision; a reduced-precision
        output that is not finite in its first ``count`` rows (default all; the rest pad a
        compiled batch) is rerun in fp32 and counted in ``fp32_reruns``."""
        out = self._network(batch, fp32)
        if (not fp32 and self.dtype != torch.float32
                and not bool(torch.isfinite(out[:count]).all())):
            # fp16 overflows on rare inputs: this batch alone goes again in fp32.
            rows = len(out) if count is None else count
            log.warning("non-finite %s output in a batch of %d: rerunning it in fp32",
                        str(self.dtype).removeprefix("torch."), rows)
            self.fp32_reruns += rows
            out = self._network(batch, True)
        return out.clamp_(0.0, 1.0)

    def _network(self, batch: torch.Tensor, fp32: bool) -> torch.Tensor:
        """out[2] of the network (compiled when it can be) in fp32, not clamped."""
        batch = batch.to(torch.float32 if fp32 else self.dtype).contiguous(
            memory_format=self.memory_format)
        with torch.inference_mode():
            if self._compiled is not None and not fp32:
                try:
                    return self._compiled(batch)[2].float()
                except torch.cuda.OutOfMemoryError:
                    raise
                except Exception as exc:  # noqa: BLE001 - any compiler failure: go eager
                    self._give_up_compiling(exc)
            model = self._fp32() if fp32 else self.model
            return model(batch)[2].float()

    def _fp32(self) -> nn.Module:
        """The float32 network on the device (moved there once, when a batch first needs it)."""
        if self._fp32_model is None:
            assert self._fp32_weights is not None
            self._fp32_model = self._fp32_weights.to(self.device,
                                                     memory_format=self.memory_format)
            self._fp32_weights = None
        return self._fp32_model

    def _give_up_compiling(self, exc: BaseException) -> None:
        self.compile_error = f"{type(exc).__name__}: {one_line(exc)}"
        log.warning("torch.compile failed, running eager from now on: %s", self.compile_error)
        self._compiled = None

    @torch.inference_mode()
    def deblur_tiled(self, img: Pixels, tile_pixels: int | None = None) -> np.ndarray:
        """Overlapping tiles, each run alone, blended with separable linear ramps.

        The blend weight of a pixel is wy(y) * wx(x) summed over the tiles covering it; that sum
        is separable too, so only two 1-D normalisers are kept instead of a full weight image.
        The accumulator is float32 H x W x 3 on the host (12 bytes per pixel). ``tile_pixels``
        (default: the configured one) is smaller when the engine retries after running out of
        memory. A tensor image (decoded on the device) is brought to the host first: tiles are
        the rare path, and their accumulator is on the host anyway.
        """
        img = host_pixels(img)
        height, width = img.shape[:2]
        grid = tile_grid(height, width, tile_pixels or self.config.tile_pixels,
                         self.config.tile_overlap)
        overlap = self.config.tile_overlap
        acc = np.zeros((height, width, 3), np.float32)
        norm_y = np.zeros(height, np.float32)
        norm_x = np.zeros(width, np.float32)
        scale = MAX_VALUE[img.dtype]
        for y in grid.ys:
            th = min(grid.tile_h, height - y)
            wy = _ramp(th, y, height, overlap)
            norm_y[y:y + th] += wy
            for x in grid.xs:
                tw = min(grid.tile_w, width - x)
                wx = _ramp(tw, x, width, overlap)
                if y == grid.ys[0]:
                    norm_x[x:x + tw] += wx
                tile = torch.from_numpy(_signed(img[y:y + th, x:x + tw])).to(self.device)
                tile = _unsigned(tile).to(torch.float32).div_(scale).permute(2, 0, 1)[None]
                tile = reflect_pad(tile, round_up(th, STRIDE) - th, round_up(tw, STRIDE) - tw)
                out = self.forward(tile, fp32=img.dtype == np.uint16)
                out = out[0, :, :th, :tw].permute(1, 2, 0).cpu().numpy()
                acc[y:y + th, x:x + tw] += out * (wy[:, None, None] * wx[None, :, None])
        acc /= norm_y[:, None, None]
        acc /= norm_x[None, :, None]
        np.clip(acc, 0.0, 1.0, out=acc)
        # Same rounding as the untiled path.
        acc += 0.5 / scale
        acc *= scale
        np.clip(acc, 0, scale, out=acc)
        return acc.astype(img.dtype)


def _signed(img: np.ndarray) -> np.ndarray:
    """uint16 pixels reinterpreted as int16 (torch cannot hold uint16 arithmetic)."""
    img = np.ascontiguousarray(img)
    return img.view(np.int16) if img.dtype == np.uint16 else img


def _unsigned(x: torch.Tensor) -> torch.Tensor:
    """Undo ``_signed`` on the device: int16 back to 0..65535 (in int32)."""
    return x.to(torch.int32) & 0xFFFF if x.dtype == torch.int16 else x


def _graph_batch(count: int) -> int:
    """The batch size a compiled graph is made for: the next power of two."""
    return 1 << max(0, count - 1).bit_length()


def _compile_wanted(config: ModelConfig, device: torch.device) -> bool:
    return config.compile == "on" or (config.compile == "auto" and device.type == "cuda")


def _compile(model: nn.Module, config: ModelConfig) -> Any:
    """``torch.compile`` with static shapes and a persistent inductor cache."""
    cache = config.compile_cache_dir or os.environ.get("TORCHINDUCTOR_CACHE_DIR") or str(
        Path.home() / ".cache" / "deblur" / "inductor")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # read by inductor when it first compiles
    import torch._dynamo

    # One graph per (bucket shape, power-of-two batch): allow a realistic number of them.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
    return torch.compile(model, mode=config.compile_mode, dynamic=False)
