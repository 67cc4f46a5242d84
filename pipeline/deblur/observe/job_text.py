"""A job as a person reads it in a terminal: the closing block of `run` and `rerun`, `status`,
`status --failed` and `list`.

The commands (cli.py) parse options and choose between these lines and their JSON; what the
lines say lives here, beside the report (report.py) that says the same in HTML. Lines are
returned unescaped: the CLI prints each through ``console.printable``, because keys and
messages come from users' data.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

from deblur.config import SCENE_MODEL

SHOWN_FAILURES = 20
"""Failed images named at the end of run and rerun; `deblur status JOB --failed` has all."""


def rate_text(rate: float | None) -> str:
    return "unknown" if rate is None else f"{rate:.2f} images/s"


def failure_line(row: dict[str, Any]) -> str:
    """``key: reason: message`` for a failed row (the message without its own key prefix)."""
    key, message = row["key"], " ".join((row.get("error") or "").split())
    message = message.removeprefix(f"{key}: ")
    return f"{key}: {row.get('reason') or 'unknown'}: {message}"


def failure_lines(ledger: Any, failed: int) -> list[str]:
    """The first failed images, one ``key: reason: message`` line each, then how many more."""
    from deblur.errors import PipelineError

    lines: list[str] = []
    shown = 0
    try:
        for row in itertools.islice(ledger.failed_rows(), SHOWN_FAILURES):
            lines.append(failure_line(row))
            shown += 1
    except PipelineError as exc:  # the counts stand; the names are a convenience
        lines.append(f"(could not list the failed images: {exc})")
    if failed > shown:
        lines.append(f"… and {failed - shown} more: deblur status {ledger.job_root} --failed")
    return lines


def closing_lines(status: Any, summary: dict[str, Any], job_root: str,
                  log_path: str | None) -> list[str]:
    """The totals block that ends `run` and `rerun` (stdout)."""
    from deblur.console import hms
    from deblur.job.ledger import run_throughput

    lines = ["",
             f"done: {status.ok} ok, {status.failed} failed, {status.pending} pending "
             f"of {status.total}",
             f"  throughput: {rate_text(run_throughput(summary))} (while workers ran); wall "
             f"time {hms((summary.get('run') or {}).get('seconds'))}",
             f"  job root:   {job_root}"]
    if log_path:
        lines.append(f"  log:        {log_path}")
    return lines


def status_lines(ledger: Any) -> list[str]:
    """`deblur status JOB_ROOT`: state, model, totals, throughput, failures, latency, quality."""
    from deblur.job.ledger import run_throughput

    data = ledger.status().to_dict()
    state, error = ledger.state()
    snapshot = ledger.latest_snapshot()
    summary = ledger.read_summary()
    model = ledger.job().get("model") or {}
    name = model.get("name") or ledger.config().model.name
    lines = [
        f"job {ledger.job_root}",
        f"  state: {state}" + (f": {error}" if error else ""),
        f"  model: {name}, "
        + ("RANDOM weights (outputs are NOT deblurred)" if model.get("random_weights")
           else "fitted per scene (no weights)" if name == SCENE_MODEL
           else f"weights {model.get('weights')} (sha256 "
                f"{(model.get('weights_sha256') or '?')[:12]})"),
        f"  images: {data['total']} total, {data['ok']} ok, {data['failed']} failed, "
        f"{data['pending']} pending",
        f"  shards: {data['shards_done']}/{data['shards_total']} done",
        # One throughput, the one the run's summary and the report show (run_throughput).
        f"  throughput: {rate_text(run_throughput(summary))}, last run (images per second of "
        f"wall time while workers ran)",
    ]
    for reason, count in sorted(data.get("failures_by_reason", {}).items()):
        lines.append(f"  failed {reason}: {count}")
    if snapshot:
        fill = snapshot.get("mean_batch_fill")
        lines.append(f"  last run: mean batch {snapshot.get('mean_batch_size') or 0:.1f} images"
                     + (f" ({fill:.0%} filled)" if fill else "")
                     + f", {snapshot['storage_retries']} storage retries, "
                     f"{snapshot['retries']} shard retries")
        if snapshot.get("workers_pending"):
            lines.append(f"  workers: {snapshot.get('workers_active', 0)} active, "
                         f"{snapshot['workers_pending']} pending"
                         + (f" (waiting for {snapshot['waiting_for']})"
                            if snapshot.get("waiting_for") else ""))
    if summary and summary.get("latency_ms"):
        for stage, figures in summary["latency_ms"].items():
            lines.append(f"  {stage}: p50 {figures['p50_ms']:.1f} ms, p95 "
                         f"{figures['p95_ms']:.1f} ms, p99 {figures['p99_ms']:.1f} ms")
    if summary and summary.get("quality"):
        quality = dict(summary["quality"])
        if "psnr_gain" in quality:  # an evaluation job
            lines.append(against_references(quality))
            for metric in ("psnr", "ssim"):  # shown above
                for key in (f"mean_{metric}", f"mean_{metric}_in", f"{metric}_count",
                            f"{metric}_in_count", f"{metric}_gain"):
                    quality.pop(key, None)
        if quality:
            lines.append("  quality: " + ", ".join(
                f"{k} {_number(v)}" for k, v in quality.items() if isinstance(v, (int, float))))
    return lines


def against_references(quality: dict[str, Any]) -> str:
    """An evaluation job's figures: before (the inputs) -> after (the outputs), and the gain."""
    parts = [f"PSNR {quality['mean_psnr_in']:.2f} -> {quality['mean_psnr']:.2f} dB "
             f"({quality['psnr_gain']:+.2f} dB)"]
    if "ssim_gain" in quality:
        parts.append(f"SSIM {quality['mean_ssim_in']:.3f} -> {quality['mean_ssim']:.3f} "
                     f"({quality['ssim_gain']:+.3f})")
    return (f"  against the references ({quality.get('psnr_count', 0)} images, input -> "
            f"output): " + ", ".join(parts))


def _number(value: float) -> str:
    """Counts as integers (``8``, not ``8.000``), measures to 3 decimals."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else \
        f"{value:.3f}"


def jobs_with_counts(storage: Any, destination: str) -> list[dict[str, Any]]:
    """The jobs under DESTINATION/_deblur/, oldest first, each with the counts `status` shows
    (from the job's index); a corrupt job's entry says so instead."""
    from deblur.job.ledger import Ledger, list_jobs

    jobs = list_jobs(storage, destination)
    for job in jobs:
        if "corrupt" not in job:
            ledger = Ledger(storage, job["job_root"])
            counts = ledger.status()
            job.update(ok=counts.ok, failed=counts.failed, pending=counts.pending,
                       destination=ledger.job().get("destination"))
    return jobs


def jobs_table(jobs: list[dict[str, Any]]) -> Any:
    """`deblur list` as a rich Table, every cell escaped and never read as rich markup."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    from deblur.console import printable

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for name in ("JOB ID", "CREATED", "STATE", "OK", "FAILED", "PENDING", "DESTINATION"):
        numeric = name in ("OK", "FAILED", "PENDING")
        table.add_column(name, justify="right" if numeric else "left",
                         no_wrap=name != "DESTINATION", overflow="fold")

    def cell(value: Any) -> Text:
        return Text(printable(value))

    for job in jobs:
        created = job.get("created_at")
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created)) if created else "-"
        if "corrupt" in job:
            table.add_row(cell(job["job_id"]), when, "corrupt", "-", "-", "-",
                          cell(job["job_root"]))
            continue
        table.add_row(cell(job["job_id"]), when, cell(job["state"]), str(job["ok"]),
                      str(job["failed"]), str(job["pending"]),
                      cell(job.get("destination") or ""))
    return table
