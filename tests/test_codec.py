"""Decoding and encoding: modes, orientation, metadata, size limits and every bad input."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageCms

from deblur.io.codec import decode, encode, open_header, output_key
from deblur.config import CodecConfig
from deblur.errors import ImageError
from tests.conftest import image_bytes, noise

CFG = CodecConfig()


def _rgb(w: int = 40, h: int = 30, seed: int = 0) -> Image.Image:
    return Image.fromarray(noise(w, h, seed))


def _reason(data: bytes, cfg: CodecConfig = CFG) -> str:
    with pytest.raises(ImageError) as info:
        decode(data, "s3://b/photo.jpg", cfg)
    assert "s3://b/photo.jpg" in str(info.value)
    return info.value.reason


def test_bad_inputs_have_clear_reasons() -> None:
    jpeg = image_bytes(_rgb(64, 64), "JPEG")
    assert _reason(b"") == "empty"
    assert _reason(b"just some text, not an image") == "unsupported_format"
    assert _reason(jpeg[: len(jpeg) // 3]) in ("truncated", "corrupt")
    assert _reason(image_bytes(_rgb(), "GIF")) == "unsupported_format"
    corrupt = bytearray(image_bytes(_rgb(64, 64), "PNG"))
    corrupt[60:200] = b"\x00" * 140
    assert _reason(bytes(corrupt)) in ("corrupt", "truncated")


def test_decompression_bomb_is_refused_before_decoding() -> None:
    # A PNG declaring 20000 x 20000 pixels, whose data is tiny.
    bomb = image_bytes(Image.new("L", (20000, 20000)), "PNG")
    assert len(bomb) < 1_000_000
    assert _reason(bomb, CodecConfig(max_pixels=100_000_000)) == "too_large"
    assert _reason(image_bytes(_rgb(100, 100), "PNG"), CodecConfig(max_pixels=9_999)) == "too_large"


def test_rgb_round_trip_keeps_size_format_icc_and_exif() -> None:
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x010F] = "TestCam"
    data = image_bytes(_rgb(), "JPEG", icc_profile=icc, exif=exif.tobytes(), quality=95)
    image = decode(data, "x.jpg", CFG)
    assert image.pixels.shape == (30, 40, 3) and image.pixels.dtype == np.uint8
    out = Image.open(io.BytesIO(encode(image, image.pixels, CFG)))
    assert out.format == "JPEG" and out.size == (40, 30)
    assert out.info.get("icc_profile") == icc
    assert out.getexif()[0x010F] == "TestCam"


def test_exif_orientation_is_applied_and_reset() -> None:
    img = _rgb(40, 20)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image = decode(image_bytes(img, "JPEG", exif=exif.tobytes()), "x.jpg", CFG)
    assert (image.width, image.height) == (20, 40) and image.pixels.shape == (40, 20, 3)
    out = Image.open(io.BytesIO(encode(image, image.pixels, CFG)))
    assert out.size == (20, 40) and out.getexif().get(0x0112, 1) == 1


@pytest.mark.parametrize("mode", ["L", "1", "P", "CMYK"])
def test_modes_convert_to_rgb_and_back(mode: str) -> None:
    src = _rgb().convert(mode)
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    image = decode(image_bytes(src, fmt), f"x.{fmt.lower()}", CFG)
    assert image.pixels.shape == (30, 40, 3) and image.pixels.dtype == np.uint8
    out = Image.open(io.BytesIO(encode(image, image.pixels, CFG)))
    assert out.size == (40, 30)
    if mode in ("L", "1"):
        assert out.mode == "L"  # grey stays grey


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_kept_untouched(mode: str) -> None:
    src = _rgb().convert(mode)
    alpha = np.random.default_rng(1).integers(0, 255, (30, 40), np.uint8)
    src.putalpha(Image.fromarray(alpha))
    image = decode(image_bytes(src, "PNG"), "x.png", CFG)
    inverted = 255 - image.pixels
    out = Image.open(io.BytesIO(encode(image, inverted, CFG)))
    assert out.mode == mode
    np.testing.assert_array_equal(np.asarray(out.getchannel("A")), alpha)


def test_palette_with_transparency_keeps_alpha() -> None:
    src = _rgb().convert("P")
    src.info["transparency"] = 0
    image = decode(image_bytes(src, "PNG", transparency=0), "x.png", CFG)
    assert image.alpha is not None


def test_sixteen_bit_grey_stays_sixteen_bit() -> None:
    values = np.random.default_rng(2).integers(0, 65535, (30, 40)).astype(np.uint16)
    data = image_bytes(Image.fromarray(values), "PNG")
    image = decode(data, "x.png", CFG)
    assert image.pixels.dtype == np.uint16
    np.testing.assert_array_equal(image.pixels[:, :, 0], values)
    out = Image.open(io.BytesIO(encode(image, image.pixels, CFG)))
    assert out.mode.startswith("I")
    np.testing.assert_array_equal(np.asarray(out).astype(np.uint16), values)


def test_float_images_are_refused_with_a_reason() -> None:
    data = image_bytes(Image.fromarray(np.zeros((8, 8), np.float32), "F"), "TIFF")
    assert _reason(data) == "unsupported_mode"


def test_forced_output_format_and_keys() -> None:
    cfg = CodecConfig(output_format="webp", quality=80)
    image = decode(image_bytes(_rgb(), "PNG"), "x.png", cfg)
    assert Image.open(io.BytesIO(encode(image, image.pixels, cfg))).format == "WEBP"
    assert output_key("a/b.PNG", cfg) == "a/b.webp"
    assert output_key("a/b.tar", cfg) == "a/b.tar.webp"
    assert output_key("a/b.PNG", CFG) == "a/b.PNG"


# -- no file contents in messages ----------------------------------------------------------

PASSWD = (b"root:x:0:0:root:/root:/bin/bash\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\n"
          b"alice:x:1000:1000:Alice Secret,,,:/home/alice:/bin/bash\n")
NON_IMAGES = {
    "passwd": (PASSWD, "looks like text"),
    "pdf": (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj <</Title (Quarterly secrets)>>", "PDF"),
    "docx": (b"PK\x03\x04\x14\x00\x06\x00word/document.xmlSECRETSECRET", "ZIP/Office"),
    "html": (b"<!DOCTYPE html>\n<html><body>password=hunter2</body></html>", "HTML"),
    "gzip": (b"\x1f\x8b\x08\x00secret.tar\x00\x9a\x17\x33", "gzip"),
    "binary": (bytes(range(7, 0, -1)) + b"\x00\xfe\x80TOKEN=abc123\x81\x00", "unknown binary"),
    "heic": (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heicPRIVATE", "HEIC"),
}


@pytest.mark.parametrize("name", sorted(NON_IMAGES))
def test_non_image_message_names_a_type_and_never_quotes_the_bytes(name: str) -> None:
    content, kind = NON_IMAGES[name]
    with pytest.raises(ImageError) as info:
        decode(content, "s3://b/photo.jpg", CFG)
    message = str(info.value)
    assert info.value.reason == "unsupported_format"
    assert f"detected: {kind}" in message
    assert repr(content[:8]) not in message and "\\x" not in message
    text = content.decode("latin-1")
    leaked = [text[i:i + 5] for i in range(len(text) - 4) if text[i:i + 5] in message]
    assert not leaked, f"{message!r} quotes the object's bytes {leaked}"


# -- nothing silently lost on an ok row ----------------------------------------------------

def png16(pixels: np.ndarray) -> bytes:
    """A 16-bit-per-channel PNG (Pillow cannot write one): H x W x C uint16, C = 2, 3 or 4."""
    height, width, channels = pixels.shape
    colour_type = {2: 4, 3: 2, 4: 6}[channels]
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body)))

    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def tiff48(pixels: np.ndarray) -> bytes:
    """An uncompressed 16-bit-per-channel RGB TIFF (little-endian): H x W x 3 uint16."""
    height, width, _ = pixels.shape
    data = pixels.astype("<u2").tobytes()
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 3, 8 + len(data)),
               (259, 3, 1, 1), (262, 3, 1, 2), (273, 4, 1, 8), (277, 3, 1, 3),
               (278, 4, 1, height), (279, 4, 1, len(data))]
    bits = struct.pack("<3H", 16, 16, 16) + b"\x00\x00"
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHI", tag, kind, count) + (struct.pack("<I", value) if kind == 4 or tag == 258
                                                 else struct.pack("<HH", value, 0))
        for tag, kind, count, value in entries) + struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8 + len(data) + len(bits)) + data + bits + ifd


def _frames(count: int) -> list[Image.Image]:
    return [_rgb(seed=i) for i in range(count)]


def _animated(fmt: str, count: int, **options: object) -> bytes:
    first, *rest = _frames(count)
    return image_bytes(first, fmt, save_all=True, append_images=rest, **options)


_DEEP = np.random.default_rng(3).integers(0, 65535, (6, 5, 4)).astype(np.uint16)
LOSSY = {
    "animated.webp": (_animated("WEBP", 4, duration=100), "multi_frame", "4 frames"),
    "animated.png": (_animated("PNG", 3, duration=100), "multi_frame", "3 frames"),
    "pages.tif": (_animated("TIFF", 3), "multi_frame", "3 pages"),
    "rgb48.png": (png16(_DEEP[:, :, :3]), "unsupported_depth",
                  "16 bits per channel RGB would be written as 8 bits"),
    "rgba64.png": (png16(_DEEP), "unsupported_depth",
                   "16 bits per channel RGBA would be written as 8 bits"),
    "la32.png": (png16(_DEEP[:, :, :2]), "unsupported_depth",
                 "16 bits per channel LA would be written as 8 bits"),
    "rgb48.tif": (tiff48(_DEEP[:, :, :3]), "unsupported_depth",
                  "16 bits per channel RGB would be written as 8 bits"),
}


@pytest.mark.parametrize("name", sorted(LOSSY))
def test_what_would_be_lost_fails_the_row_with_the_reason(name: str) -> None:
    data, reason, what = LOSSY[name]
    with pytest.raises(ImageError) as info:
        decode(data, f"s3://b/{name}", CFG)
    assert info.value.reason == reason and what in str(info.value), str(info.value)
    if reason == "multi_frame":
        assert "only single-frame images are deblurred" in str(info.value)
    # deblur plan: the same verdict from the header alone, on a stream that is not in memory
    with pytest.raises(ImageError) as planned:
        open_header(io.BufferedReader(io.BytesIO(data)), f"s3://b/{name}", CFG)
    assert planned.value.reason == reason


def test_single_frame_and_eight_bit_files_of_the_same_kinds_still_decode() -> None:
    for data in (_animated("WEBP", 1), _animated("PNG", 1), _animated("TIFF", 1),
                 image_bytes(_with_alpha_la(), "PNG")):
        image = decode(data, "x", CFG)
        assert image.pixels.dtype == np.uint8 and image.pixels.shape == (30, 40, 3)
    grey = np.random.default_rng(4).integers(0, 65535, (6, 5)).astype(np.uint16)
    image = decode(image_bytes(Image.fromarray(grey), "TIFF"), "x.tif", CFG)
    assert image.pixels.dtype == np.uint16  # 16-bit grey TIFF is kept exactly
    np.testing.assert_array_equal(image.pixels[:, :, 0], grey)


def _with_alpha_la() -> Image.Image:
    img = _rgb().convert("L")
    img.putalpha(128)
    return img
