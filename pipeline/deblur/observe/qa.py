"""A reproducible QA sample of a job's outputs, with hard cases over-represented.

Picked, streaming over the result shards (memory is the sample, not the job):

- ``lowest_gain``: ok images with the lowest sharpness ratio (output / input): where the
  model helped least or hurt;
- ``largest``: the biggest images (tiling, memory, borders);
- ``failed:<reason>``: examples of each failure reason;
- ``random``: ok images drawn uniformly;
- ``lowest_psnr_gain``: evaluation jobs (rows with a reference): the least PSNR gained over
  the input (or lost); ``lowest_psnr`` for rows recorded without the input's figure.

Each ok pick is shown large (``view_side`` pixels on its long side) with a zoomed crop of its
sharpest edge region, before and after: a thumbnail is too small to tell deblurring from
sharpening noise, and the crop shows the same pixels of both at 1:1 and more.

"Random" is a fixed hash of (seed, row id), so the same job and seed give the same sample on
any machine, and a rerun does not reshuffle it.
"""

from __future__ import annotations

import heapq
import io
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from deblur.io import codec
from deblur.config import CodecConfig
from deblur.errors import PipelineError
from deblur.observe.quality import row_hash

_COLUMNS = ("row_id", "key", "output_key", "status", "reason", "error", "width", "height",
            "sharpness_in", "sharpness_out", "sharpness_ratio", "psnr", "ssim", "psnr_in",
            "ssim_in")


@dataclass
class QASample:
    """Keeps the k best candidates of each group while result tables stream past."""

    per_group: int = 4
    seed: int = 0
    _heaps: dict[str, list[tuple[float, int, dict[str, Any]]]] = field(default_factory=dict)

    def _offer(self, group: str, score: float, row: dict[str, Any]) -> None:
        """Keep the ``per_group`` rows with the *highest* score in ``group``."""
        heap = self._heaps.setdefault(group, [])
        item = (score, -row["row_id"], row)
        if len(heap) < self.per_group:
            heapq.heappush(heap, item)
        elif item[:2] > heap[0][:2]:
            heapq.heapreplace(heap, item)

    def add(self, table: pa.Table) -> None:
        table = table.select([c for c in _COLUMNS if c in table.column_names])
        ok = table.filter(pc.equal(table["status"], "ok"))
        failed = table.filter(pc.equal(table["status"], "failed"))
        # Only rows that could win go to Python: the k best of this table per group.
        k = self.per_group
        with_ratio = ok.filter(pc.is_valid(ok["sharpness_ratio"]))
        for row in with_ratio.sort_by("sharpness_ratio").slice(0, k).to_pylist():
            self._offer("lowest_gain", -row["sharpness_ratio"], row)
        if ok.num_rows:
            pixels = pc.multiply(ok["width"].cast(pa.int64()), ok["height"].cast(pa.int64()))
            ok_sized = ok.append_column("pixels", pixels)
            for row in ok_sized.sort_by([("pixels", "descending")]).slice(0, k).to_pylist():
                self._offer("largest", float(row.pop("pixels")), row)
        if "psnr_in" in ok.column_names:
            gains = ok.append_column("gain", pc.subtract(ok["psnr"], ok["psnr_in"]))
            with_gain = gains.filter(pc.is_valid(gains["gain"]))
            for row in with_gain.sort_by("gain").slice(0, k).to_pylist():
                self._offer("lowest_psnr_gain", -row.pop("gain"), row)
        if "psnr" in ok.column_names:
            without = (pc.is_null(ok["psnr_in"]) if "psnr_in" in ok.column_names
                       else pa.array([True] * ok.num_rows))
            with_psnr = ok.filter(pc.and_(pc.is_valid(ok["psnr"]), without))
            for row in with_psnr.sort_by("psnr").slice(0, k).to_pylist():
                self._offer("lowest_psnr", -row["psnr"], row)
        for row in ok.to_pylist() if ok.num_rows <= 4 * k else self._hash_top(ok):
            self._offer("random", -float(row_hash(row["row_id"], self.seed)), row)
        for row in failed.to_pylist():
            self._offer(f"failed:{row['reason']}", -float(row_hash(row["row_id"], self.seed)),
                        row)

    def _hash_top(self, ok: pa.Table) -> list[dict[str, Any]]:
        ids = ok["row_id"].to_pylist()
        best = heapq.nsmallest(self.per_group, range(len(ids)),
                               key=lambda i: row_hash(ids[i], self.seed))
        return ok.take(best).to_pylist()

    def picks(self) -> list[dict[str, Any]]:
        """Sample rows with a ``why`` field, each row once (first group wins), stable order."""
        order = ["lowest_gain", "lowest_psnr_gain", "lowest_psnr", "largest", "random"] + sorted(
            g for g in self._heaps if g.startswith("failed:"))
        seen: set[int] = set()
        out = []
        for group in order:
            rows = sorted(self._heaps.get(group, []), reverse=True)
            for _, _, row in rows:
                if row["row_id"] in seen:
                    continue
                seen.add(row["row_id"])
                out.append({**row, "why": group})
        return out


CROP_SIDE = 128
"""Source pixels on each side of the zoomed crop (smaller images: their short side)."""
ZOOM_SIDE = 384
"""Pixels the crop is shown at (nearest-neighbour, so each source pixel stays a block)."""
_SEARCH_SIDE = 512  # the edge search runs on a copy this size: bounded time and memory
_IMAGE_KEYS = ("before", "after", "crop_before", "crop_after")


def _pil(data: bytes, name: str) -> Image.Image:
    image = codec.decode(data, name, CodecConfig())
    pixels = image.pixels if image.pixels.dtype.itemsize == 1 else (
        image.pixels >> 8).astype("uint8")
    return Image.fromarray(pixels)


def _encode(pil: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    pil.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def thumbnail(data: bytes, name: str, max_side: int) -> bytes:
    """A JPEG thumbnail of an encoded image (upright, RGB)."""
    pil = _pil(data, name)
    pil.thumbnail((max_side, max_side))
    return _encode(pil, "JPEG")


def sharpest_box(pil: Image.Image, side: int = CROP_SIDE) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of the ``side``-pixel square with the most gradient energy.

    Searched on a box-filtered copy at most ``_SEARCH_SIDE`` pixels long, so a 50-megapixel
    image costs what a small one does; the box is then mapped back to full resolution.
    """
    width, height = pil.size
    side = max(1, min(side, width, height))
    scale = max(1, math.ceil(max(width, height) / _SEARCH_SIDE))
    small = pil.convert("L")
    if scale > 1:
        small = small.resize((max(1, width // scale), max(1, height // scale)), Image.BOX)
    gray = np.asarray(small, dtype=np.float64)
    if min(gray.shape) < 2:
        return 0, 0, side, side
    gy, gx = np.gradient(gray)
    energy = gx * gx + gy * gy
    s = max(1, min(side // scale, *gray.shape))
    integral = np.pad(energy.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    sums = integral[s:, s:] - integral[:-s, s:] - integral[s:, :-s] + integral[:-s, :-s]
    y, x = np.unravel_index(int(np.argmax(sums)), sums.shape)
    left, top = min(int(x) * scale, width - side), min(int(y) * scale, height - side)
    return left, top, left + side, top + side


def views(before: bytes, before_name: str, after: bytes, after_name: str,
          view_side: int = 1024) -> dict[str, Any]:
    """Large JPEG views of input and output and PNG crops of the input's sharpest edge
    region (the same region of both; PNG so compression adds no ringing of its own)."""
    src, out = _pil(before, before_name), _pil(after, after_name)
    box = sharpest_box(src)
    # The output normally has the input's size; scale the box if a model changed it.
    sx, sy = out.size[0] / src.size[0], out.size[1] / src.size[1]
    out_box = (round(box[0] * sx), round(box[1] * sy), round(box[2] * sx), round(box[3] * sy))
    zoom = max(1, ZOOM_SIDE // (box[2] - box[0]))
    crops = {}
    for key, pil, b in (("crop_before", src, box), ("crop_after", out, out_box)):
        crop = pil.crop(b)
        crops[key] = _encode(crop.resize((crop.width * zoom, crop.height * zoom),
                                         Image.NEAREST), "PNG")
    for pil in (src, out):
        pil.thumbnail((view_side, view_side))
    return {"before": _encode(src, "JPEG"), "after": _encode(out, "JPEG"), **crops,
            "crop_box": list(box), "zoom": zoom}


def write_pairs(ledger: Any, picks: list[dict[str, Any]], max_side: int = 1024
                ) -> list[dict[str, Any]]:
    """Before/after views and zoomed crops of the ok picks under ``<job_root>/qa/``, plus
    ``index.json``.

    Returns the picks with ``before``/``after``/``crop_before``/``crop_after`` image bytes
    (None when unavailable), ``crop_box`` (left, top, right, bottom in input pixels) and
    ``zoom``. Only the picks' images are decoded, one pick at a time.
    """
    storage = ledger.storage
    out = []
    for pick in picks:
        row = {**pick, **dict.fromkeys(_IMAGE_KEYS), "crop_box": None, "zoom": None,
               "note": None}
        if row["status"] == "ok":
            try:
                row.update(views(storage.get(row["key"]), row["key"],
                                 storage.get(row["output_key"]), row["output_key"], max_side))
            except PipelineError as exc:
                row.update(dict.fromkeys(_IMAGE_KEYS))
                row["note"] = f"images unavailable: {exc}"
        if row["before"] is not None:
            stem = f"{row['row_id']:09d}"
            ledger.write_qa(f"{stem}_before.jpg", row["before"], "image/jpeg")
            ledger.write_qa(f"{stem}_after.jpg", row["after"], "image/jpeg")
            ledger.write_qa(f"{stem}_crop_before.png", row["crop_before"], "image/png")
            ledger.write_qa(f"{stem}_crop_after.png", row["crop_after"], "image/png")
        out.append(row)
    index = [{k: v for k, v in row.items() if k not in _IMAGE_KEYS} for row in out]
    ledger.write_qa("index.json", json.dumps(index, indent=1, default=str).encode())
    return out
