"""Bytes <-> pixels, and nothing else: no network, no GPU.

Decoding refuses what is not safe or not an image before spending memory on it: the format is
checked against an allowlist, the declared size against ``max_pixels`` (decompression bombs)
before any pixel is decoded. EXIF orientation is applied, so the network sees the photo the
way a viewer shows it, and the output is written upright with orientation reset to 1. Modes:

- RGB as is; L (and 1) grey, replicated to three channels and written back as grey;
- LA, RGBA, PA and P with transparency: the alpha channel is kept aside and put back untouched;
- P without transparency, CMYK, YCbCr, LAB, HSV: converted to RGB (written as RGB);
- I;16 family (16-bit grey): uint16 pixels end to end, written as 16-bit PNG/TIFF;
- 32-bit integer / float modes are refused with ``unsupported_mode``.

The ICC profile and EXIF block are carried to the output where the format can hold them.
Every failure is an ``ImageError`` whose reason is one of: empty, corrupt, truncated,
unsupported_format, too_large, unsupported_mode, encode_failed.
"""

from __future__ import annotations

import io
import posixpath
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from deblur.config import CodecConfig
from deblur.errors import ImageError

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
    source_format: str  # jpeg, png, webp, tiff, bmp
    mode: str  # the source's PIL mode, before conversion
    width: int
    height: int
    alpha: np.ndarray | None = None  # H x W, same dtype as pixels
    grey: bool = False
    icc_profile: bytes | None = None
    exif: bytes | None = None


def _head(stream: BinaryIO) -> bytes:
    stream.seek(0)
    return stream.read(8)


def _fail(reason: str, name: str, what: str) -> ImageError:
    return ImageError(reason, f"{name}: {what}")


def open_header(stream: BinaryIO, name: str, config: CodecConfig) -> Image.Image:
    """Open the image in ``stream`` reading its header only: format, size and the limits.

    ``decode`` starts with it and ``deblur plan`` calls it on ranged reads, so both give the
    same verdict (unsupported_format, corrupt, too_large) before any pixel is decoded.
    """
    try:
        img = Image.open(stream)
    except UnidentifiedImageError:
        raise _fail("unsupported_format", name,
                    f"not a recognised image (starts {_head(stream)!r}); "
                    f"supported: {', '.join(sorted(FORMATS.values()))}") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types on a broken header
        raise _fail("corrupt", name, f"unreadable header ({type(exc).__name__}: {exc})") from None
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
    return img


def decode(data: bytes, name: str, config: CodecConfig) -> DecodedImage:
    """Decode ``data`` (the object called ``name``, for messages) into RGB pixels."""
    if not data:
        raise _fail("empty", name, "zero-byte object; re-upload the image")
    img = open_header(io.BytesIO(data), name, config)
    source_format = FORMATS[img.format]
    icc = img.info.get("icc_profile")
    try:
        img.load()
        img = ImageOps.exif_transpose(img) or img
    except OSError as exc:
        text = str(exc)
        reason = "truncated" if "truncated" in text or "broken data stream" in text else "corrupt"
        raise _fail(reason, name, f"cannot decode {source_format}: {text}") from None
    except Exception as exc:  # noqa: BLE001 - SyntaxError, ValueError, struct.error, …
        raise _fail("corrupt", name,
                    f"cannot decode {source_format}: {type(exc).__name__}: {exc}") from None
    exif = img.info.get("exif") or (img.getexif().tobytes() if img.getexif() else None)
    mode = img.mode
    pixels, alpha, grey = _to_rgb(img, name)
    return DecodedImage(pixels=pixels, source_format=source_format, mode=mode,
                        width=img.width, height=img.height, alpha=alpha, grey=grey,
                        icc_profile=icc, exif=exif)


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
