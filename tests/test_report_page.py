"""Pieces of report.html that need no job: the zoomed crop lands on the input's sharpest edges,
both crops show the same pixels, the histograms' quantiles and axis labels."""

from __future__ import annotations

import io
import re

import numpy as np
from PIL import Image

from deblur.observe.qa import ZOOM_SIDE, sharpest_box, views
from deblur.observe.report import Histogram


def _flat_with_edges(width: int, height: int, x: int, y: int, side: int,
                     cell: int = 4) -> Image.Image:
    """Smooth gradient everywhere, a sharp checkerboard (``cell``-pixel squares) at (x, y)."""
    rng = np.linspace(60, 120, width)
    pixels = np.repeat(np.tile(rng, (height, 1))[..., None], 3, axis=2)
    yy, xx = np.mgrid[0:side, 0:side]
    pixels[y:y + side, x:x + side] = (((yy // cell + xx // cell) % 2) * 255)[..., None]
    return Image.fromarray(pixels.astype(np.uint8))


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _inside(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Share of box a that lies inside box b."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(0, w) * max(0, h) / ((a[2] - a[0]) * (a[3] - a[1]))


def test_the_crop_is_the_region_of_most_gradient_energy() -> None:
    image = _flat_with_edges(400, 300, 230, 40, 100)
    box = sharpest_box(image, 128)
    assert box[2] - box[0] == box[3] - box[1] == 128
    assert _inside((230, 40, 330, 140), box) == 1.0, box  # the whole textured patch


def test_large_images_are_searched_at_reduced_size_and_mapped_back() -> None:
    # 16-pixel squares: edges that survive the 6x reduction of a 3000-pixel image.
    image = _flat_with_edges(3000, 2000, 2500, 1700, 256, cell=16)
    left, top, right, bottom = sharpest_box(image, 128)
    assert right - left == 128 and right <= 3000 and bottom <= 2000
    assert _inside((left, top, right, bottom), (2500, 1700, 2756, 1956)) > 0.9


def test_small_images_crop_their_short_side() -> None:
    left, top, right, bottom = sharpest_box(_flat_with_edges(96, 64, 10, 10, 30), 128)
    assert right - left == bottom - top == 64 and left >= 0 and right <= 96


def test_views_crop_the_same_pixels_of_input_and_output_zoomed() -> None:
    before = _flat_with_edges(400, 300, 20, 150, 100)
    after = Image.fromarray(255 - np.asarray(before))  # an "output" that differs everywhere
    got = views(_png(before), "b.png", _png(after), "a.png", view_side=200)
    left, top, right, bottom = got["crop_box"]
    crop_before = Image.open(io.BytesIO(got["crop_before"]))
    crop_after = Image.open(io.BytesIO(got["crop_after"]))
    assert got["zoom"] == ZOOM_SIDE // 128 and crop_before.size == (128 * got["zoom"],) * 2
    zoom = got["zoom"]
    expect = np.asarray(before.crop((left, top, right, bottom)))
    assert np.array_equal(np.asarray(crop_before)[::zoom, ::zoom], expect)
    assert np.array_equal(np.asarray(crop_after)[::zoom, ::zoom], 255 - expect)
    assert max(Image.open(io.BytesIO(got["before"])).size) == 200  # the large view, JPEG
    assert got["before"][:2] == b"\xff\xd8" and got["crop_before"][:4] == b"\x89PNG"


def test_histogram_quantiles_and_exact_extremes() -> None:
    values = np.random.default_rng(1).uniform(20.0, 40.0, 50_000)
    hist = Histogram(15.0, 45.0)
    for chunk in np.array_split(values, 7):
        hist.add(chunk)
    assert hist.low == values.min() and hist.high == values.max()
    width = 30.0 / 32
    for q in (0.1, 0.5, 0.9):
        assert abs(hist.quantile(q) - np.quantile(values, q)) < width
    assert Histogram(0.0, 1.0).quantile(0.5) is None


def test_every_histogram_has_labelled_axes() -> None:
    hist = Histogram(0.5, 1.0)
    hist.add(np.array([0.7, 0.8, 0.8, 0.95]))
    svg = hist.svg("SSIM")
    assert re.search(r'<text class="x-label"[^>]*>SSIM</text>', svg)
    assert re.search(r'<text class="y-label"[^>]*>images</text>', svg)
    assert ">2</text>" in svg  # the y axis' top tick: the fullest bin's count
