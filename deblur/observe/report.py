"""``report.html``: one self-contained page a person can read about a job.

No external assets and no JavaScript: thumbnails are inline base64 JPEGs, histograms inline SVG,
so the file can be mailed, attached to a ticket or opened from object storage. Every string from
the data (keys, error messages, config) is HTML-escaped: keys are user input and may be hostile.

Sections (each an element with a stable id, which the tests look for): summary, failures,
quality, samples, config.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.compute as pc

from deblur.observe.qa import QASample, write_pairs

_HIST_RANGES = {"sharpness_ratio": (0.0, 4.0), "psnr": (15.0, 45.0), "ssim": (0.5, 1.0)}
_BINS = 32


@dataclass
class Histogram:
    """Fixed-bin counts with under/overflow folded into the end bins (streaming)."""

    lo: float
    hi: float
    counts: np.ndarray = field(default_factory=lambda: np.zeros(_BINS, np.int64))
    total: float = 0.0
    n: int = 0

    def add(self, values: np.ndarray) -> None:
        values = values[np.isfinite(values)]
        if not len(values):
            return
        idx = np.clip(((values - self.lo) / (self.hi - self.lo) * _BINS).astype(int), 0,
                      _BINS - 1)
        self.counts += np.bincount(idx, minlength=_BINS)
        self.total += float(values.sum())
        self.n += len(values)

    @property
    def mean(self) -> float | None:
        return self.total / self.n if self.n else None

    def svg(self, label: str) -> str:
        width, height, pad = 480, 160, 24
        top = max(1, int(self.counts.max()))
        bar = (width - 2 * pad) / _BINS
        bars = "".join(
            f'<rect x="{pad + i * bar:.1f}" y="{height - pad - c / top * (height - 2 * pad):.1f}"'
            f' width="{bar - 1:.1f}" height="{c / top * (height - 2 * pad):.1f}" '
            f'fill="#4472c4"><title>{c}</title></rect>'
            for i, c in enumerate(self.counts))
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
                f'role="img" aria-label="{html.escape(label)} histogram">{bars}'
                f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" '
                f'stroke="#333"/>'
                f'<text x="{pad}" y="{height - 6}" font-size="11">{self.lo:g}</text>'
                f'<text x="{width - pad}" y="{height - 6}" font-size="11" '
                f'text-anchor="end">{self.hi:g}</text>'
                f'<text x="{width / 2}" y="14" font-size="12" text-anchor="middle">'
                f'{html.escape(label)} (n={self.n})</text></svg>')


def _img(data: bytes | None, alt: str) -> str:
    if data is None:
        return '<div class="missing">no image</div>'
    encoded = base64.b64encode(data).decode()
    return f'<img src="data:image/jpeg;base64,{encoded}" alt="{html.escape(alt)}">'


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else html.escape(str(value))


def build(ledger: Any, samples_per_group: int = 4, seed: int | None = None,
          thumb_side: int = 320) -> str:
    """Stream the job's results into the report's HTML (and write the QA pairs)."""
    job = ledger.job()
    config = ledger.config()
    seed = config.quality.seed if seed is None else seed
    status = ledger.status()
    sample = QASample(per_group=samples_per_group, seed=seed)
    hists = {name: Histogram(lo, hi) for name, (lo, hi) in _HIST_RANGES.items()}
    for table in ledger.iter_results():
        sample.add(table)
        ok = table.filter(pc.equal(table["status"], "ok"))
        for name, hist in hists.items():
            hist.add(pc.drop_null(ok[name]).to_numpy(zero_copy_only=False).astype(float))
    picks = write_pairs(ledger, sample.picks(), thumb_side)
    return _page(job, status, hists, picks, ledger.read_summary())


def _page(job: dict[str, Any], status: Any, hists: dict[str, Histogram],
          picks: list[dict[str, Any]], summary: dict[str, Any] | None) -> str:
    e = html.escape
    model = job.get("model") or {}
    run = (summary or {}).get("run") or {}
    rows = [("Images", status.total), ("OK", status.ok), ("Failed", status.failed),
            ("Pending", status.pending),
            ("Shards done", f"{status.shards_done} / {status.shards_total}"),
            ("Throughput (images/s)", _fmt(run.get("images_per_s") or status.throughput, 2)),
            ("Run time (s)", _fmt(run.get("seconds"), 1)),
            ("Mean batch size", _fmt(run.get("mean_batch_size"), 2)),
            ("Mean batch fill", _fmt(run.get("mean_batch_fill"), 3)),
            ("Model", e(str(model.get("name", job["config"]["model"]["name"])))),
            ("Weights sha256", e(str(model.get("weights_sha256") or "random weights")))]
    summary_rows = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)

    failures = [p for p in picks if p["status"] == "failed"]
    failure_rows = "".join(
        f"<tr><td>{e(reason)}</td><td>{count}</td><td>"
        + "<br>".join(f"<code>{e(p['error'] or p['key'] or '')}</code>"
                      for p in failures if p["reason"] == reason)
        + "</td></tr>" for reason, count in sorted(status.failures_by_reason.items()))
    failures_html = (f"<table><tr><th>reason</th><th>images</th><th>examples</th></tr>"
                     f"{failure_rows}</table>" if failure_rows else "<p>No failed images.</p>")

    labels = {"sharpness_ratio": "Sharpness ratio (output / input)", "psnr": "PSNR (dB)",
              "ssim": "SSIM"}
    quality_parts = []
    for name, hist in hists.items():
        if hist.n:
            quality_parts.append(f'<figure>{hist.svg(labels[name])}<figcaption>mean '
                                 f'{_fmt(hist.mean)}</figcaption></figure>')
    quality_html = "".join(quality_parts) or "<p>No quality figures recorded.</p>"

    cards = []
    for p in picks:
        if p["status"] != "ok":
            continue
        figures = (f"{p['width']}×{p['height']}, sharpness ×{_fmt(p.get('sharpness_ratio'), 2)}"
                   + (f", PSNR {_fmt(p.get('psnr'), 2)} dB, SSIM {_fmt(p.get('ssim'), 4)}"
                      if p.get("psnr") is not None else ""))
        cards.append(f'<div class="pair"><div class="why">{e(p["why"])}</div>'
                     f'<div class="imgs"><figure>{_img(p.get("before"), "before")}'
                     f'<figcaption>before</figcaption></figure><figure>'
                     f'{_img(p.get("after"), "after")}<figcaption>after</figcaption></figure>'
                     f'</div>'
                     f'<div class="meta"><code>{e(p["key"])}</code><br>{e(figures)}'
                     f'{"<br>" + e(p["note"]) if p.get("note") else ""}</div></div>')
    samples_html = "".join(cards) or "<p>No ok images to show.</p>"
    config_json = e(json.dumps({"job_id": job["job_id"], "source": job["source"],
                                "destination": job["destination"], "plan": job.get("plan"),
                                "model": model, "config": job["config"]}, indent=2,
                               default=str))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>deblur report {e(job["job_id"])}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }}
figure {{ display: inline-block; margin: 0 1em 1em 0; }}
.pair {{ border: 1px solid #ddd; margin: 0 0 1em; padding: 8px; }}
.imgs img {{ margin-right: 8px; max-width: 45%; }}
.why {{ font-weight: bold; }} code {{ word-break: break-all; }}
pre {{ background: #f6f6f6; padding: 1em; overflow: auto; }}
</style></head><body>
<h1>deblur job {e(job["job_id"])}</h1>
<section id="summary"><h2>Summary</h2><table>{summary_rows}</table></section>
<section id="failures"><h2>Failures by reason</h2>{failures_html}</section>
<section id="quality"><h2>Quality</h2>{quality_html}</section>
<section id="samples"><h2>Before / after samples</h2>
<p>Hard cases first: lowest sharpness gain, largest images, then a random draw (seeded).</p>
{samples_html}</section>
<section id="config"><h2>Configuration</h2><pre>{config_json}</pre></section>
</body></html>
"""


def write_report(ledger: Any, out: str | None = None, samples_per_group: int = 4) -> str:
    """Build the report, store it as ``<job_root>/report.html`` (and at ``out``)."""
    page = build(ledger, samples_per_group).encode()
    stored = ledger.write_report(page)
    if out:
        ledger.storage.put(out, page, "text/html; charset=utf-8")
    return stored
