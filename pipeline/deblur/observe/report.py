"""``report.html``: one self-contained page a person can read about a job.

No external assets and no JavaScript: images are inline base64 JPEG/PNG, histograms inline SVG,
so the file can be mailed, attached to a ticket or opened from object storage. Every string from
the data (keys, error messages, config) goes through ``_text``: control characters shown
escaped (``console.printable``), then HTML-escaped: keys are user input and may be hostile.

Sections (each an element with a stable id, which the tests look for): summary, failures,
quality (with ``evaluation``: PSNR/SSIM tables, when rows had references), samples, config;
``random-weights`` (a banner) when the model ran with random weights.

Streaming: the results are read one shard at a time into fixed-bin histograms (means, exact
min/max, quantiles read off the bins) and the bounded QA sample; no list of rows is kept.
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

from deblur.console import printable
from deblur.job.ledger import run_throughput
from deblur.observe.qa import QASample, write_pairs

_HIST_RANGES = {"sharpness_ratio": (0.0, 4.0), "psnr": (15.0, 45.0), "ssim": (0.5, 1.0),
                "psnr_in": (15.0, 45.0), "ssim_in": (0.5, 1.0),
                "psnr_gain": (-5.0, 10.0), "ssim_gain": (-0.2, 0.4)}
_GAINS = {"psnr_gain": ("psnr", "psnr_in"), "ssim_gain": ("ssim", "ssim_in")}
"""A gain is per image: its output's figure minus its input's, against the same reference."""
_BINS = 32


@dataclass
class Histogram:
    """Fixed-bin counts with under/overflow folded into the end bins (streaming)."""

    lo: float
    hi: float
    counts: np.ndarray = field(default_factory=lambda: np.zeros(_BINS, np.int64))
    total: float = 0.0
    n: int = 0
    low: float = math.inf
    high: float = -math.inf

    def add(self, values: np.ndarray) -> None:
        values = values[np.isfinite(values)]
        if not len(values):
            return
        self.low = min(self.low, float(values.min()))
        self.high = max(self.high, float(values.max()))
        idx = np.clip(((values - self.lo) / (self.hi - self.lo) * _BINS).astype(int), 0,
                      _BINS - 1)
        self.counts += np.bincount(idx, minlength=_BINS)
        self.total += float(values.sum())
        self.n += len(values)

    @property
    def mean(self) -> float | None:
        return self.total / self.n if self.n else None

    def quantile(self, q: float) -> float | None:
        """Approximate quantile: linear within its bin (bin width (hi - lo) / 32), clipped to
        the exact min/max. Exact ones would need every value; this stays fixed-size."""
        if not self.n:
            return None
        cumulative = np.cumsum(self.counts)
        i = int(np.searchsorted(cumulative, q * self.n))
        i = min(i, _BINS - 1)
        before = cumulative[i - 1] if i else 0
        inside = (q * self.n - before) / max(1, self.counts[i])
        value = self.lo + (i + float(inside)) * (self.hi - self.lo) / _BINS
        return min(self.high, max(self.low, value))

    def svg(self, label: str) -> str:
        """Bars with both axes labelled: x the metric (with its unit), y the image count."""
        width, height, left, right, top_pad, bottom = 520, 200, 52, 16, 24, 44
        plot_w, plot_h = width - left - right, height - top_pad - bottom
        top = max(1, int(self.counts.max()))
        bar = plot_w / _BINS
        base = top_pad + plot_h
        bars = "".join(
            f'<rect x="{left + i * bar:.1f}" y="{base - c / top * plot_h:.1f}"'
            f' width="{bar - 1:.1f}" height="{c / top * plot_h:.1f}" '
            f'fill="#4472c4"><title>{c}</title></rect>'
            for i, c in enumerate(self.counts))
        e = _text(label)
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
                f'role="img" aria-label="{e} histogram">{bars}'
                f'<line x1="{left}" y1="{base}" x2="{width - right}" y2="{base}" stroke="#333"/>'
                f'<line x1="{left}" y1="{top_pad}" x2="{left}" y2="{base}" stroke="#333"/>'
                f'<text x="{left}" y="{base + 14}" font-size="11">{self.lo:g}</text>'
                f'<text x="{width - right}" y="{base + 14}" font-size="11" '
                f'text-anchor="end">{self.hi:g}</text>'
                f'<text x="{left - 4}" y="{base}" font-size="11" text-anchor="end">0</text>'
                f'<text x="{left - 4}" y="{top_pad + 10}" font-size="11" '
                f'text-anchor="end">{top}</text>'
                f'<text class="x-label" x="{left + plot_w / 2}" y="{height - 6}" '
                f'font-size="12" text-anchor="middle">{e}</text>'
                f'<text class="y-label" x="0" y="0" font-size="12" text-anchor="middle" '
                f'transform="translate(14 {top_pad + plot_h / 2}) rotate(-90)">images</text>'
                f'<text x="{left + plot_w / 2}" y="14" font-size="12" text-anchor="middle">'
                f'{e} (n={self.n})</text></svg>')


def _text(value: Any, *, keep_newlines: bool = False) -> str:
    """A string from the data, safe in the page: no raw control or bidi character (a page is
    also read with `less` and `cat`), then HTML-escaped (quotes too: attribute values)."""
    return html.escape(printable(value, keep_newlines=keep_newlines))


def _img(data: bytes | None, alt: str, kind: str = "jpeg") -> str:
    if data is None:
        return '<div class="missing">no image</div>'
    encoded = base64.b64encode(data).decode()
    return f'<img src="data:image/{kind};base64,{encoded}" alt="{_text(alt)}">'


def _gain(row: dict[str, Any], name: str) -> float | None:
    after, before = row.get(name), row.get(f"{name}_in")
    return None if after is None or before is None else after - before


def _change(row: dict[str, Any], name: str, digits: int) -> str:
    """``before → after (gain)`` for one sampled image; the output's figure alone for a job
    recorded before inputs were measured."""
    gain = _gain(row, name)
    if gain is None:
        return _fmt(row.get(name), digits)
    return (f"{_fmt(row[f'{name}_in'], digits)} → {_fmt(row[name], digits)} "
            f"({gain:+.{digits}f})")


def _evaluation(hists: dict[str, Histogram], picks: list[dict[str, Any]]) -> str:
    """PSNR/SSIM against the references (evaluation jobs): the inputs' (before) and the
    outputs' (after) means and the gain, their distributions, then the sampled images, worst
    gain first. Empty when no row had a reference."""
    if not (hists["psnr"].n or hists["ssim"].n):
        return ""
    headline = "; ".join(
        f"{label} {_fmt(hists[f'{name}_in'].mean, digits)} → {_fmt(hists[name].mean, digits)}"
        f"{unit} (gain {hists[f'{name}_gain'].mean:+.{digits}f}{unit})"
        for name, label, unit, digits in (("psnr", "PSNR", " dB", 2), ("ssim", "SSIM", "", 4))
        if hists[f"{name}_gain"].n)
    head = ("<tr><th>figure</th><th>images</th><th>mean</th><th>min</th><th>p10</th>"
            "<th>median</th><th>p90</th><th>max</th></tr>")
    rows = "".join(
        f"<tr><th>{label}</th><td>{h.n}</td><td>{_fmt(h.mean, digits)}</td>"
        f"<td>{_fmt(h.low if h.n else None, digits)}</td>"
        + "".join(f"<td>≈{_fmt(h.quantile(q), digits)}</td>" for q in (0.1, 0.5, 0.9))
        + f"<td>{_fmt(h.high if h.n else None, digits)}</td></tr>"
        for label, h, digits in (
            ("PSNR input (dB)", hists["psnr_in"], 2), ("PSNR output (dB)", hists["psnr"], 2),
            ("PSNR gain (dB)", hists["psnr_gain"], 2), ("SSIM input", hists["ssim_in"], 4),
            ("SSIM output", hists["ssim"], 4), ("SSIM gain", hists["ssim_gain"], 4))
        if h.n)
    # Worst gain first (images recorded without an input figure last, by PSNR).
    worst = sorted((p for p in picks if p["status"] == "ok" and p.get("psnr") is not None),
                   key=lambda p: (_gain(p, "psnr") is None, _gain(p, "psnr") or p["psnr"]))
    worst_rows = "".join(
        f"<tr><td><code>{_text(p['key'])}</code></td><td>{_change(p, 'psnr', 2)}</td>"
        f"<td>{_change(p, 'ssim', 4)}</td><td>{_fmt(p.get('sharpness_ratio'), 2)}</td></tr>"
        for p in worst)
    return (f'<div id="evaluation"><h3>Against the references</h3>'
            + (f'<p class="gain">Input → output, means: {headline}</p>' if headline else "")
            + f'<table>{head}{rows}</table>'
            f'<p>Quantiles (≈) are read off the histograms\' bins; min, max and mean are '
            f'exact. A gain is per image: its output\'s figure minus its input\'s.</p>'
            f'<h3>Sampled images by PSNR gain, worst first</h3><table><tr><th>image</th>'
            f'<th>PSNR (dB): input → output (gain)</th><th>SSIM: input → output (gain)</th>'
            f'<th>sharpness ratio</th></tr>{worst_rows}</table></div>')


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else _text(value)


def build(ledger: Any, samples_per_group: int = 4, seed: int | None = None,
          thumb_side: int = 1024) -> str:
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
            values = (pc.subtract(ok[_GAINS[name][0]], ok[_GAINS[name][1]]) if name in _GAINS
                      else ok[name])
            hist.add(pc.drop_null(values).to_numpy(zero_copy_only=False).astype(float))
    picks = write_pairs(ledger, sample.picks(), thumb_side)
    return _page(job, status, hists, picks, ledger.read_summary())


def _page(job: dict[str, Any], status: Any, hists: dict[str, Histogram],
          picks: list[dict[str, Any]], summary: dict[str, Any] | None) -> str:
    e = _text
    model = job.get("model") or {}
    run = (summary or {}).get("run") or {}
    # job.json's model info (deblur.model.weights.provenance) says what actually ran; the
    # config's flag only for jobs recorded without it.
    random_weights = bool(model["random_weights"] if "random_weights" in model else
                          (job["config"].get("model") or {}).get("random_weights"))
    banner = ('<div id="random-weights" class="banner" role="alert"><strong>Random weights.'
              '</strong> This job ran the model with random (untrained) weights: its output is '
              'not deblurred, and the quality figures below say nothing about the model. A '
              'smoke test only; rerun with real weights (--weights).</div>'
              if random_weights else "")
    rows = [("Images", status.total), ("OK", status.ok), ("Failed", status.failed),
            ("Pending", status.pending),
            ("Shards done", f"{status.shards_done} / {status.shards_total}"),
            # The one figure `deblur status` and the run's last line show too.
            ("Throughput (images/s while workers ran)", _fmt(run_throughput(summary), 2)),
            ("Run time (s)", _fmt(run.get("seconds"), 1)),
            ("Mean batch size", _fmt(run.get("mean_batch_size"), 2)),
            ("Mean batch fill", _fmt(run.get("mean_batch_fill"), 3)),
            ("Model", e(str(model.get("name", job["config"]["model"]["name"])))),
            ("Weights", "random (untrained)" if random_weights else
             e(str(model.get("weights_sha256") or "not recorded")))]
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
              "ssim": "SSIM", "psnr_gain": "PSNR gain (dB, output - input)",
              "ssim_gain": "SSIM gain (output - input)"}
    quality_parts = []
    for name, hist in hists.items():
        if hist.n and name in labels:
            quality_parts.append(f'<figure>{hist.svg(labels[name])}<figcaption>mean '
                                 f'{_fmt(hist.mean)}</figcaption></figure>')
    quality_html = ("".join(quality_parts) or "<p>No quality figures recorded.</p>") + \
        _evaluation(hists, picks)

    cards = []
    for p in picks:
        if p["status"] != "ok":
            continue
        figures = (f"{p['width']}×{p['height']}, sharpness ×{_fmt(p.get('sharpness_ratio'), 2)}"
                   + (f", PSNR {_fmt(p.get('psnr'), 2)} dB, SSIM {_fmt(p.get('ssim'), 4)}"
                      if p.get("psnr") is not None else ""))
        crop = ""
        if p.get("crop_before") is not None:
            left, top, right, bottom = p["crop_box"]
            where = (f"zoomed ×{p['zoom']}: pixels {left}–{right} × {top}–{bottom}, the "
                     f"input's sharpest edges")
            crop = (f'<div class="row crops">'
                    f'<figure>{_img(p["crop_before"], "before, zoomed crop", "png")}'
                    f'<figcaption>before, {e(where)}</figcaption></figure>'
                    f'<figure>{_img(p["crop_after"], "after, zoomed crop", "png")}'
                    f'<figcaption>after, same pixels</figcaption></figure></div>')
        cards.append(f'<div class="pair"><div class="why">{e(p["why"])}</div>'
                     f'<div class="row views"><figure>{_img(p.get("before"), "before")}'
                     f'<figcaption>before</figcaption></figure><figure>'
                     f'{_img(p.get("after"), "after")}<figcaption>after</figcaption></figure>'
                     f'</div>{crop}'
                     f'<div class="meta"><code>{e(p["key"])}</code><br>{e(figures)}'
                     f'{"<br>" + e(p["note"]) if p.get("note") else ""}</div></div>')
    samples_html = "".join(cards) or "<p>No ok images to show.</p>"
    config_json = _text(json.dumps({"job_id": job["job_id"], "source": job["source"],
                                    "destination": job["destination"], "plan": job.get("plan"),
                                    "model": model, "config": job["config"]}, indent=2,
                                   default=str), keep_newlines=True)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>deblur report {e(job["job_id"])}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }}
th, td {{ border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }}
figure {{ display: inline-block; margin: 0 1em 1em 0; }}
.pair {{ border: 1px solid #ddd; margin: 0 0 1em; padding: 8px; }}
.row {{ display: flex; gap: 8px; width: 100%; }}
.row figure {{ flex: 1 1 0; margin: 0 0 8px; min-width: 0; }}
.row img {{ display: block; width: 100%; height: auto; }}
.crops img {{ image-rendering: pixelated; }}
.banner {{ background: #fff3cd; border: 2px solid #d39e00; padding: 1em; margin: 1em 0; }}
.why {{ font-weight: bold; }} code {{ word-break: break-all; }}
pre {{ background: #f6f6f6; padding: 1em; overflow: auto; }}
</style></head><body>
<h1>deblur job {e(job["job_id"])}</h1>
{banner}
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
