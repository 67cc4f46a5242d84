"""The GPU table: one command measures every figure of the project's GPU table on this machine.

    bash scripts/gpu_check.sh                                        # the GPU proof: checks,
                                                                     # gpu tests, this table
    .venv/bin/python bench/gpu.py --jsonl 'docs/benchmarks/gpu-{date}-{gpu}.jsonl'
    .venv/bin/python bench/gpu.py --out gpu.json --device-hours-row  # + JSON, + THROUGHPUT row
    .venv/bin/python bench/gpu.py --dry-run                          # every row on the CPU (CI)

Rows (``--rows``, in this order, the ones the targets need first; each one's failure is
printed in its row and the rest go on):

- model:      MIMO-UNet fp32, batch 1, eager, synchronised per image (the authors' way), then
              bf16 and fp16 channels_last eager at each ``--batches`` (8, 16);
- compile:    the engine's precision, channels_last, ``torch.compile`` in each
              ``--model-compile-mode`` at ``--compile-batch`` (16), with its compile seconds;
              the first mode is the reference every row's ratio is taken against;
- deblurrer:  ``Deblurrer.deblur`` on ``batch.max_batch`` decoded uint8 images (upload, pad,
              forward, download) with the job's ModelConfig; ``Deblurrer.launch`` pipelined
              over 8 batches (launch k+1, then collect k); the same on device tensors (the
              nvJPEG path: no upload, no download);
- worker:     ``ShardProcessor`` without Ray over a planned job on local storage, 2 shards in
              flight, wired as the actor is (launch, device pixels), engine busy share and
              GPU memory peak;
- ray:        `deblur run`'s path (``start_ray`` / ``open_or_plan`` / ``execute``), 1 worker
              actor, local storage, end to end: with the Pillow codec, then with nvJPEG, in
              one Ray session; busy share, NVML utilisation and GPU memory peak per row;
- authors:    the authors' loop end to end (Pillow decode, fp32 batch 1, PNG encode);
- precision:  bf16 and fp16 against fp32 on the same weights, in 8-bit output levels;
- graphs:     graphs compiled (and compile seconds) for a mixed job of 720p, 1080p, 4:3 and
              portrait JPEGs through ShardProcessor with the engine compiled;
- memory:     peak CUDA memory per image of the batch, engine precision, at each batch;
- codec:      JPEG decode / encode q95 (Pillow, through deblur.io.codec) on 1 and N threads;
              torchvision nvJPEG batched decode / encode on the GPU;
- plus:       MIMO-UNet+ bf16 channels_last eager, batch 8.

Then the targets, from rows of the same run: end to end >= 0.9x the compiled model alone and
>= 40x the authors' loop; the engine's precision within 1 level mean and 2 max of fp32.

Images are ``--size`` HxW JPEGs at q90 (default 720x1280, i.e. 1280x720 photos); weights are
the shipped checkpoint (``--weights``; ``random`` for seeded random ones). Every timed region
is wall time with ``torch.cuda.synchronize()`` before and after on CUDA; a figure is the
median over ``--repeat`` runs after warm-up. Without CUDA the CUDA-only rows say "skipped:
needs CUDA", never a number. ``--dry-run`` (CI) runs every row's code on the CPU at tiny sizes
in about a minute: the bf16/fp16, compile and precision rows run on the CPU (labelled, not GPU
figures), compilation is traced by dynamo with its eager backend instead of inductor, the
nvJPEG Ray row runs the same code with the Pillow codec (labelled), and the run exits 1 if any
row failed. Rows not started after ``--max-minutes`` are marked skipped, and an interrupt
(SIGINT) skips the rest, so the table always prints; most of a GPU run is torch.compile.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import io
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deblur import config as config_mod
from deblur.config import JobConfig, ModelConfig
from deblur.dev.samples import make_scene, motion_blur
from deblur.io import codec
from deblur.model import STRIDE, create_model
from deblur.model.weights import load_model
from deblur.run.inference import Deblurrer, pick_dtype, reflect_pad, round_up

ROWS = ("model", "compile", "deblurrer", "worker", "ray", "authors", "precision", "graphs",
        "memory", "codec", "plus")
NEEDS_CUDA = "skipped: needs CUDA"
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
IMAGES_PER_RUN = 32  # each timed run of a model row covers at least this many images
SHIPPED_WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "mimo-unet-synthetic.safetensors"
DRY_RUN = {"size": "48x64", "images": 8, "batches": "2", "repeat": 1, "compile_batch": 2,
           "plus_batch": 1, "graphs_images": 1, "shard_size": 4, "images_per_run": 2}
"""What --dry-run sets: sizes at which every row runs on a 2-core CPU in about a minute."""


# -- results ---------------------------------------------------------------------------------


@dataclass
class Row:
    """One line of the table (and of the JSON)."""

    group: str
    key: str
    what: str
    images_per_s: float | None = None
    status: str = "ok"  # ok | skipped | error
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    ratio: float | None = None


class Table:
    """Collects rows as they are measured, prints each at once, writes the JSON after each."""

    def __init__(self, header: dict[str, Any], out: str | None,
                 jsonl: str | None = None) -> None:
        self.header, self.out, self.jsonl = header, out, jsonl
        self.rows: list[Row] = []
        self.reference: Row | None = None
        self.device_hours: str | None = None
        self.targets: list[dict[str, Any]] = []

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        value = fmt_rate(row.images_per_s) if row.images_per_s is not None else "—"
        print(f"#   [{row.group}] {row.what}: {value}"
              f"{' images/s' if row.images_per_s is not None else ''}"
              f"{'; ' + row.notes if row.notes else ''}", flush=True)
        self.write()
        return row

    def finish(self) -> None:
        ref = self.reference
        for row in self.rows:
            if ref is not None and ref.images_per_s and row.images_per_s is not None:
                row.ratio = row.images_per_s / ref.images_per_s
        self.write()

    def markdown(self) -> str:
        ref = self.reference
        lines = ["| what | images/s | vs compiled model | notes |", "|---|---|---|---|"]
        for row in self.rows:
            value = fmt_rate(row.images_per_s) if row.images_per_s is not None else "—"
            ratio = f"{row.ratio:.2f}x" if row.ratio is not None else "—"
            notes = row.notes.replace("|", "\\|")
            lines.append(f"| {row.what} | {value} | {ratio} | {notes} |")
        if ref is None:
            lines.append("")
            lines.append("Ratios: none (the reference row, the compiled model-only figure, was "
                         "not measured in this run).")
        else:
            lines.append("")
            lines.append(f"Ratios are to: {ref.what} = {fmt_rate(ref.images_per_s)} images/s, "
                         f"same run.")
        return "\n".join(lines)

    def write(self) -> None:
        if self.out:
            data = {"header": self.header,
                    "reference": self.reference.key if self.reference else None,
                    "rows": [dataclasses.asdict(r) for r in self.rows],
                    "targets": self.targets, "device_hours_row": self.device_hours}
            _replace_file(self.out, json.dumps(data, indent=2, default=str))
        if self.jsonl:  # one object a line: the header, each row, each target
            lines = [{"kind": "header", **self.header,
                      "reference": self.reference.key if self.reference else None}]
            lines += [{"kind": "row", **dataclasses.asdict(r)} for r in self.rows]
            lines += [{"kind": "target", **t} for t in self.targets]
            _replace_file(self.jsonl, "".join(json.dumps(line, default=str) + "\n"
                                              for line in lines))


def _replace_file(path: str, text: str) -> None:
    """Written whole after every row, so a run cut short still leaves what it measured."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


def targets(table: Table, bench: Bench) -> list[dict[str, Any]]:
    """The issue's targets, from rows of this run: end to end >= 0.9x the compiled model alone
    and >= 40x the authors' loop; the engine's precision within 1 level mean, 2 max of fp32."""
    ok = {r.key: r for r in table.rows if r.status == "ok" and r.images_per_s}
    cpu = "" if bench.cuda else " (CPU: not a GPU figure)"
    e2e = ok.get("ray.nvjpeg") or ok.get("ray.pillow")
    out: list[dict[str, Any]] = []

    def add(what: str, value: float | None, goal: str, met: bool | None, basis: str) -> None:
        out.append({"target": what, "value": value, "goal": goal, "met": met,
                    "basis": basis + cpu})

    ref = table.reference if table.reference and table.reference.images_per_s else None
    ratio = e2e.images_per_s / ref.images_per_s if e2e and ref else None  # type: ignore[operator]
    add("deblur run end to end / compiled model alone", ratio, ">= 0.9",
        None if ratio is None else ratio >= 0.9,
        f"{e2e.key if e2e else 'no ray row'} / {ref.key if ref else 'no compile row'}")
    authors = ok.get("authors")
    ratio = e2e.images_per_s / authors.images_per_s if e2e and authors else None  # type: ignore[operator]
    add("deblur run end to end / the authors' loop", ratio, ">= 40",
        None if ratio is None else ratio >= 40,
        f"{e2e.key if e2e else 'no ray row'} / {'authors' if authors else 'no authors row'}")
    name = dtype_name(bench.engine_dtype)
    parity = next((r for r in table.rows if r.key == f"precision.{name}" and r.status == "ok"),
                  None)
    if parity is not None:
        mean, peak = parity.extra["mean_levels"], parity.extra["max_levels"]
        add(f"{name} (the engine's precision) vs fp32", mean, "<= 1 level mean, <= 2 max",
            mean <= 1 and peak <= 2, f"precision.{name}: mean {mean:.3f}, max {peak}")
    else:
        add(f"{name} (the engine's precision) vs fp32", None, "<= 1 level mean, <= 2 max",
            None, f"precision.{name} not measured")
    return out


def targets_text(items: list[dict[str, Any]]) -> str:
    lines = ["| target | value | goal | met | from |", "|---|---|---|---|---|"]
    for t in items:
        value = "—" if t["value"] is None else (f"{t['value']:.2f}x" if "/" in t["target"]
                                                else f"{t['value']:.3f}")
        met = {True: "yes", False: "**no**", None: "—"}[t["met"]]
        lines.append(f"| {t['target']} | {value} | {t['goal']} | {met} | {t['basis']} |")
    return "\n".join(lines)


def fmt_rate(value: float | None) -> str:
    if value is None:
        return "—"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


# -- settings shared by the rows ----------------------------------------------------------------


@dataclass
class Bench:
    """What every row needs: the device, sizes, the job's config, the inputs on disk."""

    args: argparse.Namespace
    device: torch.device
    height: int
    width: int
    batches: list[int]
    base: JobConfig
    has_compile_field: bool
    engine_dtype: torch.dtype
    tmp: Path
    jpegs: list[bytes] = field(default_factory=list)
    input_dir: Path | None = None
    header: dict[str, Any] = field(default_factory=dict)
    engine: tuple[Deblurrer, str] | None = None  # shared by the deblurrer and worker rows

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def cuda_rows(self) -> bool:
        """Whether the CUDA-only rows run (on CUDA, or on CPU as a code check)."""
        return self.cuda or self.args.check_cuda_rows_on_cpu

    @property
    def cpu_check(self) -> str:
        return "" if self.cuda else " [CPU code check, not a GPU figure]"

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"

    def inputs(self) -> list[bytes]:
        """``--images`` JPEGs (a few distinct blurred scenes, repeated), made once."""
        if not self.jpegs:
            count = self.args.images
            distinct = []
            for i in range(min(count, 8)):
                rng = np.random.default_rng(i)
                blurry = motion_blur(make_scene(rng, self.height, self.width), 9, 20.0 * i)
                buf = io.BytesIO()
                from PIL import Image

                Image.fromarray(blurry).save(buf, "JPEG", quality=90)
                distinct.append(buf.getvalue())
            self.jpegs = [distinct[i % len(distinct)] for i in range(count)]
            self.input_dir = self.tmp / "in"
            self.input_dir.mkdir(parents=True, exist_ok=True)
            for i, data in enumerate(self.jpegs):
                (self.input_dir / f"img{i:05d}.jpg").write_bytes(data)
        return self.jpegs

    def decoded(self, count: int) -> list[np.ndarray]:
        jpegs = self.inputs()[:count]
        cfg = self.base.codec
        return [codec.decode(data, f"img{i}", cfg).pixels for i, data in enumerate(jpegs)]

    def model_config(self, **changes: Any) -> ModelConfig:
        return replace(self.base.model, **changes)

    def deblurrer(self) -> tuple[Deblurrer, str]:
        """The job's engine (its default ModelConfig), warmed once for every batch size the
        worker meets, so the deblurrer and worker rows time no compilation."""
        if self.engine is None:
            torch.manual_seed(0)
            deblurrer = Deblurrer(load_model(self.base.model), self.base.model)
            warm_s, sizes = warm_engine(deblurrer, self.height, self.width, self.base,
                                        self.cuda)
            self.engine = deblurrer, f"warmed batch sizes {sizes} in {warm_s:.1f} s first"
        return self.engine

    def drop_engine(self) -> None:
        self.engine = None
        fresh(self.device, reset=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(step: Callable[[], object], images: int, device: torch.device, repeat: int,
            warmup: int = 2) -> tuple[float, float]:
    """(median images/s, seconds the warm-up took) of ``step``, which does ``images`` images."""
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    sync(device)
    warm_s = time.perf_counter() - start
    rates = []
    for _ in range(repeat):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        rates.append(images / (time.perf_counter() - start))
    return statistics.median(rates), warm_s


def fresh(device: torch.device, reset: bool = False) -> None:
    """Drop what earlier rows left: cached blocks and, with ``reset``, compiled graphs."""
    gc.collect()
    if reset:
        try:
            torch._dynamo.reset()
        except Exception:  # noqa: BLE001 - only a clean-up
            pass
        gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def dtype_name(dtype: torch.dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype))


def padded(bench: Bench) -> tuple[int, int]:
    return round_up(bench.height, STRIDE), round_up(bench.width, STRIDE)


def forward_rate(bench: Bench, name: str, batch: int, dtype: torch.dtype, channels_last: bool,
                 compile_mode: str | None = None) -> tuple[float, float]:
    """Model-only images/s of one variant on random input (inference_mode)."""
    device = bench.device
    memory = torch.channels_last if channels_last else torch.contiguous_format
    torch.manual_seed(0)
    model = create_model(name).to(device, dtype, memory_format=memory)
    forward: Callable[[torch.Tensor], Any] = model
    if compile_mode is not None and bench.args.dry_run and not bench.cuda:
        # Inductor on a CPU takes a minute a graph: the dry run traces with dynamo only.
        forward = torch.compile(model, backend="eager", dynamic=False)
    elif compile_mode is not None:
        forward = torch.compile(model, mode=compile_mode, dynamic=False)
    h, w = padded(bench)
    x = torch.rand(batch, 3, h, w, device=device, dtype=dtype).contiguous(memory_format=memory)
    calls = max(1, math.ceil(min(bench.args.images_per_run, bench.args.images) / batch))

    def step() -> None:
        with torch.inference_mode():
            for _ in range(calls):
                forward(x)[2]

    warmup = (1 if bench.args.dry_run else 3 if compile_mode is not None
              else 2 if device.type == "cuda" else 1)
    return measure(step, calls * batch, device, bench.args.repeat, warmup=warmup)


# -- the rows ----------------------------------------------------------------------------------


def row_model(bench: Bench, table: Table) -> None:
    device = bench.device
    torch.manual_seed(0)
    model = create_model("mimo-unet").to(device)
    h, w = padded(bench)
    x = torch.rand(1, 3, h, w, device=device)
    count = max(1, min(bench.args.images_per_run, bench.args.images))

    def authors() -> None:  # their eval.py: fp32, batch 1, no_grad, one image at a time
        for _ in range(count):
            with torch.no_grad():
                model(x)[2]
            sync(device)

    rate, _ = measure(authors, count, device, bench.args.repeat, warmup=1)
    table.add(Row("model", "model.authors", f"MIMO-UNet fp32, batch 1, eager, synchronised per "
                  f"image (the authors' way), {bench.size}", rate))
    del model, x
    if bench.cuda_rows:
        variants = [(torch.bfloat16, True), (torch.float16, True)]
    else:
        variants = [(torch.float32, False)]
        table.add(Row("model", "model.half", "MIMO-UNet bf16 / fp16 channels_last eager",
                      status="skipped", notes=NEEDS_CUDA))
    for dtype, channels_last in variants:
        for batch in bench.batches:
            what = (f"MIMO-UNet {dtype_name(dtype)} {'channels_last' if channels_last else 'NCHW'}"
                    f" eager, batch {batch}{bench.cpu_check if dtype != torch.float32 else ''}")
            key = f"model.{dtype_name(dtype)}.b{batch}"
            try:
                rate, _ = forward_rate(bench, "mimo-unet", batch, dtype, channels_last)
                table.add(Row("model", key, what, rate))
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory at a big batch
                table.add(error_row("model", key, what, exc))
                fresh(device)


def row_compile(bench: Bench, table: Table) -> None:
    if not bench.cuda_rows:
        table.add(Row("compile", "compile", "MIMO-UNet channels_last, torch.compile, batch "
                      f"{bench.args.compile_batch}", status="skipped", notes=NEEDS_CUDA))
        return
    dtype = bench.engine_dtype
    batch = bench.args.compile_batch
    for i, mode in enumerate(bench.args.model_compile_mode.split(",")):
        what = (f"MIMO-UNet {dtype_name(dtype)} channels_last, torch.compile mode={mode}, "
                f"batch {batch}{bench.cpu_check}")
        key = f"compile.{mode}"
        fresh(bench.device, reset=True)
        before = _compile_seconds()
        try:
            rate, warm_s = forward_rate(bench, "mimo-unet", batch, dtype, True, mode)
        except Exception as exc:  # noqa: BLE001
            table.add(error_row("compile", key, what, exc))
            continue
        after = _compile_seconds()
        compile_s = after - before if after is not None and before is not None else None
        dry = ("dry run: dynamo's eager backend stands in for inductor; "
               if bench.args.dry_run and not bench.cuda else "")
        row = table.add(Row("compile", key, what, rate,
                            notes=f"{dry}compile + warm-up {warm_s:.0f} s"
                                  f"{f' (compiling {compile_s:.1f} s)' if compile_s else ''}"
                                  f"{'; reference row' if i == 0 else ''}",
                            extra={"compile_s": compile_s, "warm_s": warm_s}))
        if i == 0:
            table.reference = row
    fresh(bench.device, reset=True)


def _engine_label(bench: Bench, deblurrer: Deblurrer | None = None) -> str:
    """The engine's precision and compilation as configured and as in effect."""
    cfg = bench.base.model
    dtype = deblurrer.dtype if deblurrer is not None else bench.engine_dtype
    if not bench.has_compile_field:
        return f"precision={cfg.precision} ({dtype_name(dtype)}), eager (no model.compile here)"
    setting = getattr(cfg, "compile")
    if deblurrer is not None:
        effective = "on" if getattr(deblurrer, "_compiled", None) is not None else "off"
        error = getattr(deblurrer, "compile_error", None)
        effective += f", failed: {error}" if error else ""
    else:
        effective = "on" if setting == "on" or (setting == "auto" and bench.cuda) else "off"
    mode = getattr(cfg, "compile_mode", None)
    return (f"precision={cfg.precision} ({dtype_name(dtype)}), compile={setting} ({effective})"
            f"{f', mode {mode}' if mode and effective.startswith('on') else ''}")


def warm_sizes(job: JobConfig, cuda: bool) -> list[int]:
    """Batch sizes to warm: every one the engine can form on CUDA (compiled graphs are per
    size); one image on the CPU (eager: nothing to compile, and big batches are slow)."""
    return list(range(1, job.batch.max_batch + 1)) if cuda else [1]


def warm_engine(deblurrer: Any, height: int, width: int, job: JobConfig, cuda: bool
                ) -> tuple[float, str]:
    """Warm a Deblurrer (``warm`` when it has one, else one ``deblur`` call per size)."""
    start = time.perf_counter()
    sizes = warm_sizes(job, cuda)
    if hasattr(deblurrer, "warm"):
        deblurrer.warm((height, width), sizes)
    else:
        image = np.full((height, width, 3), 128, np.uint8)
        sizes = sorted({job.batch.max_batch, 1, max(2, job.batch.max_batch // 2)}) if cuda \
            else [1]
        for size in sizes:
            deblurrer.deblur([image] * size)
    text = f"{sizes[0]}..{sizes[-1]}" if len(sizes) > 2 else ",".join(map(str, sizes))
    return time.perf_counter() - start, text


def row_deblurrer(bench: Bench, table: Table) -> None:
    count = min(bench.base.batch.max_batch, bench.args.images, bench.args.images_per_run)
    images = bench.decoded(count)
    deblurrer, warmed = bench.deblurrer()
    what = (f"Deblurrer.deblur on {count} decoded uint8 images (upload, pad, forward, download), "
            f"{bench.size}")
    rate, _ = measure(lambda: deblurrer.deblur(images), count, bench.device,
                      bench.args.repeat, warmup=1)
    table.add(Row("deblurrer", "deblurrer", what, rate,
                  notes=f"{_engine_label(bench, deblurrer)}; {warmed}"))
    if not hasattr(deblurrer, "launch"):
        return
    # The engine's way: batch k+1 queued on the device before batch k is collected.
    batches = 2 if bench.args.dry_run else 8

    def pipelined(batch: list[Any]) -> None:
        pending = deblurrer.launch(batch)
        for _ in range(batches - 1):
            following = deblurrer.launch(batch)
            pending()
            pending = following
        pending()

    rate, _ = measure(lambda: pipelined(images), count * batches, bench.device,
                      bench.args.repeat, warmup=1)
    table.add(Row("deblurrer", "deblurrer-pipelined",
                  f"Deblurrer.launch, {batches} batches of {count}, each queued before the one "
                  f"before it is collected (the engine's pipelining), {bench.size}", rate,
                  notes=_engine_label(bench, deblurrer)))
    # nvJPEG's path: the decoded images are tensors on the device and so are the outputs; no
    # pixel crosses the bus (on the CPU the same packing code runs on CPU tensors).
    tensors = [torch.from_numpy(img).to(bench.device) for img in images]
    rate, _ = measure(lambda: pipelined(tensors), count * batches, bench.device,
                      bench.args.repeat, warmup=1)
    table.add(Row("deblurrer", "deblurrer-device",
                  f"Deblurrer.launch as above on {bench.device.type} tensors (nvJPEG's "
                  f"device-resident path: no upload, no download), {bench.size}", rate,
                  notes=_engine_label(bench, deblurrer)))


def _plan(bench: Bench, name: str) -> tuple[JobConfig, Any, Any]:
    from deblur.io.storage import get_storage
    from deblur.run.driver import open_or_plan

    bench.inputs()
    storage = get_storage(bench.base.storage)
    shard_size = bench.args.shard_size or max(1, math.ceil(bench.args.images / 4))
    job = replace(bench.base, source=str(bench.input_dir),
                  destination=str(bench.tmp / f"out-{name}"), shard_size=shard_size)
    ledger = open_or_plan(job, storage, resume=False)
    return job, storage, ledger


def busy_share(metrics: list[dict[str, Any]]) -> float | None:
    """Σ busy_s / Σ wall_s over shard reports (shards in flight together overlap in both)."""
    wall = sum(m.get("wall_s") or 0.0 for m in metrics)
    # engine_busy_s: the engine's busy time over each shard's window (busy_s is only the
    # shard's own share since the engine attributes each batch once).
    busy = sum(m.get("engine_busy_s", m.get("busy_s")) or 0.0 for m in metrics)
    return busy / wall if wall > 0 else None


def _shard_metrics(node: Any) -> Iterator[dict[str, Any]]:
    """Every mapping in ``node`` carrying both busy_s and wall_s (per-shard metrics)."""
    if isinstance(node, dict):
        if "busy_s" in node and "wall_s" in node:
            yield node
            return
        for value in node.values():
            yield from _shard_metrics(value)
    elif isinstance(node, list):
        for value in node:
            yield from _shard_metrics(value)


def row_worker(bench: Bench, table: Table) -> None:
    from deblur.run.worker import ShardProcessor

    job, storage, ledger = _plan(bench, "worker")
    deblurrer, warmed = bench.deblurrer()
    cuda = bench.cuda
    # Wired as build_processor wires the actor's: pipelined launch and, with nvJPEG, pixels
    # kept on the device.
    processor = ShardProcessor(job, deblurrer.deblur, "bench-gpu", storage,
                               fp32_reruns=lambda: deblurrer.fp32_reruns,
                               infer_tiled=deblurrer.deblur_tiled,
                               launch=deblurrer.launch if cuda else None, device_pixels=cuda)
    codec_name = getattr(getattr(processor, "codec", None), "name", "pillow (deblur.io.codec)")
    in_flight = job.scheduler.shards_per_worker
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        busy_before = processor.engine.busy_seconds
        start = time.perf_counter()
        with ThreadPoolExecutor(in_flight) as pool:
            reports = list(pool.map(lambda s: processor.process(ledger.job_root, s, 0),
                                    ledger.shard_ids()))
        wall = time.perf_counter() - start
        busy = processor.engine.busy_seconds - busy_before
    finally:
        _close_processor(processor)
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    ok = sum(r["ok"] for r in reports)
    failed = sum(r["failed"] for r in reports)
    share = busy_share([r["metrics"] for r in reports])
    notes = (f"{ok} ok / {failed} failed in {len(reports)} shards of {job.shard_size}; engine "
             f"busy {busy / wall:.0%} of the run (Σbusy_s/Σwall_s over shards "
             f"{share:.0%}); codec: {codec_name}; {_engine_label(bench, deblurrer)}; "
             f"{warmed}{f'; GPU memory peak {peak / 2**30:.2f} GiB' if peak else ''}")
    table.add(Row("worker", "worker", f"ShardProcessor without Ray, {in_flight} shards in "
                  f"flight, local storage, {bench.size} JPEG q90", ok / wall, notes=notes,
                  status="ok" if failed == 0 else "error",
                  extra={"busy_share": busy / wall, "shard_busy_share": share, "ok": ok,
                         "failed": failed, "codec": codec_name,
                         "gpu_memory_peak_bytes": peak}))


def _bench_actor(record_dir: str, height: int, width: int, warm: bool) -> Any:
    """The real WorkerActor that also keeps its shard metrics (and, where ModelConfig has no
    ``warm_shapes``, warms its engine in the constructor: before the pool sees it ready)."""
    import ray

    from deblur.run.worker import WorkerActor

    class BenchWorker(WorkerActor):
        def __init__(self, config: dict[str, Any]) -> None:
            WorkerActor.__init__(self, config)
            self.warm_s: float | None = None
            infer = getattr(self.processor.engine, "_infer", None)  # the bound deblur
            if warm and infer is not None:
                job = config_mod.from_dict(config)
                deblurrer = getattr(infer, "__self__", None)
                if deblurrer is not None:
                    self.warm_s, _ = warm_engine(deblurrer, height, width, job,
                                                 torch.cuda.is_available())
            codec_ = getattr(self.processor, "codec", None)
            self.codec_name = getattr(codec_, "name", "pillow (deblur.io.codec)")

        def process(self, job_root: str, shard_id: int, attempt: int) -> dict[str, Any]:
            report = WorkerActor.process(self, job_root, shard_id, attempt)
            m = report.get("metrics") or {}
            # gpu_utilization: NVML's device figure (None without nvidia-ml-py), beside the
            # engine's own busy time.
            keep = {k: m.get(k) for k in ("busy_s", "wall_s", "gpu_memory_bytes", "queue_peak",
                                          "fp32_reruns", "gpu_utilization")}
            keep.update(warm_s=self.warm_s, codec=self.codec_name)
            Path(record_dir, f"shard-{shard_id}-{attempt}.json").write_text(json.dumps(keep))
            return report

    return ray.remote(BenchWorker)


def _nvjpeg_unusable(bench: Bench) -> str | None:
    """Why the nvJPEG rows cannot run here, or None."""
    if not bench.cuda:
        return "nvJPEG needs CUDA"
    try:
        import torchvision.io  # noqa: F401 - the optional extra (deblur[gpu])
    except Exception as exc:  # noqa: BLE001 - absent, or a build that does not match torch
        return (f"torchvision unusable ({type(exc).__name__}: {one_line_text(exc)}); "
                f"scripts/gpu_check.sh prints the pip command")
    return None


def one_line_text(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200]


def _ray_variants(bench: Bench) -> list[tuple[str, str, str]]:
    """(key, codec.backend, label note) of each Ray row: Pillow, then nvJPEG. Without nvJPEG
    the second runs with Pillow in a dry run (the same code, labelled) and is skipped in a
    real run (with the reason)."""
    variants = [("ray.pillow", "pillow", "codec.backend=pillow")]
    unusable = _nvjpeg_unusable(bench)
    if unusable is None:
        variants.append(("ray.nvjpeg", "nvjpeg", "codec.backend=nvjpeg"))
    elif bench.args.dry_run:
        variants.append(("ray.nvjpeg", "pillow", f"dry run: {unusable}, so this row ran the "
                         f"same code with codec.backend=pillow [not an nvJPEG figure]"))
    else:
        variants.append(("ray.nvjpeg", "", f"skipped: {unusable}"))
    return variants


def row_ray(bench: Bench, table: Table) -> None:
    """`deblur run`'s path through Ray (start_ray, open_or_plan, execute), 1 worker actor,
    local storage, once per codec, in one Ray session."""
    import ray

    from deblur.cluster import start_ray
    from deblur.run.driver import execute

    bench.drop_engine()  # the actor needs the GPU memory this process holds
    via_config = bench.cuda and "warm_shapes" in {f.name for f in dataclasses.fields(ModelConfig)}
    started = False
    try:
        for key, backend, label in _ray_variants(bench):
            what = (f"deblur run through Ray (local storage), 1 worker, "
                    f"codec.backend={key.split('.')[1]}, {bench.size} JPEG q90")
            if not backend:
                table.add(Row("ray", key, what, status="skipped", notes=label))
                continue
            job, _, ledger = _plan(bench, key.replace(".", "-"))
            job = replace(job, codec=replace(job.codec, backend=backend))
            if via_config:  # the worker compiles every batch size before it reports ready
                job = replace(job, model=replace(job.model, warm_shapes=(
                    f"{bench.height}x{bench.width}",)))
            record_dir = bench.tmp / f"ray-reports-{key}"
            record_dir.mkdir(exist_ok=True)
            if not started:
                start_ray(job)
                started = True
            try:
                _ray_run(bench, table, key, what, label, job, ledger, record_dir, via_config,
                         execute)
            except Exception as exc:  # noqa: BLE001 - the other codec's row still runs
                traceback.print_exc()
                table.add(error_row("ray", key, what, exc))
    finally:
        if started:
            ray.shutdown()


def _ray_run(bench: Bench, table: Table, key: str, what: str, label: str, job: JobConfig,
             ledger: Any, record_dir: Path, via_config: bool, execute: Callable[..., Any]
             ) -> None:
    first_ready: list[float] = []

    def on_progress(progress: Any) -> None:
        if progress.workers_active and not first_ready:
            first_ready.append(time.monotonic())

    outcome = execute(job, ledger, ledger.shard_ids(), ledger.status().pending, on_progress,
                      _bench_actor(str(record_dir), bench.height, bench.width,
                                   warm=bench.cuda and not via_config))
    end = time.monotonic()
    status = outcome.status
    rate = status.ok / (end - first_ready[0]) if first_ready else None
    summary = ledger.read_summary() or {}
    from_summary = list(_shard_metrics(summary))
    recorded = [json.loads(p.read_text()) for p in sorted(record_dir.glob("*.json"))]
    if from_summary:
        share, source = busy_share(from_summary), "summary.json"
    else:
        share, source = busy_share(recorded), "worker shard reports (summary.json has none)"
    warm = [r["warm_s"] for r in recorded if r.get("warm_s") is not None]
    codecs = sorted({r.get("codec") for r in recorded if r.get("codec")})
    # The device's own figure (NVML, read as each shard ended), beside the engine's busy share.
    device = [r["gpu_utilization"] for r in recorded if r.get("gpu_utilization") is not None]
    device_share = sum(device) / len(device) if device else None
    peak = max((r.get("gpu_memory_bytes") or 0 for r in recorded), default=0)
    run = summary.get("run") or {}
    busy = (f"engine busy {share:.0%} (Σbusy_s/Σwall_s over shards, from {source})"
            if share is not None else "busy share: not in summary.json nor worker reports")
    notes = f"{status.ok} ok / {status.failed} failed; {busy}; "
    if device_share is not None:
        notes += f"GPU utilisation (NVML, mean at shard ends) {device_share:.0%}; "
    if peak:
        notes += f"GPU memory peak {peak / 2**30:.2f} GiB; "
    if via_config:
        warmed = "worker warmed by model.warm_shapes before ready"
    elif warm:
        warmed = f"actor warmed before ready, {warm[0]:.1f} s"
    else:
        warmed = "engine not warmed (CPU: nothing to compile)" if not bench.cuda else \
            "engine NOT warmed (no hook): compilation may be inside the timing"
    notes += (f"timed from first worker ready ({warmed}); driver's own images/s incl. start "
              f"{run.get('images_per_s') or 0:.1f}; codec: {', '.join(codecs) or '?'}; "
              f"{_engine_label(bench)}")
    if label.startswith("dry run"):
        notes = f"{label}; {notes}"
    table.add(Row("ray", key, what, rate, notes=notes,
                  status="ok" if status.failed == 0 and outcome.complete else "error",
                  extra={"busy_share": share, "busy_source": source, "summary_run": run,
                         "gpu_utilization": device_share, "gpu_memory_peak_bytes": peak,
                         "codec": codecs, "ok": status.ok, "failed": status.failed}))


MIXED_SHAPES = ((720, 1280), (1080, 1920), (960, 1280), (1280, 720))
"""HxW of the graphs row's mixed job: 720p, 1080p, 4:3 and portrait."""


def _dynamo_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _compile_seconds() -> float | None:
    """Seconds dynamo (and the backend it calls: inductor) spent compiling in this process so
    far, from its own timers (None when this torch does not say)."""
    try:
        from torch._dynamo.utils import compile_times

        names, values = compile_times(repr="csv", aggregate=True)
        return float(dict(zip(names, values)).get("_compile.compile_inner", 0.0))
    except Exception:  # noqa: BLE001 - an API that moves between releases
        return None


def row_graphs(bench: Bench, table: Table) -> None:
    """Graphs compiled for a mixed-size job through ShardProcessor (720p, 1080p, 4:3,
    portrait), the engine compiled as `deblur run` has it on CUDA: the recompile-storm check."""
    from PIL import Image

    from deblur.io.storage import get_storage
    from deblur.run.driver import open_or_plan
    from deblur.run.worker import ShardProcessor

    per_shape = bench.args.graphs_images
    if bench.cuda:
        shapes, scale_note = MIXED_SHAPES, ""
    else:  # the same four aspect ratios at a size a CPU dry run can afford
        shapes = tuple((max(36, h // 20), max(36, w // 20)) for h, w in MIXED_SHAPES)
        scale_note = " (1/20 scale on the CPU)"
    what = (f"graphs compiled for a mixed job: {per_shape} images each of "
            f"{', '.join(f'{w}x{h}' for h, w in shapes)}{scale_note}")
    if not bench.cuda and not bench.args.dry_run:
        table.add(Row("graphs", "graphs", what, status="skipped",
                      notes=f"{NEEDS_CUDA} (the engine compiles on CUDA only; --dry-run runs "
                            f"the same code with dynamo's eager backend)"))
        return
    bench.drop_engine()
    source = bench.tmp / "mixed"
    source.mkdir(exist_ok=True)
    for n, (h, w) in enumerate(shapes):
        rng = np.random.default_rng(n)
        scene = motion_blur(make_scene(rng, h, w), 9, 30.0 * n)
        for i in range(per_shape):
            Image.fromarray(scene).save(source / f"s{n}-{i}.jpg", "JPEG", quality=90)
    storage = get_storage(bench.base.storage)
    job = replace(bench.base, source=str(source), destination=str(bench.tmp / "out-mixed"),
                  shard_size=len(shapes) * per_shape,
                  model=replace(bench.base.model, compile="on", warm_shapes=()))
    ledger = open_or_plan(job, storage, resume=False)
    torch.manual_seed(0)
    fresh(bench.device, reset=True)
    substitute = ""
    if bench.cuda:
        deblurrer = Deblurrer(load_model(job.model), job.model)
    else:
        # Dry run: inductor on a 2-core CPU takes a minute a graph. Dynamo with its eager
        # backend makes the same graphs (one per bucket and power-of-two batch), without code
        # generation, so the count is the engine's; the seconds are not inductor's.
        deblurrer = Deblurrer(load_model(replace(job.model, compile="off")),
                              replace(job.model, compile="off"))
        deblurrer._compiled = torch.compile(deblurrer.model, backend="eager", dynamic=False)
        substitute = "dry run: dynamo's eager backend stands in for inductor; "
    graphs_before, seconds_before = _dynamo_graphs(), _compile_seconds()
    cuda = bench.cuda
    processor = ShardProcessor(job, deblurrer.deblur, "bench-graphs", storage,
                               fp32_reruns=lambda: deblurrer.fp32_reruns,
                               infer_tiled=deblurrer.deblur_tiled,
                               launch=deblurrer.launch if cuda else None, device_pixels=cuda)
    start = time.perf_counter()
    try:
        report = processor.process(ledger.job_root, 0, 0)
    finally:
        _close_processor(processor)
    wall = time.perf_counter() - start
    graphs = _dynamo_graphs() - graphs_before
    seconds_after = _compile_seconds()
    compile_s = (seconds_after - seconds_before
                 if seconds_after is not None and seconds_before is not None else None)
    batches = [size for size, _ in report["metrics"]["batches"]]
    notes = (f"{substitute}{graphs} graphs for {len(shapes)} shapes; batches run {batches}; "
             f"job wall {wall:.1f} s"
             f"{f', compiling {compile_s:.1f} s of it' if compile_s is not None else ''}; "
             f"{report['ok']} ok / {report['failed']} failed"
             f"{'; eager fallback: ' + deblurrer.compile_error if deblurrer.compile_error else ''}")
    table.add(Row("graphs", "graphs", what, notes=notes,
                  status="ok" if report["failed"] == 0 else "error",
                  extra={"graphs": graphs, "shapes": [list(s) for s in shapes],
                         "batches": batches, "compile_s": compile_s, "wall_s": wall}))
    del deblurrer
    fresh(bench.device, reset=True)


def _close_processor(processor: Any) -> None:
    processor.decode_pool.shutdown(wait=False)
    processor.encode_pool.shutdown(wait=False)
    close = getattr(getattr(processor, "codec", None), "close", None)
    if close is not None:
        close()


def row_authors(bench: Bench, table: Table) -> None:
    from PIL import Image

    fresh(bench.device)
    device = bench.device
    bench.inputs()
    assert bench.input_dir is not None
    count = max(1, min(8, bench.args.images_per_run, bench.args.images))
    paths = sorted(bench.input_dir.glob("*.jpg"))[:count]
    out_dir = bench.tmp / "authors-out"
    out_dir.mkdir(exist_ok=True)
    torch.manual_seed(0)
    model = create_model("mimo-unet").to(device)
    h, w = padded(bench)

    def loop() -> None:
        for path in paths:
            # dataloader: PIL open + F.to_tensor; model(x)[2]; clamp; + 0.5/255; to_pil; save
            pil = Image.open(path)
            x = torch.from_numpy(np.asarray(pil.convert("RGB")).copy()).permute(2, 0, 1)
            x = x.float().div(255).unsqueeze(0).to(device)
            if (h, w) != tuple(x.shape[-2:]):
                x = reflect_pad(x, h - x.shape[-2], w - x.shape[-1])
            with torch.no_grad():
                pred = model(x)[2]
            pred_clip = torch.clamp(pred, 0, 1)[..., :bench.height, :bench.width]
            pred_clip += 0.5 / 255
            pixels = pred_clip.squeeze(0).cpu().mul(255).byte().permute(1, 2, 0).numpy()
            Image.fromarray(pixels, "RGB").save(out_dir / f"{path.stem}.png")

    rate, _ = measure(loop, count, device, bench.args.repeat, warmup=1)
    table.add(Row("authors", "authors", f"the authors' loop end to end (Pillow decode, fp32 "
                  f"batch 1, PNG encode), {bench.size}", rate,
                  notes=f"{count} images a run, one thread, PNG to local disk"))


def row_codec(bench: Bench, table: Table) -> None:
    jpegs = bench.inputs()
    cfg = replace(bench.base.codec, quality=95)
    threads = os.cpu_count() or 1
    decoded = [codec.decode(data, f"img{i}", cfg) for i, data in enumerate(jpegs)]

    def decode_one(data: bytes) -> object:
        return codec.decode(data, "x.jpg", cfg)

    def encode_one(image: codec.DecodedImage) -> object:
        return codec.encode(image, image.pixels, cfg)

    def decode_all(pool: ThreadPoolExecutor | None) -> None:
        list(pool.map(decode_one, jpegs) if pool else map(decode_one, jpegs))

    def encode_all(pool: ThreadPoolExecutor | None) -> None:
        list(pool.map(encode_one, decoded) if pool else map(encode_one, decoded))

    cpu = torch.device("cpu")
    for name, work in (("decode", decode_all), ("encode q95", encode_all)):
        for n in (1, threads):
            pool = ThreadPoolExecutor(n) if n > 1 else None
            try:
                rate, _ = measure(lambda: work(pool), len(jpegs), cpu, bench.args.repeat, 1)
            finally:
                if pool:
                    pool.shutdown()
            table.add(Row("codec", f"codec.pillow.{name.split()[0]}.t{n}",
                          f"Pillow JPEG {name} (deblur.io.codec), {n} thread"
                          f"{'s' if n > 1 else ''}, {bench.size}", rate))
    if not bench.cuda:
        table.add(Row("codec", "codec.nvjpeg", "torchvision nvJPEG batched decode / encode on "
                      "the GPU", status="skipped", notes=NEEDS_CUDA))
        return
    try:
        import torchvision
        from torchvision.io import decode_jpeg, encode_jpeg
    except Exception as exc:  # noqa: BLE001 - absent, or a build that does not match torch
        reason = ("torchvision not installed" if isinstance(exc, ModuleNotFoundError)
                  else f"torchvision unusable: {type(exc).__name__}: {exc}")
        table.add(Row("codec", "codec.nvjpeg", "torchvision nvJPEG batched decode / encode on "
                      "the GPU", status="skipped", notes=f"skipped: {reason}"))
        return
    batch = bench.base.batch.max_batch
    datas = [torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in jpegs]
    chunks = [datas[i:i + batch] for i in range(0, len(datas), batch)]

    def gpu_decode() -> list[torch.Tensor]:
        out: list[torch.Tensor] = []
        for chunk in chunks:
            out += decode_jpeg(chunk, device="cuda")
        return out

    what = f"torchvision {torchvision.__version__} nvJPEG batched decode (batches of {batch}, " \
           f"host bytes in, CUDA CHW uint8 out), {bench.size}"
    try:
        rate, _ = measure(gpu_decode, len(jpegs), bench.device, bench.args.repeat, 2)
        table.add(Row("codec", "codec.nvjpeg.decode", what, rate))
        images = gpu_decode()
    except Exception as exc:  # noqa: BLE001
        table.add(error_row("codec", "codec.nvjpeg.decode", what, exc))
        return
    image_chunks = [images[i:i + batch] for i in range(0, len(images), batch)]

    def gpu_encode() -> None:
        for chunk in image_chunks:
            for data in encode_jpeg(chunk, quality=95):
                data.cpu()

    what = f"torchvision nvJPEG batched encode q95 on the GPU (batches of {batch}, bytes " \
           f"back to host), {bench.size}"
    try:
        rate, _ = measure(gpu_encode, len(images), bench.device, bench.args.repeat, 2)
        table.add(Row("codec", "codec.nvjpeg.encode", what, rate))
    except Exception as exc:  # noqa: BLE001
        table.add(error_row("codec", "codec.nvjpeg.encode", what, exc))


def row_plus(bench: Bench, table: Table) -> None:
    fresh(bench.device)
    batch = bench.args.plus_batch
    if bench.cuda_rows:
        dtype, channels_last, suffix = torch.bfloat16, True, bench.cpu_check
    else:
        dtype, channels_last, suffix = torch.float32, False, " (CPU: fp32, bf16 needs CUDA)"
    rate, _ = forward_rate(bench, "mimo-unet-plus", batch, dtype, channels_last)
    table.add(Row("plus", "plus", f"MIMO-UNet+ {dtype_name(dtype)} "
                  f"{'channels_last' if channels_last else 'NCHW'} eager, batch {batch}, "
                  f"{bench.size}{suffix}", rate))


def row_precision(bench: Bench, table: Table) -> None:
    if not bench.cuda_rows:
        table.add(Row("precision", "precision", "bf16 / fp16 vs fp32, same seeded weights, "
                      "8-bit levels", status="skipped", notes=NEEDS_CUDA))
        return
    fresh(bench.device)
    # A dry run checks the code with one image: bf16/fp16 convolutions on a CPU take seconds.
    count = 1 if bench.args.dry_run else min(4, bench.args.images_per_run, bench.args.images)
    images = bench.decoded(max(1, count))
    torch.manual_seed(0)
    weights = bench.base.model.weights
    # Parity is a property of trained weights (random ones have other activation ranges).
    state = (load_model(replace(bench.base.model, name="mimo-unet")).float().state_dict()
             if weights else create_model("mimo-unet").state_dict())
    which = f"weights {Path(weights).name}" if weights else "seeded (random) weights"
    outputs = {}
    reruns: dict[str, int] = {}
    off = {"compile": "off"} if bench.has_compile_field else {}
    for precision in ("fp32", "bf16", "fp16"):
        model = create_model("mimo-unet")
        model.load_state_dict(state)
        cfg = bench.model_config(precision=precision, channels_last=True, **off)
        deblurrer = Deblurrer(model, cfg)
        outputs[precision] = [deblurrer.deblur([img])[0] for img in images]
        reruns[precision] = getattr(deblurrer, "fp32_reruns", 0)
        del deblurrer, model
    for precision in ("bf16", "fp16"):
        diffs = np.concatenate([
            np.abs(a.astype(np.int16) - b.astype(np.int16)).ravel()
            for a, b in zip(outputs[precision], outputs["fp32"])])
        mean, peak = float(diffs.mean()), int(diffs.max())
        share = float((diffs > 1).mean())
        table.add(Row("precision", f"precision.{precision}",
                      f"{precision} vs fp32 output, same {which}, "
                      f"{len(images)} images {bench.size}{bench.cpu_check}",
                      notes=f"mean {mean:.3f} / max {peak} levels of 255; "
                            f"{share:.2%} of values off by more than 1; "
                            f"{reruns[precision]} images rerun in fp32 (non-finite)",
                      extra={"mean_levels": mean, "max_levels": peak,
                             "share_over_1": share, "fp32_reruns": reruns[precision]}))


def row_memory(bench: Bench, table: Table) -> None:
    what = f"peak CUDA memory per image of the batch, {dtype_name(bench.engine_dtype)} " \
           f"channels_last eager, {bench.size}"
    if not bench.cuda:
        what = f"peak CUDA memory per image of the batch, engine precision, {bench.size}"
        table.add(Row("memory", "memory", what, status="skipped", notes=NEEDS_CUDA))
        return
    fresh(bench.device)
    dtype = bench.engine_dtype
    model = create_model("mimo-unet").to(bench.device, dtype, memory_format=torch.channels_last)
    h, w = padded(bench)
    per_image = {}
    for batch in bench.batches:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        try:
            x = torch.rand(batch, 3, h, w, device=bench.device, dtype=dtype).contiguous(
                memory_format=torch.channels_last)
            with torch.inference_mode():
                model(x)[2]
            torch.cuda.synchronize()
        except torch.cuda.OutOfMemoryError:
            per_image[batch] = None
            continue
        finally:
            x = None
        per_image[batch] = (torch.cuda.max_memory_allocated() - base) / batch
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    text = ", ".join(f"batch {b}: {v / 2**20:.0f} MiB" if v is not None else f"batch {b}: OOM"
                     for b, v in per_image.items())
    table.add(Row("memory", "memory", what, notes=f"{text} per image (input and activations, "
                  f"above {weights / 2**20:.0f} MiB of weights)",
                  extra={"bytes_per_image": per_image, "weights_bytes": weights}))


ROW_FUNCS: dict[str, Callable[[Bench, Table], None]] = {
    "model": row_model, "compile": row_compile, "deblurrer": row_deblurrer,
    "worker": row_worker, "ray": row_ray, "graphs": row_graphs, "authors": row_authors,
    "codec": row_codec,
    "plus": row_plus, "precision": row_precision, "memory": row_memory,
}


def error_row(group: str, key: str, what: str, exc: BaseException) -> Row:
    text = " ".join(str(exc).split())[:300]
    return Row(group, key, what, status="error", notes=f"error: {type(exc).__name__}: {text}")


# -- header and the THROUGHPUT row ------------------------------------------------------------


def _version(module: str) -> str:
    try:
        return __import__(module).__version__
    except ImportError:
        return "not installed"
    except Exception as exc:  # noqa: BLE001
        return f"unknown ({type(exc).__name__})"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5, cwd=Path(__file__).resolve().parent)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5,
                               cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def header(bench: Bench) -> dict[str, Any]:
    device = bench.device
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = (f"{props.name} ({props.total_memory / 2**30:.0f} GiB, "
                f"sm_{props.major}{props.minor})")
    else:
        name = f"CPU only: {_cpu_name()}"
    return {
        "device": name,
        "torch": torch.__version__, "cuda": torch.version.cuda or "none",
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "torchvision": _version("torchvision"), "pillow": _version("PIL"),
        "ray": _version("ray"), "python": platform.python_version(),
        "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git": _git_commit(), "size_wxh": bench.size, "images": bench.args.images,
        "batches": bench.batches, "repeat": bench.args.repeat,
        "engine": _engine_label(bench),
        "weights": (Path(bench.base.model.weights).name if bench.base.model.weights
                    else "random (seeded)"),
        "dry_run": bench.args.dry_run,
        "command": "bench/gpu.py " + " ".join(bench.args.argv),
    }


def gpu_type(device_name: str) -> str:
    lowered = device_name.lower()
    if lowered.startswith("cpu"):
        return "cpu"
    known = re.search(r"\b(h100|h200|h20|b200|b100|gb200|a100|a10g|a10|l40s|l40|l4|t4|v100)\b",
                      lowered)
    if known:
        return known.group(1)
    return re.sub(r"[^a-z0-9]+", "-", lowered.replace("nvidia", "")).strip("-")


def device_hours_row(bench: Bench, table: Table) -> str:
    by_key = {r.key: r for r in table.rows}
    row = by_key.get("ray")
    how = "deblur run through Ray, 1 worker, local storage"
    if row is None or row.images_per_s is None or row.status != "ok":
        row = by_key.get("worker")
        how = "ShardProcessor without Ray (the Ray row was not measured)"
    if row is None or row.images_per_s is None or row.status != "ok":
        return "# no end-to-end figure measured in this run (rows ray / worker): nothing to add"
    h = bench.header
    rate = row.images_per_s
    key = gpu_type(h["device"])
    when = h["date"].split()[0]
    provenance = (f"bench/gpu.py on {h['device']} (torch {h['torch']}, CUDA {h['cuda']}), "
                  f"{bench.size} JPEG, {how}, {h['engine']}: {rate:.1f} images/s end to end; "
                  f"docs/benchmarks.md, {when}")
    return (f'    ("{key}", "{bench.base.model.name}"): (\n'
            f"        {rate:.1f} * {bench.width} * {bench.height} / 1e6,  "
            f"# {rate * bench.width * bench.height / 1e6:.3g} megapixels/s\n"
            f"        {json.dumps(provenance, ensure_ascii=False)}),")


# -- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="720x1280", help="HxW of the images (720x1280)")
    parser.add_argument("--images", type=int, default=256,
                        help="images in the worker / ray / codec rows (and the cap of the "
                             "others' per-run counts)")
    parser.add_argument("--batches", default="8,16",
                        help="batch sizes of the eager model and memory rows")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"subset of {','.join(ROWS)}")
    parser.add_argument("--model-compile-mode", default="default",
                        help="torch.compile modes of the compile row; the first is the "
                             "reference of the ratio column")
    parser.add_argument("--compile-batch", type=int, default=16)
    parser.add_argument("--plus-batch", type=int, default=8)
    parser.add_argument("--engine-compile", choices=("auto", "on", "off"), default=None,
                        help="model.compile for the deblurrer / worker / ray rows when "
                             "ModelConfig has that field (default: the config's default)")
    parser.add_argument("--shard-size", type=int, default=None,
                        help="images per shard in the worker / ray rows (default images/4)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs; the median is kept")
    parser.add_argument("--config", help="a job config YAML as the base of the engine, worker "
                        "and ray rows (default: the dataclass defaults, as `deblur run`)")
    parser.add_argument("--max-minutes", type=float, default=9.0,
                        help="rows not started by then are skipped (so the table always "
                             "prints inside a 10-minute slot)")
    parser.add_argument("--cudnn-benchmark", action="store_true",
                        help="torch.backends.cudnn.benchmark = True for every row")
    parser.add_argument("--out", help="also write the table and header as JSON here")
    parser.add_argument("--jsonl", help="also write the header, each row and each target as "
                        "JSON lines here; {date} and {gpu} are filled in (scripts/gpu_check.sh: "
                        "docs/benchmarks/gpu-{date}-{gpu}.jsonl)")
    parser.add_argument("--weights", default=str(SHIPPED_WEIGHTS),
                        help="checkpoint of the engine, worker, ray, graphs and precision rows "
                             "(default: the shipped one); 'random' for seeded random weights")
    parser.add_argument("--images-per-run", type=int, default=IMAGES_PER_RUN,
                        help="images a timed run of a model-only row covers (at least)")
    parser.add_argument("--graphs-images", type=int, default=3,
                        help="images of each of the graphs row's four sizes")
    parser.add_argument("--dry-run", action="store_true",
                        help="every row's code on the CPU in about a minute (CI runs it): "
                             f"{DRY_RUN['size']} images, {DRY_RUN['images']} of them, batches "
                             f"{DRY_RUN['batches']}, one timed run; compilation traced by dynamo "
                             "alone; CUDA-only rows run on the CPU (labelled) or say why not; "
                             "exits 1 if any row fails")
    parser.add_argument("--device-hours-row", action="store_true",
                        help="print the THROUGHPUT entry for pipeline/deblur/job/estimate.py (printed "
                             "only; that file is not edited)")
    parser.add_argument("--check-cuda-rows-on-cpu", action="store_true",
                        help="developer aid: without CUDA, run the bf16/fp16/compile/precision "
                             "rows on the CPU anyway to exercise their code (labelled; not GPU "
                             "figures)")
    args = parser.parse_args(argv)
    args.argv = argv if argv is not None else __import__("sys").argv[1:]
    if args.dry_run:
        for name, value in DRY_RUN.items():
            setattr(args, name, value)
        args.check_cuda_rows_on_cpu = True
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        height, width = (int(v) for v in args.size.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--size {args.size!r}: expected HxW, e.g. 720x1280") from None
    rows = [r for r in args.rows.split(",") if r]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; choose from {','.join(ROWS)}")
    if args.images < 1 or height < 1 or width < 1:
        raise SystemExit("--images and --size must be positive")
    batches = [int(b) for b in args.batches.split(",") if b]
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    overrides: dict[str, Any] = {"scheduler.max_workers": 1, "metrics.port": 0}
    if args.weights == "random":
        overrides["model.random_weights"] = True
    elif not Path(args.weights).is_file():
        raise SystemExit(f"--weights {args.weights}: no such file; give a checkpoint or 'random'")
    else:
        overrides["model.weights"] = str(Path(args.weights).resolve())
    if "compile" in fields and args.engine_compile is not None:
        overrides["model.compile"] = args.engine_compile
    if device.type == "cpu":  # the CPU model uses the threads the actor reserves
        overrides["worker.cpus_per_worker"] = float(os.cpu_count() or 1)
    base = config_mod.load(args.config, overrides)
    if "compile" in fields and not os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        # The engine's own cache (pipeline/deblur/run/inference.py), for the compile row too: graphs the
        # rows share are compiled once, and the Ray actor reads them from disk.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = getattr(
            base.model, "compile_cache_dir", None) or str(
            Path.home() / ".cache" / "deblur" / "inductor")
    tmp = Path(tempfile.mkdtemp(prefix="deblur-gpu-bench-"))
    bench = Bench(args=args, device=device, height=height, width=width, batches=batches,
                  base=base, has_compile_field="compile" in fields,
                  engine_dtype=pick_dtype(base.model, device), tmp=tmp)
    head = bench.header = header(bench)
    jsonl = None
    if args.jsonl:
        jsonl = args.jsonl.replace("{date}", head["date"].split()[0]).replace(
            "{gpu}", gpu_type(head["device"]))
    table = Table(head, args.out, jsonl)
    print("# GPU table: bench/gpu.py")
    for key, value in head.items():
        print(f"# {key}: {value}")
    if not bench.cuda:
        print("# no CUDA device: CUDA-only rows (bf16/fp16, compile, nvJPEG, memory, "
              "precision) print 'skipped: needs CUDA'"
              + ("; --check-cuda-rows-on-cpu runs some on the CPU as a code check"
                 if args.check_cuda_rows_on_cpu else ""))
    started = time.perf_counter()
    interrupted: str | None = None
    try:
        for name in rows:
            spent = (time.perf_counter() - started) / 60
            if interrupted:
                table.add(Row(name, name, name, status="skipped", notes=interrupted))
                continue
            if spent > args.max_minutes:
                table.add(Row(name, name, name, status="skipped",
                              notes=f"skipped: --max-minutes {args.max_minutes:g} spent "
                                    f"({spent:.1f} min) before this row started"))
                continue
            print(f"# row {name} ...", flush=True)
            row_start = time.perf_counter()
            try:
                ROW_FUNCS[name](bench, table)
            except Exception as exc:  # noqa: BLE001 - one row failing must not stop the rest
                traceback.print_exc()
                table.add(error_row(name, name, name, exc))
            except KeyboardInterrupt:  # scripts/gpu_check.sh's time budget: print what we have
                interrupted = "skipped: interrupted (the time budget ran out) before this row"
                table.add(Row(name, name, name, status="skipped",
                              notes="skipped: interrupted while it ran (the time budget ran "
                                    "out)"))
            finally:
                fresh(device)
            print(f"# row {name}: {time.perf_counter() - row_start:.1f} s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    table.targets = targets(table, bench)
    table.finish()
    print()
    print(f"GPU table, {head['device']}, {head['date']}, {bench.size}, torch {head['torch']}, "
          f"CUDA {head['cuda']} (total {time.perf_counter() - started:.0f} s):")
    print()
    print(table.markdown())
    print()
    print(targets_text(table.targets))
    if args.device_hours_row:
        table.device_hours = device_hours_row(bench, table)
        table.write()
        print()
        print("# THROUGHPUT entry for pipeline/deblur/job/estimate.py (printed only, not written):")
        print(table.device_hours)
    if args.out:
        print(f"\n# JSON: {args.out}")
    if jsonl:
        print(f"\n# JSON lines: {jsonl}")
    errors = [r.key for r in table.rows if r.status == "error"]
    if args.dry_run and errors:  # the dry run is CI's check that no row's code has rotted
        raise SystemExit(f"dry run: {len(errors)} rows failed: {', '.join(errors)}")


if __name__ == "__main__":
    main()
