"""``deblur plan``: what a job would cost and hit, before it runs. Writes nothing.

It validates every row exactly as ``deblur run`` plans them (``manifest.plan_rows``: hostile
keys, duplicates, output collisions), opens only the *headers* of a seeded random sample of the
valid images (``codec.open_header``, the check ``decode`` starts with, over ranged GETs of
64 KiB blocks, at most 1 MiB an image), and turns the sample's megapixels into device-hours
with a measured throughput figure per device type.

Memory stays flat in the number of images: rows stream through once; only the planner's
digests, counts and a fixed-size reservoir sample are kept.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any

from deblur.io import codec
from deblur.config import JobConfig
from deblur.console import printable
from deblur.errors import ConfigError, ImageError, ManifestError, StorageError
from deblur.job.manifest import is_manifest, plan_rows
from deblur.job.parallel import parallel_files
from deblur.io.storage import Storage

HEADER_BYTES = 64 * 1024  # one ranged GET; almost every header fits in the first one
HEADER_BYTES_MAX = 1024 * 1024  # JPEG EXIF/ICC blocks and TIFF directories can lie further in

# Megapixels per second per device for one model (model forward only: decode, upload and
# batching not included), each with where it was measured. A device type gets a figure only
# once a benchmark has measured it; until then `--gpu-type h100` is refused and says so.
THROUGHPUT: dict[tuple[str, str], tuple[float, str]] = {
    ("cpu-dev", "mimo-unet"): (
        0.07 * 1280 * 720 / 1e6,
        "bench/model.py on dev-cpu (2 cores, torch 2.13 CPU), 1280x720 fp32 batch 1: "
        "0.07 images/s; docs/benchmarks.md, 2026-11-24"),
    ("cpu-dev", "mimo-unet-plus"): (
        0.86 * 256 * 256 / 1e6,
        "bench/model.py on dev-cpu (2 cores, torch 2.13 CPU), 256x256 fp32 batch 1: "
        "0.86 images/s; docs/benchmarks.md, 2026-11-24"),
}

# Planning, one process: rows per second, peak RSS and its growth past the fixed buffers of
# pipeline/deblur/job/dedup.py, and local disk per row (spool + digests), each where it was measured.
PLANNING_ROWS_PER_S = 345_000
PLANNING_PEAK_MIB = 360.0  # at PLANNING_MEASURED_ROWS
PLANNING_MEASURED_ROWS = 10_000_000
PLANNING_MIB_PER_M = 2.3  # beyond ~3 M rows, where the digest buffers are full
PLANNING_SOURCE = ("bench/manifest.py on dev-cpu (2 cores, shared with other work), one "
                   "Parquet file of 10 M keys, local disk; docs/scaling.md, 2026-11-26")

# S3 Standard request prices, us-east-1, USD per 1000 requests (LIST is priced as PUT).
PRICE_PER_1000 = {"GET": 0.0004, "PUT": 0.005, "LIST": 0.005, "HEAD": 0.0004}

HISTOGRAM = ((0.3, "<= 0.3 MP"), (1.0, "<= 1 MP"), (2.1, "<= 2 MP (1080p)"),
             (8.3, "<= 8 MP (4K)"), (24.0, "<= 24 MP"), (math.inf, "> 24 MP"))
MAX_EXAMPLES = 5
EXAMPLE_CHARS = 300
UNVERIFIED = "header_beyond_1MiB"  # not a failure: the run reads the whole object


@dataclass
class PlanReport:
    """Everything ``deblur plan`` prints; ``to_dict`` is its JSON."""

    source: str
    destination: str
    rows: int = 0
    """Manifest rows (or listed images), every one of which a run gives a result row."""
    valid: int = 0
    """Rows the run would fetch; the rest fail at planning (``invalid``)."""
    shards: int = 0
    invalid: dict[str, int] = field(default_factory=dict)
    invalid_examples: dict[str, list[str]] = field(default_factory=dict)
    references: int = 0
    """Valid rows with a reference image (one more GET each)."""
    sampled: int = 0
    readable: int = 0
    sample_problems: dict[str, int] = field(default_factory=dict)
    """Header verdicts in the sample that a run would fail the image with, by reason."""
    unverified: int = 0
    """Sampled objects whose header is not in their first HEADER_BYTES_MAX bytes."""
    sample_problem_examples: dict[str, list[str]] = field(default_factory=dict)
    sample_megapixels: float = 0.0
    megapixels: float = 0.0
    """Estimated megapixels of the images a run would process (exact when exact says so)."""
    megapixels_exact: bool = False
    histogram: dict[str, int] = field(default_factory=dict)
    formats: dict[str, int] = field(default_factory=dict)
    header_bytes_read: int = 0
    plan_requests: dict[str, int] = field(default_factory=dict)
    """Requests this plan made (listing or manifest read, header reads)."""
    gpu_type: str = ""
    gpus: int = 1
    mp_per_s_per_gpu: float = 0.0
    throughput_source: str = ""
    gpu_hours: float = 0.0
    wall_hours: float = 0.0
    requests: dict[str, int] = field(default_factory=dict)
    """Requests a first run would make, by S3 class."""
    request_items: list[dict[str, Any]] = field(default_factory=list)
    request_cost_usd: float = 0.0
    planning: dict[str, Any] = field(default_factory=dict)
    """How a run would plan this source: files, path, parallel tasks, expected time, memory
    and local disk (``_planning``)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def throughput(gpu_type: str, model: str) -> tuple[float, str]:
    """(MP/s per device, provenance) or a ConfigError naming the measured types."""
    figure = THROUGHPUT.get((gpu_type, model))
    if figure is None:
        known = sorted({g for g, m in THROUGHPUT if m == model})
        raise ConfigError(f"--gpu-type {gpu_type!r}: no measured throughput for {model} on it; "
                          f"measured: {', '.join(known) or 'none'} (GPU figures remain to be "
                          f"measured with bench/gpu.py and added to THROUGHPUT in "
                          f"pipeline/deblur/job/estimate.py)")
    return figure


class _RangedFile(io.RawIOBase):
    """A read-only, seekable view of one object that fetches HEADER_BYTES blocks on demand.

    Pillow seeks and reads it like a file; only the blocks it touches are fetched, and no more
    than HEADER_BYTES_MAX in all (past that, reads fail and ``over_budget`` is set).
    """

    def __init__(self, storage: Storage, uri: str) -> None:
        super().__init__()
        self.storage, self.uri = storage, uri
        self.blocks: dict[int, bytes] = {}
        self.pos = 0
        self.size: int | None = None  # known once a block comes back short
        self.bytes_read = 0
        self.over_budget = False
        self.error: StorageError | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_END and self.size is None:
            self.size = self._fetch(lambda: self.storage.head(self.uri).size)
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size or 0}[whence]
        self.pos = max(0, base + offset)
        return self.pos

    def readinto(self, buffer: Any) -> int:
        view, done = memoryview(buffer).cast("B"), 0
        while done < len(view):
            index, offset = divmod(self.pos, HEADER_BYTES)
            chunk = self.block(index)[offset:offset + len(view) - done]
            if not chunk:
                break
            view[done:done + len(chunk)] = chunk
            done += len(chunk)
            self.pos += len(chunk)
        return done

    def block(self, index: int) -> bytes:
        if index in self.blocks:
            return self.blocks[index]
        if self.size is not None and index * HEADER_BYTES >= self.size:
            return b""
        if (len(self.blocks) + 1) * HEADER_BYTES > HEADER_BYTES_MAX:
            self.over_budget = True
            raise OSError(f"header read stopped at {HEADER_BYTES_MAX} bytes")
        data = self._fetch(lambda: self.storage.get_range(self.uri, HEADER_BYTES,
                                                          start=index * HEADER_BYTES))
        self.bytes_read += len(data)
        if len(data) < HEADER_BYTES:
            self.size = index * HEADER_BYTES + len(data)
        self.blocks[index] = data
        return data

    def _fetch(self, call: Any) -> Any:
        try:
            return call()
        except StorageError as exc:
            self.error = exc  # Pillow turns exceptions into "not an image"; keep the real one
            raise


def read_header(storage: Storage, uri: str, config: JobConfig) -> tuple[str | None, Any, int]:
    """(problem or None, (width, height, format) or a message, bytes read). Never whole images.

    Problems are the reasons a run would fail the image with (codec's empty, corrupt,
    unsupported_format, too_large; the worker's fetch_failed), or UNVERIFIED.
    """
    stream = _RangedFile(storage, uri)
    name = repr(uri[:EXAMPLE_CHARS])
    try:
        if not stream.block(0):
            return "empty", f"{name}: zero-byte object; re-upload the image", stream.bytes_read
        img = codec.open_header(stream, name, config.codec)
    except (ImageError, StorageError) as exc:
        if stream.error is not None:
            return "fetch_failed", f"{name}: {stream.error}", stream.bytes_read
        if stream.over_budget:
            return (UNVERIFIED, f"{name}: no header in the first {HEADER_BYTES_MAX:,} bytes; a "
                                f"run reads the whole object", stream.bytes_read)
        assert isinstance(exc, ImageError), exc
        return exc.reason, exc.args[0], stream.bytes_read
    return None, (img.width, img.height, codec.FORMATS[img.format]), stream.bytes_read


def estimate(config: JobConfig, storage: Storage, *, gpus: int = 1, gpu_type: str = "cpu-dev",
             sample_size: int = 200, seed: int = 0) -> PlanReport:
    """Plan the job without writing anything and estimate its cost.

    Args:
        config: the job config, built as ``deblur run`` builds it (source, destination set).
        storage: where the source lives; only read (GET, LIST, ranged GET, HEAD).
        gpus: devices the job would run on (wall time = device-hours / gpus).
        gpu_type: a device type with a measured figure in THROUGHPUT.
        sample_size: headers to read, drawn uniformly from the valid rows.
        seed: the sample's seed: the same seed over the same rows reads the same headers.
    """
    if gpus < 1:
        raise ConfigError(f"--gpus {gpus}: must be >= 1")
    if sample_size < 1:
        raise ConfigError(f"--sample {sample_size}: must be >= 1")
    mp_per_s, provenance = throughput(gpu_type, config.model.name)
    report = PlanReport(source=config.source, destination=config.destination,
                        gpu_type=gpu_type, gpus=gpus, mp_per_s_per_gpu=mp_per_s,
                        throughput_source=provenance)
    ops_before = dict(storage.ops)
    sample = _stream_rows(report, config, storage, sample_size, random.Random(seed))
    source_ops = _ops_since(storage, ops_before)
    _sample_headers(report, storage, sorted(sample), config)
    report.plan_requests = _ops_since(storage, ops_before)
    _estimate_cost(report, config, source_ops)
    return report


def _stream_rows(report: PlanReport, config: JobConfig, storage: Storage, sample_size: int,
                 rng: random.Random) -> list[str]:
    """Count every row's verdict and keep a uniform sample of the valid keys (reservoir)."""
    sample: list[str] = []
    batches, planner = plan_rows(config.source, config.destination, storage, config.codec,
                                 job=config)
    for batch in batches:
        columns = (batch.column(name).to_pylist() for name in ("key", "error", "reference"))
        for key, error, reference in zip(*columns):
            if error:
                reason, _, message = error.partition(": ")
                examples = report.invalid_examples.setdefault(reason, [])
                if len(examples) < MAX_EXAMPLES:
                    examples.append(_printable(message))
                continue
            report.valid += 1
            report.references += reference is not None
            if len(sample) < sample_size:
                sample.append(key)
            else:
                slot = rng.randrange(report.valid)
                if slot < sample_size:
                    sample[slot] = key
    counts = planner.counts
    if counts.rows == 0:  # the same refusal as Ledger.create
        raise ManifestError(f"source {config.source} lists no images: check the prefix "
                            f"(image extensions only) or the manifest's key column")
    report.rows, report.invalid = counts.rows, dict(counts.invalid)
    report.shards = math.ceil(counts.rows / config.shard_size)  # iter_shards: every row
    tasks = 0
    if planner.source_files > 1 and parallel_files(config, storage):
        tasks = min(config.plan_tasks, planner.source_files)
    _planning(report, planner, tasks)
    return sample


def _planning(report: PlanReport, planner: Any, tasks: int = 0) -> None:
    """Which path planning takes (this plan took the one-process path) and what it costs at
    the measured rates (not this plan's own time: a report is the same each time). With
    ``tasks``, a run plans the files as that many Ray tasks at once,
    each file twice (pipeline/deblur/job/parallel.py): expected time from the one-process rate."""
    rows = report.rows
    files = planner.source_files
    source = (f"{files} manifest file{'s' if files != 1 else ''} streamed by ranged GETs"
              if files else "a listing of the prefix, streamed page by page")
    peak = PLANNING_PEAK_MIB + PLANNING_MIB_PER_M * max(
        0.0, (rows - PLANNING_MEASURED_ROWS) / 1e6)
    path = ("one process, two passes: provisional rows to a local spool, duplicates found "
            "by digest partitions and confirmed on the keys")
    if tasks:
        path = (f"{tasks} Ray tasks at once, one per file (digests, then shards); the "
                f"driver finds duplicates by digest partitions, confirmed on the keys")
    report.planning = {
        "source": source,
        "source_files": files,
        "parallel_tasks": tasks,
        "path": path,
        "duplicates": ("digests spilled to local disk" if planner.spilled
                       else "digests in memory"),
        "expected_seconds": round(rows / PLANNING_ROWS_PER_S * (2 / tasks if tasks else 1),
                                  1),
        "expected_peak_rss_mib": round(peak),
        "local_disk_bytes": planner.spool_bytes + 16 * planner.spilled,
        "measured": PLANNING_SOURCE,
    }


def _printable(text: str) -> str:
    """The planner quotes keys with repr(); this also bounds the length and escapes the rest."""
    return printable(text[:EXAMPLE_CHARS] + ("…" if len(text) > EXAMPLE_CHARS else ""))


def _ops_since(storage: Storage, before: dict[str, int]) -> dict[str, int]:
    return {op: n - before.get(op, 0) for op, n in storage.ops.items() if n > before.get(op, 0)}


def _sample_headers(report: PlanReport, storage: Storage, sample: list[str],
                    config: JobConfig) -> None:
    report.histogram = {label: 0 for _, label in HISTOGRAM}
    for uri in sample:
        report.sampled += 1
        problem, detail, read = read_header(storage, uri, config)
        report.header_bytes_read += read
        if problem:
            if problem == UNVERIFIED:
                report.unverified += 1
            else:
                report.sample_problems[problem] = report.sample_problems.get(problem, 0) + 1
            examples = report.sample_problem_examples.setdefault(problem, [])
            if len(examples) < MAX_EXAMPLES:
                examples.append(_printable(detail))
            continue
        width, height, fmt = detail
        megapixels = width * height / 1e6
        report.readable += 1
        report.sample_megapixels += megapixels
        report.formats[fmt] = report.formats.get(fmt, 0) + 1
        report.histogram[next(label for top, label in HISTOGRAM if megapixels <= top)] += 1
    # Images that would fail contribute nothing; unverified ones are assumed average.
    report.megapixels_exact = report.sampled == report.valid and not report.unverified
    if report.readable:
        processed = report.valid * (report.readable + report.unverified) / report.sampled
        report.megapixels = report.sample_megapixels / report.readable * processed


def _estimate_cost(report: PlanReport, config: JobConfig, source_ops: dict[str, int]) -> None:
    report.gpu_hours = report.megapixels / report.mp_per_s_per_gpu / 3600
    report.wall_hours = report.gpu_hours / report.gpus
    run_s = report.wall_hours * 3600
    shards, valid = report.shards, report.valid
    failing = round(valid * sum(report.sample_problems.values()) / report.sampled) \
        if report.sampled else 0
    # A first `deblur run`, request by request, from the code paths named (ledger.py,
    # scheduler.py, worker.py, metrics.py); docs/scaling.md has the per-shard counts measured.
    items = [
        ("read the source (as this plan did)", source_ops),
        ("worker: fetch each valid image", {"GET": valid}),
        ("worker: fetch each reference image", {"GET": report.references}),
        ("worker: write each output (sample failures excluded)", {"PUT": valid - failing}),
        ("planning: one shard file per shard", {"PUT": shards}),
        ("worker: shard rows, previous result (absent), its re-read at commit; the result",
         {"GET": 3 * shards, "PUT": shards}),
        ("planning: job.json checked and written", {"HEAD": 1, "PUT": 1}),
        ("weights: the driver's digest, each worker's load",
         {"GET": 0 if config.model.random_weights else 1 + _workers(report.gpus, config)}),
        ("driver: index read and results listed 3x before the run, once after; summary.json",
         {"GET": 3, "LIST": 3 + math.ceil(shards / 1000), "PUT": 1}),
        (f"driver: cancel check every 2 s (and before, after), index every "
         f"{config.scheduler.index_interval_s:g} s, metrics snapshot every "
         f"{config.metrics.snapshot_interval_s:g} s",
         {"HEAD": 2 + math.ceil(run_s / 2),
          "PUT": 1 + int(run_s / config.scheduler.index_interval_s)
          + 2 + int(run_s / config.metrics.snapshot_interval_s)}),
    ]
    report.request_items = [{"what": what, **ops} for what, ops in items if any(ops.values())]
    totals: dict[str, int] = {}
    for _, ops in items:
        for op, n in ops.items():
            totals[op] = totals.get(op, 0) + n
    report.requests = {op: totals.get(op, 0) for op in ("GET", "PUT", "LIST", "HEAD")}
    report.request_cost_usd = sum(PRICE_PER_1000[op] * n / 1000
                                  for op, n in report.requests.items())


def _workers(gpus: int, config: JobConfig) -> int:
    per_worker = config.worker.gpus_per_worker
    return max(1, math.ceil(gpus / per_worker)) if per_worker > 0 else 1


def _duration(hours: float) -> str:
    if hours < 1 / 60:
        return f"{hours * 3600:.0f} s"
    if hours < 1:
        return f"{hours * 60:.0f} min"
    return f"{hours:,.1f} h" if hours < 48 else f"{hours / 24:,.1f} days"


def render(report: PlanReport) -> str:
    """The human-readable report."""
    lines = [f"source:       {report.source}", f"destination:  {report.destination}",
             f"images:       {report.rows:,} rows, {report.valid:,} valid, "
             f"{report.shards:,} shards"]
    for reason, count in sorted(report.invalid.items()):
        lines.append(f"  would fail {reason}: {count:,}")
        lines += [f"    e.g. {example}" for example in report.invalid_examples.get(reason, [])]
    exact = "exact" if report.megapixels_exact else (
        f"estimated from {report.sampled:,} sampled headers")
    lines.append(f"megapixels:   {report.megapixels:,.1f} ({exact}; "
                 f"{report.header_bytes_read:,} header bytes read)")
    if report.readable:
        lines.append("sizes:        " + ", ".join(f"{label}: {n}" for label, n in
                                                  report.histogram.items() if n))
        lines.append("formats:      " + ", ".join(f"{fmt}: {n}" for fmt, n in
                                                  sorted(report.formats.items())))
    problems = sorted(report.sample_problems.items())
    if report.unverified:
        problems.append((UNVERIFIED, report.unverified))
    for problem, count in problems:
        share = count / report.sampled
        verdict = "would fail" if problem != UNVERIFIED else "not checked"
        lines.append(f"  sample {problem}: {count} of {report.sampled} {verdict} "
                     f"(~{share * report.valid:,.0f} in the job)")
        lines += [f"    e.g. {example}" for example in
                  report.sample_problem_examples.get(problem, [])]
    lines.append(f"compute:      {report.gpu_hours:,.2f} {report.gpu_type}-hours; "
                 f"{_duration(report.wall_hours)} wall on {report.gpus} "
                 f"(startup not included)")
    lines.append(f"  throughput: {report.mp_per_s_per_gpu:.4f} MP/s per device, "
                 f"{report.throughput_source}")
    plan = report.planning
    if plan:
        tasks = plan["parallel_tasks"]
        lines.append(f"planning:     {plan['source']}; {plan['path']} "
                     f"({plan['duplicates']}); "
                     + (f"{tasks} parallel tasks" if tasks else "no parallel tasks"))
        lines.append(f"  expected:   ~{plan['expected_seconds']:,.0f} s, peak memory "
                     f"~{plan['expected_peak_rss_mib']:,} MiB, local disk "
                     f"{plan['local_disk_bytes'] / 1e6:,.1f} MB; {plan['measured']}")
    cost = report.request_cost_usd
    cost = f"{cost:,.2f}" if cost >= 1 else f"{cost:.4f}"
    lines.append("requests:     " + ", ".join(f"{op} {n:,}" for op, n in report.requests.items()
                                              if n)
                 + f" (~${cost} at S3 Standard us-east-1 list prices)")
    return "\n".join(lines)
