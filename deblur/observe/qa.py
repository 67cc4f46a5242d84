"""A reproducible QA sample of a job's outputs, with hard cases over-represented.

Picked, streaming over the result shards (memory is the sample, not the job):

- ``lowest_gain``: ok images with the lowest sharpness ratio (output / input): where the
  model helped least or hurt;
- ``largest``: the biggest images (tiling, memory, borders);
- ``failed:<reason>``: examples of each failure reason;
- ``random``: ok images drawn uniformly.

"Random" is a fixed hash of (seed, row id), so the same job and seed give the same sample on
any machine, and a rerun does not reshuffle it.
"""

from __future__ import annotations

import heapq
import io
import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from deblur.io import codec
from deblur.config import CodecConfig
from deblur.errors import PipelineError
from deblur.observe.quality import row_hash

_COLUMNS = ("row_id", "key", "output_key", "status", "reason", "error", "width", "height",
            "sharpness_in", "sharpness_out", "sharpness_ratio", "psnr", "ssim")


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
        order = ["lowest_gain", "largest", "random"] + sorted(
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


def thumbnail(data: bytes, name: str, max_side: int) -> bytes:
    """A JPEG thumbnail of an encoded image (upright, RGB)."""
    image = codec.decode(data, name, CodecConfig())
    pixels = image.pixels if image.pixels.dtype.itemsize == 1 else (
        image.pixels >> 8).astype("uint8")
    pil = Image.fromarray(pixels)
    pil.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    pil.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def write_pairs(ledger: Any, picks: list[dict[str, Any]], max_side: int = 320
                ) -> list[dict[str, Any]]:
    """Before/after thumbnails of the ok picks under ``<job_root>/qa/`` plus ``index.json``.

    Returns the picks with ``before``/``after`` thumbnail bytes (None when unavailable).
    """
    storage = ledger.storage
    out = []
    for pick in picks:
        row = {**pick, "before": None, "after": None, "note": None}
        if row["status"] == "ok":
            try:
                row["before"] = thumbnail(storage.get(row["key"]), row["key"], max_side)
                row["after"] = thumbnail(storage.get(row["output_key"]), row["output_key"],
                                         max_side)
            except PipelineError as exc:
                row["before"] = row["after"] = None
                row["note"] = f"thumbnail unavailable: {exc}"
        if row["before"] is not None:
            stem = f"{row['row_id']:09d}"
            ledger.write_qa(f"{stem}_before.jpg", row["before"], "image/jpeg")
            ledger.write_qa(f"{stem}_after.jpg", row["after"], "image/jpeg")
        out.append(row)
    index = [{k: v for k, v in row.items() if k not in ("before", "after")} for row in out]
    ledger.write_qa("index.json", json.dumps(index, indent=1, default=str).encode())
    return out
