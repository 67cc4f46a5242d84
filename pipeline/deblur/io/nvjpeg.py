"""JPEG on the GPU with nvJPEG (through torchvision), Pillow for everything else.

Decoding a JPEG here gives the same ``DecodedImage`` as ``codec.decode``: the header, the size
limits and every verdict on a bad file come from Pillow (``codec.open_header``), and so do the
ICC profile, the EXIF block and the orientation (``codec.upright_metadata``); only the pixels
come from nvJPEG, within a couple of levels of libjpeg's (another IDCT and upsampling). The
EXIF orientation is applied on the device with the transpose Pillow would use. Encoding writes
the pixels with nvJPEG and then inserts the EXIF (orientation reset to 1) and ICC segments
exactly as Pillow writes them.

What stays on Pillow (the ``fallback`` codec, in-process or its process pool), image by image:
other formats, CMYK/YCCK JPEGs and RGB ones stored without colour transform (Adobe transform
0), grey output (nvJPEG encodes 3 channels only), 16-bit, a file that does not end in an EOI
marker (Pillow decides between truncated and tolerable), an EXIF block Pillow cannot read,
and any image nvJPEG fails on. Two differences remain (docs/architecture.md): torchvision
has nvJPEG encode 4:4:4 where Pillow subsamples chroma 4:2:0 (larger files at the same
quality), and its output need not carry a JFIF segment (Pillow's says 1:1, no density).

Concurrent callers (the worker's fetch and upload threads) are coalesced into batched nvJPEG
calls (``Coalescer``), which is where nvJPEG gets its throughput.

With ``keep_on_device`` (set by the worker when its engine takes device tensors) a decoded
image's pixels stay on the GPU as an H x W x 3 uint8 tensor, and ``encode`` takes such a
tensor as it comes out of the engine: from nvJPEG decode through the network to nvJPEG
encode only compressed bytes cross the bus. Pillow's fallbacks still get and give numpy.

torchvision is an optional extra (``deblur[gpu]``): it is imported in ``NvJpegCodec`` only,
and ``codec_choice.make_codec`` builds one only when CUDA is available.
"""

from __future__ import annotations

import contextlib
import io
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from PIL import Image

from deblur.config import CodecConfig
from deblur.io.codec import (Codec, DecodedImage, _upright_exif, decode, host_pixels,
                             open_header, output_format, upright_metadata)

log = logging.getLogger("deblur.io.nvjpeg")

MAX_BYTES_IN_MARKER = 65533
"""Most payload bytes in one JPEG marker segment (Pillow refuses longer EXIF blocks)."""
_ICC_CHUNK = MAX_BYTES_IN_MARKER - 14  # b"ICC_PROFILE\0" + sequence number + count
_SWAPS_SIDES = {Image.Transpose.TRANSPOSE, Image.Transpose.TRANSVERSE,
                Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_270}

T = TypeVar("T")
R = TypeVar("R")


# -- orientation and metadata (device-independent, tested on the CPU) ----------------------

def orient(chw: torch.Tensor, method: Image.Transpose | None) -> torch.Tensor:
    """``chw`` (C x H x W) transposed as Pillow's ``Image.transpose(method)`` would."""
    if method is None:
        return chw
    if method == Image.Transpose.FLIP_LEFT_RIGHT:
        return chw.flip(2)
    if method == Image.Transpose.FLIP_TOP_BOTTOM:
        return chw.flip(1)
    if method == Image.Transpose.ROTATE_180:
        return chw.flip(1, 2)
    if method == Image.Transpose.ROTATE_90:  # counter-clockwise
        return torch.rot90(chw, 1, dims=(1, 2))
    if method == Image.Transpose.ROTATE_270:
        return torch.rot90(chw, -1, dims=(1, 2))
    if method == Image.Transpose.TRANSPOSE:  # about the main diagonal
        return chw.transpose(1, 2)
    if method == Image.Transpose.TRANSVERSE:  # about the other diagonal
        return chw.transpose(1, 2).flip(1, 2)
    raise ValueError(f"unknown transpose {method!r}")


def _segment(marker: int, payload: bytes) -> bytes:
    return bytes((0xFF, marker)) + (len(payload) + 2).to_bytes(2, "big") + payload


def with_metadata(jpeg: bytes, exif: bytes | None, icc_profile: bytes | None) -> bytes:
    """``jpeg`` with an APP1 EXIF segment and APP2 ICC segments, laid out as Pillow writes them:
    after SOI and any APP0 (JFIF), EXIF first, the profile in chunks of at most 65519 bytes."""
    if jpeg[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG stream (no SOI marker)")
    segments = b""
    if exif:
        if len(exif) > MAX_BYTES_IN_MARKER:
            raise ValueError("EXIF data is too long")
        segments += _segment(0xE1, exif)
    if icc_profile:
        chunks = [icc_profile[i:i + _ICC_CHUNK] for i in range(0, len(icc_profile), _ICC_CHUNK)]
        for number, chunk in enumerate(chunks, 1):
            segments += _segment(0xE2, b"ICC_PROFILE\0" + bytes((number, len(chunks))) + chunk)
    at = 2
    while jpeg[at:at + 2] == b"\xff\xe0":  # keep APP0 (JFIF) first, as the JFIF spec asks
        at += 2 + int.from_bytes(jpeg[at + 2:at + 4], "big")
    return jpeg[:at] + segments + jpeg[at:]


def _ends_with_eoi(data: bytes) -> bool:
    """True when the stream ends with the EOI marker (trailing NUL padding allowed)."""
    return data[-4096:].rstrip(b"\0").endswith(b"\xff\xd9")


# -- batching concurrent callers -----------------------------------------------------------

class _Slot(Generic[T, R]):
    __slots__ = ("item", "wake", "done", "result", "error")

    def __init__(self, item: T) -> None:
        self.item = item
        self.wake = threading.Event()
        self.done = False
        self.result: R | None = None
        self.error: BaseException | None = None


class Coalescer(Generic[T, R]):
    """Runs ``run`` on lists of items gathered from concurrent callers, one list at a time.

    No thread of its own and no waiting for company: a caller that finds nothing running runs
    a batch at once with what is queued (its own item first); callers arriving meanwhile
    queue, and when that batch ends the first of them runs the next one for everyone queued
    by then. One caller alone pays no added latency; N busy callers share calls of up to
    ``max_items``. ``run`` returns one result per item, an exception instance for an item that
    failed; an exception out of ``run`` fails its whole batch.
    """

    def __init__(self, run: Callable[[list[T]], Sequence[R | BaseException]],
                 max_items: int = 32) -> None:
        self._run = run
        self.max_items = max_items
        self._lock = threading.Lock()
        self._queue: list[_Slot[T, R]] = []
        self._running = False
        self.batches: list[int] = []
        """Size of every batch run (for tests and benchmarks)."""

    def __call__(self, item: T) -> R:
        slot: _Slot[T, R] = _Slot(item)
        with self._lock:
            self._queue.append(slot)
            lead = not self._running
            self._running = True
        if not lead:
            slot.wake.wait()  # set when our batch is done, or when it is our turn to lead
        if not slot.done:
            with self._lock:  # our slot heads the queue: nobody else takes from it meanwhile
                batch = self._queue[:self.max_items]
                del self._queue[:self.max_items]
            try:
                self._run_batch(batch)
            finally:
                with self._lock:
                    if self._queue:
                        self._queue[0].wake.set()  # the next leader
                    else:
                        self._running = False
        if slot.error is not None:
            raise slot.error
        return slot.result  # type: ignore[return-value]

    def _run_batch(self, batch: list[_Slot[T, R]]) -> None:
        self.batches.append(len(batch))
        try:
            results = list(self._run([slot.item for slot in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"{len(results)} results for {len(batch)} items")
        except BaseException as exc:  # noqa: BLE001 - handed to every caller in the batch
            results = [exc] * len(batch)
        for slot, result in zip(batch, results):
            if isinstance(result, BaseException):
                slot.error = result
            else:
                slot.result = result
            slot.done = True
            slot.wake.set()


# -- the backend ---------------------------------------------------------------------------

class NvJpegCodec:
    """JPEG decode/encode with nvJPEG on ``device``; ``fallback`` for the rest (see the module).

    Args:
        config: the job's codec settings (quality, limits, output format).
        fallback: the Pillow codec for what nvJPEG does not take.
        device: a CUDA device.
        max_batch: most images in one nvJPEG call.
        ops: stands in for ``torchvision.io`` (``decode_jpeg``, ``encode_jpeg``,
            ``ImageReadMode``); tests pass a CPU double. Default: torchvision, imported here.

    Raises (from the constructor, so ``make_codec`` picks Pillow with the reason): ImportError
    without torchvision, RuntimeError when a self-test round trip disagrees with Pillow.
    """

    def __init__(self, config: CodecConfig, fallback: Codec, device: str | torch.device = "cuda",
                 max_batch: int = 32, ops: Any = None) -> None:
        if ops is None:
            import torchvision.io as ops  # optional extra: only ever imported here
        self.config = config
        self.fallback = fallback
        self.ops = ops
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        # Side streams keep codec copies and kernels from queueing behind the model's (and
        # decodes from waiting for encodes).
        self._streams = ({what: torch.cuda.Stream(self.device) for what in ("decode", "encode")}
                         if self.device.type == "cuda" else {})
        self._decoder: Coalescer[tuple[bytes, bool, Image.Transpose | None],
                                 np.ndarray | torch.Tensor] = Coalescer(self._decode_batch,
                                                                        max_batch)
        self._encoder: Coalescer[np.ndarray | torch.Tensor, bytes] = Coalescer(
            self._encode_batch, max_batch)
        self._lock = threading.Lock()
        self.fallbacks = {"decode": 0, "encode": 0}
        """Images nvJPEG failed on and Pillow handled instead (not counting routed formats)."""
        self.keep_on_device = False
        """Decoded JPEG pixels stay on ``device`` as torch tensors instead of coming back as
        numpy (the worker sets it when its engine takes them: ``ShardProcessor``)."""
        self._self_test()
        self.name = f"nvjpeg on {self.device} for JPEG, {fallback.name} for the rest"

    # -- the Codec interface -----------------------------------------------------------------

    def decode(self, data: bytes, name: str) -> DecodedImage:
        if not data or not _ends_with_eoi(data):
            return self.fallback.decode(data, name)
        img = open_header(io.BytesIO(data), name, self.config,  # Pillow's verdicts
                          whole=True)
        if (img.format != "JPEG" or img.mode not in ("RGB", "L")
                or img.info.get("adobe_transform") == 0):  # RGB stored as is: libjpeg's call
            return self.fallback.decode(data, name)
        try:
            method, exif = upright_metadata(img)
        except Exception:  # noqa: BLE001 - unreadable EXIF: Pillow's decode gives the verdict
            return self.fallback.decode(data, name)
        width, height = img.size
        if method in _SWAPS_SIDES:
            width, height = height, width
        grey = img.mode == "L"
        try:
            pixels = self._decoder((data, grey, method))
            if tuple(pixels.shape) != (height, width, 3):
                raise RuntimeError(f"nvJPEG gave {pixels.shape[1]}x{pixels.shape[0]} pixels "
                                   f"for a {width}x{height} image")
        except Exception as exc:  # noqa: BLE001 - any nvJPEG failure: Pillow decides
            self._fell_back("decode", name, exc)
            return self.fallback.decode(data, name)
        return DecodedImage(pixels=pixels, source_format="jpeg", mode=img.mode, width=width,
                            height=height, alpha=None, grey=grey,
                            icc_profile=img.info.get("icc_profile"), exif=exif)

    def encode(self, image: DecodedImage, pixels: np.ndarray | torch.Tensor) -> bytes:
        """``pixels``: numpy, or (``keep_on_device``) the engine's uint8 tensor output."""
        uint8 = (pixels.dtype == torch.uint8 if isinstance(pixels, torch.Tensor)
                 else pixels.dtype == np.uint8)
        if (output_format(image.source_format, self.config) != "jpeg" or image.grey
                or not uint8 or pixels.ndim != 3 or pixels.shape[2] != 3):
            return self.fallback.encode(image, host_pixels(pixels))
        exif = _upright_exif(image.exif) if image.exif else b""  # what Pillow would write
        if len(exif) > MAX_BYTES_IN_MARKER:
            # Pillow refuses it, with its message.
            return self.fallback.encode(image, host_pixels(pixels))
        try:
            data = self._encoder(pixels)
            return with_metadata(data, exif, image.icc_profile)
        except Exception as exc:  # noqa: BLE001
            self._fell_back("encode", f"{image.width}x{image.height} image", exc)
            return self.fallback.encode(image, host_pixels(pixels))

    def close(self) -> None:
        self.fallback.close()

    # -- device work -------------------------------------------------------------------------

    def _on_stream(self, what: str) -> contextlib.AbstractContextManager[Any]:
        stream = self._streams.get(what)
        return torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()

    def _decode_batch(self, jobs: list[tuple[bytes, bool, Image.Transpose | None]]
                      ) -> list[np.ndarray | torch.Tensor | Exception]:
        out: list[np.ndarray | torch.Tensor | Exception] = (
            [RuntimeError("not decoded")] * len(jobs))
        keep = self.keep_on_device
        with self._on_stream("decode"):
            for grey in (False, True):  # one read mode per nvJPEG call
                index = [i for i, job in enumerate(jobs) if job[1] == grey]
                if not index:
                    continue
                mode = self.ops.ImageReadMode.GRAY if grey else self.ops.ImageReadMode.RGB
                inputs = [torch.frombuffer(bytearray(jobs[i][0]), dtype=torch.uint8)
                          for i in index]
                decoded: list[Any]
                try:
                    decoded = list(self.ops.decode_jpeg(inputs, mode=mode, device=self.device))
                except Exception:  # noqa: BLE001 - one bad image fails the call: find it
                    decoded = []
                    for tensor in inputs:
                        try:
                            decoded.append(self.ops.decode_jpeg(tensor, mode=mode,
                                                                device=self.device))
                        except Exception as exc:  # noqa: BLE001
                            decoded.append(exc)
                for i, chw in zip(index, decoded):
                    if isinstance(chw, Exception):
                        out[i] = chw
                        continue
                    hwc = orient(chw, jobs[i][2]).permute(1, 2, 0)
                    if grey:
                        hwc = hwc.expand(-1, -1, 3)
                    # Kept: the engine packs it into its batch on the device (no host bounce).
                    out[i] = hwc.contiguous() if keep else hwc.contiguous().cpu().numpy()
            stream = self._streams.get("decode")
            if keep and stream is not None:
                # The engine reads these on its own stream: they must be complete first (the
                # numpy path's .cpu() waited for the same thing).
                stream.synchronize()
        return out

    def _encode_batch(self, images: list[np.ndarray | torch.Tensor]) -> list[bytes | Exception]:
        with self._on_stream("encode"):
            # An engine output on the device is complete (its batch was collected) and is read
            # here in place: the one CHW copy below is device-side.
            tensors = [(img if isinstance(img, torch.Tensor) else
                        torch.from_numpy(img if img.flags.writeable else img.copy()))
                       .to(self.device).permute(2, 0, 1).contiguous() for img in images]
            if self.device.type == "cuda":  # nvJPEG encodes on a stream of its own
                torch.cuda.current_stream(self.device).synchronize()
            encoded: list[Any]
            try:
                encoded = list(self.ops.encode_jpeg(tensors, quality=self.config.quality))
            except Exception:  # noqa: BLE001
                encoded = []
                for tensor in tensors:
                    try:
                        encoded.append(self.ops.encode_jpeg(tensor, quality=self.config.quality))
                    except Exception as exc:  # noqa: BLE001
                        encoded.append(exc)
            return [data if isinstance(data, Exception) else data.cpu().numpy().tobytes()
                    for data in encoded]

    def _fell_back(self, what: str, name: str, exc: Exception) -> None:
        with self._lock:
            self.fallbacks[what] += 1
            first = self.fallbacks[what] == 1
        log.log(logging.WARNING if first else logging.DEBUG,
                "nvjpeg: %s of %s failed, Pillow used instead%s: %s: %s", what, name,
                " (further ones are logged at debug level)" if first else "",
                type(exc).__name__, exc)

    def _self_test(self) -> None:
        """One small round trip through nvJPEG, checked against Pillow, before it is trusted:
        a broken install (no nvJPEG in this torchvision, a driver mismatch) fails here, once,
        instead of on every image."""
        y, x = np.mgrid[0:48, 0:64]
        rgb = np.stack([x * 4, y * 5, (x + y) * 2], axis=2).clip(0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, "JPEG", quality=95, subsampling=0)
        data = buf.getvalue()
        reference = decode(data, "self-test.jpg", self.config).pixels
        (pixels,) = self._decode_batch([(data, False, None)])
        if isinstance(pixels, Exception):
            raise pixels
        if pixels.shape != reference.shape or _max_diff(pixels, reference) > 8:
            raise RuntimeError("nvJPEG decode disagrees with Pillow on the self-test image")
        (encoded,) = self._encode_batch([reference])
        if isinstance(encoded, Exception):
            raise encoded
        back = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))
        if back.shape != reference.shape or _max_diff(back, reference) > 16:
            raise RuntimeError("nvJPEG encode does not round-trip the self-test image")


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
