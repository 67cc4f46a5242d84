"""Decoding and encoding: modes, orientation, metadata, size limits and every bad input."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageCms

from deblur.io.codec import decode, encode, output_key
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
