"""Bytes <-> pixels, and nothing else: no network, no GPU.

Decoding refuses what is not safe or not an image before spending memory on it: the format is
checked against an allowlist, the declared size against ``max_pixels`` (decompression bombs)
before any pixel is decoded. EXIF orientation is applied, so the network sees the photo the
way a viewer shows it, and the output is written upright with orientation reset to 1. Modes:

- RGB as is; L (and 1) grey, replicated to three channels and written back as grey;
- LA, RGBA, PA and P with transparency: the alpha channel is kept aside and put back untouched;
- P without transparency, CMYK, YCbCr, LAB, HSV: converted to RGB (written as RGB);
- I;16 family (16-bit grey): uint16 pixels end to end, written as 16-bit PNG/TIFF;
- 32-bit integer / float modes are refused with ``unsupported_mode``;
- 16 bits per channel colour (48/64-bit RGB(A), 16-bit LA or CMYK), which Pillow silently reads
  as 8 bits, is refused with ``unsupported_depth``; animated WebP/PNG and multi-page TIFF with
  ``multi_frame`` (only the first frame would be written). Nothing is dropped on an ok row.

The ICC profile and EXIF block are carried to the output where the format can hold them.
Every failure is an ``ImageError`` whose reason is one of: empty, corrupt, truncated,
unsupported_format, too_large, unsupported_mode, unsupported_depth, multi_frame, encode_failed.
Messages never quote the object's bytes (they reach the ledger and the report): a non-image
is described by the type its magic number suggests (``sniff``).

The functions below (``decode``, ``encode``) are the reference behaviour. The worker calls them
through a ``Codec`` backend that ``deblur.io.codec_choice.make_codec`` picks once per actor:

- ``PillowCodec``: those functions in the caller's thread (Pillow's JPEG encoder holds the GIL,
  so threads do not scale it);
- ``PillowProcessCodec``: the same functions in a pool of worker processes (forkserver or
  spawn, never fork: Ray actors are threaded); pixels travel back as numpy arrays, an
  ``ImageError`` keeps its reason and message, and a process that dies (a decoder crash, the
  OOM killer) costs the image it was working on, never the actor;
- ``deblur.io.nvjpeg.NvJpegCodec``: JPEG on the GPU, one of the above for everything else.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import multiprocessing
import os
import posixpath
import re
import select
import signal
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable, Protocol

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from deblur.config import CodecConfig
from deblur.errors import ImageError

log = logging.getLogger("deblur.io.codec")

# Formats we decode. GIF (animation) and formats PIL only half supports are refused clearly.
FORMATS = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp", "TIFF": "tiff", "BMP": "bmp"}
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp")
EXTENSION_OF = {"jpeg": ".jpg", "png": ".png", "webp": ".webp", "tiff": ".tif", "bmp": ".bmp"}
_PIL_NAME = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP", "tiff": "TIFF", "bmp": "BMP"}
_ALPHA_FORMATS = {"png", "webp", "tiff"}
_SIXTEEN_BIT_FORMATS = {"png", "tiff"}
_GREY_MODES = {"L", "1", "LA", "I;16", "I;16L", "I;16B", "I;16N", "I;16S"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I;16S"}
MAX_VALUE = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}
"""Full scale of each pixel dtype ``decode`` produces (and ``encode`` takes)."""

# We enforce our own limit (max_pixels) before decoding; PIL's global one would fire later
# with a less useful message, and differently per format.
Image.MAX_IMAGE_PIXELS = None


@dataclass
class DecodedImage:
    """Decoded pixels (H x W x 3, uint8 or uint16) and what is needed to write them back."""

    pixels: np.ndarray
    """numpy on the host; a torch uint8 tensor on the GPU when nvJPEG keeps what it decoded
    there for the engine (``NvJpegCodec.keep_on_device``): ``host_pixels`` reads either."""
    source_format: str  # jpeg, png, webp, tiff, bmp
    mode: str  # the source's PIL mode, before conversion
    width: int
    height: int
    alpha: np.ndarray | None = None  # H x W, same dtype as pixels
    grey: bool = False
    icc_profile: bytes | None = None
    exif: bytes | None = None


def host_pixels(pixels: Any) -> np.ndarray:
    """Pixels as host numpy: as they are, or copied from a (device) torch tensor. Duck-typed,
    so this module never imports torch."""
    return pixels if isinstance(pixels, np.ndarray) else pixels.cpu().numpy()


_SNIFF_BYTES = 512

# Leading magic numbers of common non-images, in the order they are tried.
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"%PDF-", "PDF"),
    (b"PK\x03\x04", "ZIP/Office"), (b"PK\x05\x06", "ZIP/Office"), (b"PK\x07\x08", "ZIP/Office"),
    (b"\x1f\x8b", "gzip"), (b"BZh", "bzip2"), (b"\xfd7zXZ\x00", "xz"),
    (b"(\xb5/\xfd", "zstd"), (b"7z\xbc\xaf\x27\x1c", "7z"), (b"Rar!\x1a\x07", "RAR"),
    (b"\x7fELF", "ELF executable"), (b"MZ", "Windows executable"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "OLE/legacy Office"),
    (b"OggS", "Ogg media"), (b"ID3", "MP3 audio"), (b"fLaC", "FLAC audio"),
    (b"\x1aE\xdf\xa3", "Matroska/WebM video"), (b"SQLite format 3\x00", "SQLite database"),
    (b"PAR1", "Parquet"), (b"8BPS", "Photoshop PSD"), (b"\x00\x00\x01\x00", "ICO"),
    (b"\xff\x0a", "JPEG XL"), (b"\x00\x00\x00\x0cJXL ", "JPEG XL"),
)
_ISO_BRANDS = {b"heic": "HEIC", b"heix": "HEIC", b"hevc": "HEIC", b"heim": "HEIC",
               b"heis": "HEIC", b"mif1": "HEIF", b"msf1": "HEIF", b"avif": "AVIF",
               b"avis": "AVIF", b"crx ": "Canon CR3 raw"}
_TEXT_CONTROLS = {"\t", "\n", "\r", "\f", "\v"}


def sniff(head: bytes) -> str:
    """What ``head`` (an object's first bytes) looks like, by magic number, in a few words.

    Never any of the bytes themselves: the result goes into failed rows, the ledger and the
    report, and the object may be a credential file that was never meant to be an image.
    """
    if not head:
        return "empty"
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    if head[4:8] == b"ftyp":
        return f"{_ISO_BRANDS.get(head[8:12], 'MP4/QuickTime/ISO media')} (ISO media)"
    if head[:4] == b"RIFF":
        return {b"WAVE": "WAV audio", b"AVI ": "AVI video"}.get(head[8:12], "RIFF container")
    text = _as_text(head)
    if text is None:
        return "unknown binary"
    lowered = text.lstrip("\ufeff \t\r\n").lower()
    if lowered.startswith(("<!doctype html", "<html")) or "<html" in lowered:
        return "HTML"
    if "<svg" in lowered:
        return "SVG (vector graphics)"
    if lowered.startswith("<?xml"):
        return "XML"
    if lowered.startswith(("{", "[")):
        return "looks like JSON/text"
    return "looks like text"


def _as_text(head: bytes) -> str | None:
    """``head`` as text if it reads as UTF-8 (or UTF-16 with a BOM) printable text, else None."""
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return head[:len(head) // 2 * 2].decode("utf-16")
        except UnicodeDecodeError:
            return None
    for cut in range(4):  # the read may end inside a multi-byte character
        try:
            text = head[:len(head) - cut].decode("utf-8")
            break
        except UnicodeDecodeError:
            continue
    else:
        return None
    if all(ch.isprintable() or ch in _TEXT_CONTROLS for ch in text):
        return text
    return None


def _head(stream: BinaryIO) -> bytes:
    stream.seek(0)
    return stream.read(_SNIFF_BYTES)


_BYTES_LITERAL = re.compile(r"""\bb(?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")""")


def _no_bytes(text: str) -> str:
    """``text`` (a decoder's message) with any quoted bytes (``b'...'``) left out."""
    return _BYTES_LITERAL.sub("<bytes>", text)


def _fail(reason: str, name: str, what: str) -> ImageError:
    return ImageError(reason, f"{name}: {what}")


def open_header(stream: BinaryIO, name: str, config: CodecConfig, *,
                whole: bool = False) -> Image.Image:
    """Open the image in ``stream`` reading its header only: format, size and the limits.

    ``decode`` starts with it and ``deblur plan`` calls it on ranged reads, so both give the
    same verdict (unsupported_format, corrupt, too_large, unsupported_depth, multi_frame)
    before any pixel is decoded. ``whole``: ``stream`` holds the whole object in memory, so
    the pages of a multi-page TIFF may be counted for the message (on a ranged read that
    could mean fetching every page's directory; the verdict is the same either way).
    """
    try:
        img = Image.open(stream)
    except UnidentifiedImageError:
        raise _fail("unsupported_format", name,
                    f"not a recognised image (detected: {sniff(_head(stream))}); "
                    f"supported: {', '.join(sorted(FORMATS.values()))}") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types on a broken header
        raise _fail("corrupt", name, f"unreadable header ({type(exc).__name__}: "
                                     f"{_no_bytes(str(exc))})") from None
    if img.format not in FORMATS:
        raise _fail("unsupported_format", name,
                    f"{img.format} images are not supported; convert to "
                    f"{', '.join(sorted(FORMATS.values()))}")
    width, height = img.size
    if width < 1 or height < 1:
        raise _fail("corrupt", name, f"declares an empty size {width}x{height}")
    if width * height > config.max_pixels:
        raise _fail("too_large", name,
                    f"{width}x{height} = {width * height:,} pixels exceeds codec.max_pixels="
                    f"{config.max_pixels:,}; raise it if the image is genuine")
    _refuse_lossy(img, name, whole)
    return img


def _rawmode(img: Image.Image) -> str:
    """The raw pixel layout of ``img``'s first tile (``RGB;16B``, ``I;16``…), or ""."""
    if not img.tile:
        return ""
    args = img.tile[0].args
    raw = args[0] if isinstance(args, tuple) and args else args
    return raw if isinstance(raw, str) else ""


def _refuse_lossy(img: Image.Image, name: str, whole: bool) -> None:
    """Refuse, from the header, what ``decode`` would silently lose: frames, bit depth."""
    if getattr(img, "is_animated", False):  # WebP, APNG (acTL), TIFF (a next directory)
        noun = "pages" if img.format == "TIFF" else "frames"
        count = f"more than one {noun[:-1]}"
        if img.format != "TIFF" or whole:
            try:
                count = f"{img.n_frames} {noun}"
            except Exception:  # noqa: BLE001 - a broken page chain: still more than one
                pass
        raise _fail("multi_frame", name,
                    f"{count}; only single-frame images are deblurred — extract {noun} first")
    if img.mode in _SIXTEEN_BIT_MODES or img.mode in ("I", "F"):
        return  # 16-bit grey is kept exactly; 32-bit modes are decode's unsupported_mode
    if img.format == "PNG":
        deep = _rawmode(img).endswith(";16B")  # IHDR bit depth 16, colour or grey+alpha
    elif img.format == "TIFF":
        bits = img.tag_v2.get(258) or (1,)  # BitsPerSample
        deep = max(bits if isinstance(bits, tuple) else (bits,)) > 8
    else:
        deep = False
    if deep:
        layout = _rawmode(img).split(";")[0] or img.mode
        raise _fail("unsupported_depth", name,
                    f"16 bits per channel {layout} would be written as 8 bits; only 16-bit "
                    f"grey is kept at 16 bits — convert to 8 bits per channel first")


def decode(data: bytes, name: str, config: CodecConfig) -> DecodedImage:
    """Decode ``data`` (the object called ``name``, for messages) into RGB pixels."""
    if not data:
        raise _fail("empty", name, "zero-byte object; re-upload the image")
    img = open_header(io.BytesIO(data), name, config, whole=True)
    source_format = FORMATS[img.format]
    icc = img.info.get("icc_profile")
    try:
        img.load()
        img = ImageOps.exif_transpose(img) or img
    except OSError as exc:
        text = str(exc)
        reason = "truncated" if "truncated" in text or "broken data stream" in text else "corrupt"
        raise _fail(reason, name, f"cannot decode {source_format}: {_no_bytes(text)}") from None
    except Exception as exc:  # noqa: BLE001 - SyntaxError, ValueError, struct.error, …
        raise _fail("corrupt", name, f"cannot decode {source_format}: {type(exc).__name__}: "
                                     f"{_no_bytes(str(exc))}") from None
    exif = img.info.get("exif") or (img.getexif().tobytes() if img.getexif() else None)
    mode = img.mode
    pixels, alpha, grey = _to_rgb(img, name)
    return DecodedImage(pixels=pixels, source_format=source_format, mode=mode,
                        width=img.width, height=img.height, alpha=alpha, grey=grey,
                        icc_profile=icc, exif=exif)


_TRANSPOSE_OF_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
"""EXIF orientation -> the transpose that shows the image upright (``ImageOps.exif_transpose``)."""


def upright_metadata(img: Image.Image) -> tuple[Image.Transpose | None, bytes | None]:
    """What ``decode`` does to the orientation and EXIF of ``img``, without its pixels.

    ``img`` is a header-only image (``open_header``). Returns the transpose ``decode`` applies
    (None when the image is upright already) and the EXIF block ``decode`` records. Another
    decoder (nvJPEG) uses it to produce the same ``DecodedImage`` fields: the EXIF is computed
    by Pillow's own ``exif_transpose`` on a 1x1 stand-in that carries ``img``'s metadata, so it
    follows Pillow exactly (XMP orientation, the tag removed, the block re-serialised).
    """
    stand_in = Image.new("L", (1, 1))
    stand_in.info = {k: v.copy() if isinstance(v, list) else v for k, v in img.info.items()}
    orientation = stand_in.getexif().get(ExifTags.Base.Orientation, 1)
    upright = ImageOps.exif_transpose(stand_in) or stand_in
    exif = upright.info.get("exif") or (upright.getexif().tobytes() if upright.getexif() else None)
    return _TRANSPOSE_OF_ORIENTATION.get(orientation), exif


def _to_rgb(img: Image.Image, name: str) -> tuple[np.ndarray, np.ndarray | None, bool]:
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES:
        grey16 = np.asarray(img).astype(np.uint16)
        return np.repeat(grey16[:, :, None], 3, axis=2), None, True
    if mode in ("I", "F"):
        raise _fail("unsupported_mode", name,
                    f"{'32-bit integer' if mode == 'I' else '32-bit float'} pixels (mode {mode}) "
                    f"are not supported; convert to 8- or 16-bit")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode == "PA":
        img = img.convert("RGBA")
        mode = "RGBA"
    alpha = None
    if mode in ("RGBA", "LA", "RGBa", "La"):
        alpha = np.asarray(img.getchannel("A")).copy()
    grey = mode in _GREY_MODES
    if grey:
        luminance = np.asarray(img.convert("L"))
        return np.repeat(luminance[:, :, None], 3, axis=2), alpha, True
    try:
        rgb = img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise _fail("unsupported_mode", name, f"mode {mode} cannot be converted to RGB: {exc}")
    return np.asarray(rgb).copy(), alpha, False


def output_format(source_format: str, config: CodecConfig) -> str:
    return source_format if config.output_format == "same" else config.output_format


CONTENT_TYPE_OF = {"jpeg": "image/jpeg", "png": "image/png", "webp": "image/webp",
                   "tiff": "image/tiff", "bmp": "image/bmp"}


def content_type(source_format: str, config: CodecConfig) -> str:
    """The MIME type of an output written from a ``source_format`` image: stored with the
    object, so browsers and CDNs serve it as an image (S3 would say binary/octet-stream)."""
    return CONTENT_TYPE_OF[output_format(source_format, config)]


def output_key(key: str, config: CodecConfig) -> str:
    """The output name for ``key``: unchanged, or with the forced format's extension."""
    if config.output_format == "same":
        return key
    stem, ext = posixpath.splitext(key)
    return (stem if ext.lower() in IMAGE_EXTENSIONS else key) + EXTENSION_OF[config.output_format]


def encode(image: DecodedImage, pixels: np.ndarray, config: CodecConfig) -> bytes:
    """Write deblurred ``pixels`` in the output format, with the source's alpha, ICC, EXIF."""
    fmt = output_format(image.source_format, config)
    out = _to_pil(image, pixels, fmt)
    options: dict[str, object] = {}
    if image.icc_profile and fmt in ("jpeg", "png", "webp", "tiff"):
        options["icc_profile"] = image.icc_profile
    if image.exif and fmt in ("jpeg", "png", "webp", "tiff"):
        options["exif"] = _upright_exif(image.exif)
    if fmt == "jpeg":
        options.update(quality=config.quality, optimize=False)
    elif fmt == "webp":
        options.update(quality=config.quality, method=4)
    elif fmt == "png":
        options.update(compress_level=3)  # level 6+ costs 2-3x the time for ~5% size
    elif fmt == "tiff":
        options.update(compression="tiff_deflate")
    buf = io.BytesIO()
    try:
        out.save(buf, _PIL_NAME[fmt], **options)
    except (OSError, ValueError, KeyError) as exc:
        raise ImageError("encode_failed", f"cannot write {fmt}: {exc}") from None
    return buf.getvalue()


def _to_pil(image: DecodedImage, pixels: np.ndarray, fmt: str) -> Image.Image:
    if pixels.dtype == np.uint16:
        grey16 = pixels.astype(np.float32).mean(axis=2).round().astype(np.uint16)
        if fmt in _SIXTEEN_BIT_FORMATS:
            return Image.fromarray(grey16)  # uint16 -> I;16
        return Image.fromarray((grey16 >> 8).astype(np.uint8), "L")
    if image.grey:
        out = Image.fromarray(pixels.astype(np.float32).mean(axis=2).round().astype(np.uint8),
                              "L")
        mode_with_alpha = "LA"
    else:
        out = Image.fromarray(np.ascontiguousarray(pixels), "RGB")
        mode_with_alpha = "RGBA"
    if image.alpha is not None and fmt in _ALPHA_FORMATS:
        out = out.convert(mode_with_alpha)
        out.putalpha(Image.fromarray(image.alpha, "L"))
    return out


def _upright_exif(exif: bytes) -> bytes:
    """The source EXIF with orientation reset to 1: the pixels are already upright."""
    parsed = Image.Exif()
    try:
        parsed.load(exif)
    except Exception:  # noqa: BLE001 - a broken EXIF block is dropped, not fatal
        return b""
    parsed[0x0112] = 1
    return parsed.tobytes()


# -- backends ------------------------------------------------------------------------------

class Codec(Protocol):
    """Bytes <-> pixels for the worker; every backend behaves like ``decode`` and ``encode``."""

    name: str
    """What runs, for the log line and reports (e.g. ``pillow in 7 processes``)."""

    def decode(self, data: bytes, name: str) -> DecodedImage:
        """``decode(data, name, config)``: H x W x 3 numpy pixels on the host."""
        ...

    def encode(self, image: DecodedImage, pixels: np.ndarray) -> bytes:
        """``encode(image, pixels, config)``."""
        ...

    def close(self) -> None:
        """Release processes or device state; the codec is not used afterwards."""
        ...


class PillowCodec:
    """``decode`` and ``encode`` in the caller's thread (the behaviour before backends)."""

    def __init__(self, config: CodecConfig) -> None:
        self.config = config
        self.name = "pillow in-process"

    def decode(self, data: bytes, name: str) -> DecodedImage:
        return decode(data, name, self.config)

    def encode(self, image: DecodedImage, pixels: np.ndarray) -> bytes:
        return encode(image, pixels, self.config)

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class _Failed:
    """An ``ImageError`` on its way back from a pool process (ImageError takes two arguments,
    so it does not survive pickling as itself)."""

    reason: str
    message: str


def _decode_job(data: bytes, name: str, config: CodecConfig) -> DecodedImage | _Failed:
    try:
        return decode(data, name, config)
    except ImageError as exc:
        return _Failed(exc.reason, str(exc.args[0]))


def _encode_job(image: DecodedImage, pixels: np.ndarray, config: CodecConfig) -> bytes | _Failed:
    try:
        return encode(image, pixels, config)
    except ImageError as exc:
        return _Failed(exc.reason, str(exc.args[0]))


def _pool_process_start(owner: int) -> None:
    """Runs first in every pool process; ``owner`` is the actor's pid. Ctrl-C is the owner's to
    handle. An owner that dies without cleaning up (Ray SIGKILLs actors) would leave its pool
    processes waiting on their queue forever (and, with forkserver, the fork server too, which
    stays while any of its children hold its pipe), so each one leaves when its owner does."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(owner,), name="owner-watch", daemon=True).start()


def _exit_with(owner: int) -> None:
    try:
        handle = os.pidfd_open(owner)  # Linux 5.3+: readable once the owner has exited
    except ProcessLookupError:
        os._exit(0)
    except (AttributeError, OSError):
        handle = None
    if handle is not None:
        select.select([handle], [], [])
        os._exit(0)
    if os.name == "nt":  # os.kill(pid, 0) would terminate the owner there
        return
    while True:  # elsewhere: poll
        try:
            os.kill(owner, 0)
        except ProcessLookupError:
            os._exit(0)
        except PermissionError:
            pass
        time.sleep(0.5)


def _pool_context() -> Any:
    """forkserver where there is one (a small server forks clean, single-threaded children
    cheaply), else spawn. Never fork: the actor has threads (fetch, engine, upload, Ray's)."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


_NO_PIXELS = np.empty((0, 0, 3), np.uint8)
_START_TIMEOUT_S = 120.0  # a process imports numpy and Pillow (and the parent's __main__) first


def _ping() -> int:
    return os.getpid()


class PillowProcessCodec:
    """``decode`` and ``encode`` in a pool of ``processes`` worker processes.

    Each call ships the encoded bytes (decode) or the output pixels (encode) to a pool process
    and the result back; the caller's thread waits without holding the GIL, so the engine
    thread keeps the GPU fed while Pillow works. Processes start on demand.

    A pool process that dies breaks the whole pool, failing every call in flight. The pool is
    then replaced, and those calls run again one at a time in a separate single process, so
    the image that kills a process is the only one that fails (``corrupt`` for a decode,
    ``encode_failed`` for an encode), whatever else was in flight with it. If processes cannot
    be started at all (the constructor raises; later: the codec logs an error and carries on
    in-process), no image is blamed for it.
    """

    def __init__(self, config: CodecConfig, processes: int) -> None:
        if processes < 1:
            raise ValueError(f"processes={processes}: a pool needs at least one")
        self.config = config
        self.processes = processes
        self.name = f"pillow in {processes} process{'es' if processes > 1 else ''}"
        self._context = _pool_context()
        self._lock = threading.Lock()
        self._pool = self._new_pool(processes)
        self._isolated: ProcessPoolExecutor | None = None
        self._isolated_lock = threading.Lock()
        self.restarts = 0
        """Times the pool was replaced after one of its processes died."""
        self.in_process = False
        """True once processes could not be started any more: everything runs in-process."""
        try:  # one process up front: a pool that cannot start fails here, not on an image
            self._pool.submit(_ping).result(timeout=_START_TIMEOUT_S)
        except BaseException:
            self._pool.shutdown(wait=False, cancel_futures=True)
            raise

    def _new_pool(self, processes: int) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(processes, mp_context=self._context,
                                   initializer=_pool_process_start, initargs=(os.getpid(),))

    def decode(self, data: bytes, name: str) -> DecodedImage:
        return self._run(_decode_job, (data, name, self.config), ImageError(
            "corrupt", f"{name}: the decoding process died on this image (a crash in the "
                       f"decoder, or it ran out of memory)"))

    def encode(self, image: DecodedImage, pixels: np.ndarray) -> bytes:
        # The source pixels are not needed to write the output: do not ship them.
        header_only = dataclasses.replace(image, pixels=_NO_PIXELS)
        return self._run(_encode_job, (header_only, pixels, self.config), ImageError(
            "encode_failed", "the encoding process died on this image (a crash in the "
                             "encoder, or it ran out of memory)"))

    def _run(self, job: Callable[..., Any], args: tuple[Any, ...], crashed: ImageError) -> Any:
        """``job(*args)`` in the pool; ``crashed`` is raised if it kills its process twice."""
        pool = self._pool
        try:
            outcome = job(*args) if self.in_process else pool.submit(job, *args).result()
        except BrokenProcessPool:
            self._replace(pool)
            outcome = self._run_isolated(job, args, crashed)
        if isinstance(outcome, _Failed):
            raise ImageError(outcome.reason, outcome.message)
        return outcome

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is not broken:
                return  # another thread replaced it already
            broken.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool(self.processes)
            self.restarts += 1
        log.warning("codec: a pool process died; the pool was restarted and the images it was "
                    "working on are retried one at a time")

    def _run_isolated(self, job: Callable[..., Any], args: tuple[Any, ...],
                      crashed: ImageError) -> Any:
        with self._isolated_lock:
            if self._isolated is None:
                isolated = self._new_pool(1)
                try:
                    isolated.submit(_ping).result(timeout=_START_TIMEOUT_S)
                except Exception as exc:  # noqa: BLE001 - no process starts: not the image's fault
                    isolated.shutdown(wait=False, cancel_futures=True)
                    if not self.in_process:
                        log.error("codec: pool processes cannot be started any more (%s: %s); "
                                  "decoding and encoding in-process from now on",
                                  type(exc).__name__, exc)
                    self.in_process = True
                    return job(*args)
                self._isolated = isolated
            try:
                return self._isolated.submit(job, *args).result()
            except BrokenProcessPool:
                self._isolated.shutdown(wait=False, cancel_futures=True)
                self._isolated = None
                raise crashed from None

    def close(self) -> None:
        with self._lock:
            self._pool.shutdown(wait=True, cancel_futures=True)
        with self._isolated_lock:
            if self._isolated is not None:
                self._isolated.shutdown(wait=True, cancel_futures=True)
                self._isolated = None
