"""``deblur plan``: what a job would cost and hit, before it runs. Writes nothing.

It validates every row exactly as ``deblur run`` plans them (``manifest.plan_rows``: hostile
keys, duplicates, output collisions), reads only the *headers* of a seeded random sample of the
valid images (a ranged GET of the first 64 KiB, more only when a header is longer), and turns
the sample's megapixels into GPU-hours with a measured throughput figure per device type.

Memory stays flat in the number of images: rows stream through, only digests (in the
planner), counts and a fixed-size reservoir sample are kept.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass, field
from typing import Any

from pipeline.config import JobConfig
from pipeline.errors import ConfigError
from pipeline.manifest import is_manifest, plan_rows
from pipeline.storage import Storage

HEADER_BYTES = 64 * 1024
HEADER_BYTES_MAX = 1024 * 1024  # JPEGs with big EXIF/ICC blocks put the size further in

# Megapixels per second per device for one model, end to end, each with where it was measured.
# A device type has a figure only once a benchmark measured it: GPU figures are added by
# bench/gpu.py runs (issue "GPU throughput"); until then `--gpu-type h100` says so.
THROUGHPUT: dict[tuple[str, str], tuple[float, str]] = {
    ("cpu-dev", "mimo-unet"): (
        0.07 * 1280 * 720 / 1e6,
        "bench/model.py on dev-cpu (2 cores, torch 2.13 CPU), 1280x720 fp32: 0.07 images/s; "
        "docs/benchmarks.md, 2026-11-24"),
    ("cpu-dev", "mimo-unet-plus"): (
        0.86 * 256 * 256 / 1e6,
        "bench/model.py on dev-cpu (2 cores, torch 2.13 CPU), 256x256 fp32: 0.86 images/s; "
        "docs/benchmarks.md, 2026-11-24"),
}

# S3 Standard request prices, us-east-1, USD per 1000 requests (LIST is priced as PUT).
PRICE_PER_1000 = {"GET": 0.0004, "PUT": 0.005, "LIST": 0.005, "HEAD": 0.0004}

HISTOGRAM = ((0.3, "<= 0.3 MP"), (1.0, "<= 1 MP"), (2.1, "<= 2 MP (1080p)"),
             (8.3, "<= 8 MP (4K)"), (24.0, "<= 24 MP"), (math.inf, "> 24 MP"))
MAX_EXAMPLES = 3


@dataclass
class PlanReport:
    """Everything ``deblur plan`` prints; ``to_dict`` is its JSON."""

    source: str
    destination: str
    rows: int = 0
    valid: int = 0
    shards: int = 0
    invalid: dict[str, int] = field(default_factory=dict)
    invalid_examples: dict[str, list[str]] = field(default_factory=dict)
    sampled: int = 0
    sample_problems: dict[str, int] = field(default_factory=dict)
    sample_problem_examples: dict[str, list[str]] = field(default_factory=dict)
    readable: int = 0
    sample_megapixels: float = 0.0
    megapixels: float = 0.0
    megapixels_exact: bool = False
    histogram: dict[str, int] = field(default_factory=dict)
    formats: dict[str, int] = field(default_factory=dict)
    header_bytes_read: int = 0
    gpu_type: str = ""
    gpus: int = 1
    mp_per_s_per_gpu: float = 0.0
    throughput_source: str = ""
    gpu_hours: float = 0.0
    wall_hours: float = 0.0
    requests: dict[str, int] = field(default_factory=dict)
    request_cost_usd: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


def throughput(gpu_type: str, model: str) -> tuple[float, str]:
    """(MP/s per device, provenance) or a ConfigError naming the measured types."""
    figure = THROUGHPUT.get((gpu_type, model))
    if figure is None:
        known = sorted({g for g, m in THROUGHPUT if m == model})
        raise ConfigError(f"--gpu-type {gpu_type!r}: no measured throughput for {model} on it; "
                          f"measured: {', '.join(known) or 'none'} (GPU figures remain to be "
                          f"measured with bench/gpu.py and added to pipeline/plan.py)")
    return figure


def read_header(storage: Storage, uri: str, max_pixels: int) -> tuple[str | None, Any]:
    """(problem reason or None, (width, height, format) or a message). Never whole images."""
    from PIL import Image, UnidentifiedImageError

    from pipeline.codec import FORMATS

    length = HEADER_BYTES
    while True:
        data = storage.get_range(uri, length)
        if not data:
            return "empty", (0, "zero-byte object")
        try:
            with Image.open(io.BytesIO(data)) as img:
                width, height, fmt = img.width, img.height, img.format
            break
        except UnidentifiedImageError:
            if len(data) == length and length < HEADER_BYTES_MAX:
                length = HEADER_BYTES_MAX  # maybe a header longer than the first read
                continue
            return "unsupported_format", (len(data), f"not a recognised image "
                                                     f"(starts {data[:8]!r})")
        except Exception as exc:  # noqa: BLE001 - PIL raises many types on broken headers
            if len(data) == length and length < HEADER_BYTES_MAX:
                length = HEADER_BYTES_MAX
                continue
            return "corrupt", (len(data), f"unreadable header ({type(exc).__name__})")
    if fmt not in FORMATS:
        return "unsupported_format", (len(data), f"{fmt} is not supported")
    if width < 1 or height < 1:
        return "corrupt", (len(data), f"declares an empty size {width}x{height}")
    if width * height > max_pixels:
        return "too_large", (len(data), f"{width}x{height} exceeds codec.max_pixels")
    return None, (len(data), (width, height, FORMATS[fmt]))


def estimate(config: JobConfig, storage: Storage, *, gpus: int = 1, gpu_type: str = "cpu-dev",
             sample_size: int = 200, seed: int = 0) -> PlanReport:
    """Plan the job without writing anything and estimate its cost."""
    if gpus < 1:
        raise ConfigError(f"--gpus {gpus}: must be >= 1")
    if sample_size < 1:
        raise ConfigError(f"--sample {sample_size}: must be >= 1")
    mp_per_s, provenance = throughput(gpu_type, config.model.name)
    report = PlanReport(source=config.source, destination=config.destination,
                        gpu_type=gpu_type, gpus=gpus, mp_per_s_per_gpu=mp_per_s,
                        throughput_source=provenance)
    rng = random.Random(seed)
    sample: list[str] = []
    batches, planner = plan_rows(config.source, config.destination, storage, config.codec)
    for batch in batches:
        keys = batch.column("key").to_pylist()
        for key, error in zip(keys, batch.column("error").to_pylist()):
            if error:
                reason, _, message = error.partition(": ")
                examples = report.invalid_examples.setdefault(reason, [])
                if len(examples) < MAX_EXAMPLES:
                    examples.append(message[:300])
                continue
            report.valid += 1  # reservoir sampling: every valid row equally likely
            if len(sample) < sample_size:
                sample.append(key)
            else:
                slot = rng.randrange(report.valid)
                if slot < sample_size:
                    sample[slot] = key
    counts = planner.counts
    report.rows, report.invalid = counts.rows, dict(counts.invalid)
    report.shards = math.ceil(counts.rows / config.shard_size)
    _sample_headers(report, storage, sorted(sample), config.codec.max_pixels)
    _estimate_cost(report, config, listing=not is_manifest(config.source))
    return report


def _sample_headers(report: PlanReport, storage: Storage, sample: list[str],
                    max_pixels: int) -> None:
    report.histogram = {label: 0 for _, label in HISTOGRAM}
    for uri in sample:
        report.sampled += 1
        try:
            problem, (read, detail) = read_header(storage, uri, max_pixels)
        except Exception as exc:  # noqa: BLE001 - not found, access denied, …: a run would fail it
            problem, read, detail = "unreadable", 0, f"{type(exc).__name__}: {exc}"
        report.header_bytes_read += read
        if problem:
            report.sample_problems[problem] = report.sample_problems.get(problem, 0) + 1
            examples = report.sample_problem_examples.setdefault(problem, [])
            if len(examples) < MAX_EXAMPLES:
                examples.append(f"{uri[:300]!r}: {str(detail)[:200]}")
            continue
        width, height, fmt = detail
        megapixels = width * height / 1e6
        report.readable += 1
        report.sample_megapixels += megapixels
        report.formats[fmt] = report.formats.get(fmt, 0) + 1
        report.histogram[next(label for top, label in HISTOGRAM if megapixels <= top)] += 1
    # The sample's mean megapixels per valid image (unreadable ones count 0: they will fail).
    report.megapixels_exact = report.sampled == report.valid
    if report.sampled:
        report.megapixels = report.sample_megapixels / report.sampled * report.valid


def _estimate_cost(report: PlanReport, config: JobConfig, listing: bool) -> None:
    seconds = report.megapixels / report.mp_per_s_per_gpu if report.mp_per_s_per_gpu else 0.0
    report.gpu_hours = seconds / 3600
    report.wall_hours = report.gpu_hours / report.gpus
    shards, valid = report.shards, report.valid
    # What one run costs in requests, from the ledger's and worker's code paths:
    # planning: the listing (or the manifest), one PUT per shard file and job.json; each
    # shard: its file and (absent) result read, the result written; each image: GET + PUT;
    # the driver: the index every index_interval_s, a cancel check every 2 s.
    run_seconds = report.wall_hours * 3600
    index_writes = 1 + int(run_seconds / config.scheduler.index_interval_s)
    report.requests = {
        "LIST": max(1, math.ceil(report.rows / 1000)) if listing else 0,
        "GET": valid + 2 * shards + (0 if listing else 1),
        "PUT": valid + 2 * shards + 1 + index_writes,
        "HEAD": int(run_seconds / 2) + 1,
    }
    report.request_cost_usd = sum(PRICE_PER_1000[k] * v / 1000
                                  for k, v in report.requests.items())


def render(report: PlanReport) -> str:
    """The human-readable report."""
    lines = [f"source:       {report.source}", f"destination:  {report.destination}",
             f"images:       {report.rows:,} rows, {report.valid:,} valid, "
             f"{report.shards:,} shards"]
    for reason, count in sorted(report.invalid.items()):
        lines.append(f"  would fail {reason}: {count:,}")
        lines += [f"    e.g. {example}" for example in report.invalid_examples.get(reason, [])]
    exact = "exact" if report.megapixels_exact else (
        f"estimated from {report.sampled} sampled headers")
    lines.append(f"megapixels:   {report.megapixels:,.1f} ({exact}; "
                 f"{report.header_bytes_read:,} header bytes read)")
    if report.readable:
        lines.append("sizes:        " + ", ".join(f"{label}: {n}" for label, n in
                                                  report.histogram.items() if n))
        lines.append("formats:      " + ", ".join(f"{fmt}: {n}" for fmt, n in
                                                  sorted(report.formats.items())))
    for problem, count in sorted(report.sample_problems.items()):
        share = count / report.sampled if report.sampled else 0.0
        lines.append(f"  sample {problem}: {count} of {report.sampled} "
                     f"(~{share * report.valid:,.0f} in the job)")
        lines += [f"    e.g. {example}" for example in
                  report.sample_problem_examples.get(problem, [])]
    lines.append(f"compute:      {report.gpu_hours:,.2f} {report.gpu_type}-hours; "
                 f"{report.wall_hours:,.2f} h wall on {report.gpus} (startup not included)")
    lines.append(f"  throughput: {report.mp_per_s_per_gpu:.4f} MP/s per device — "
                 f"{report.throughput_source}")
    lines.append("requests:     " + ", ".join(f"{k} {v:,}" for k, v in report.requests.items()
                                              if v)
                 + f" (~${report.request_cost_usd:,.2f} at S3 Standard us-east-1 prices)")
    return "\n".join(lines)
