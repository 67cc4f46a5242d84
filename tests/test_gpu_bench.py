"""The GPU proof cannot rot: ``bench/gpu.py --dry-run`` runs every row's code on the CPU (CI runs
it here), and ``scripts/gpu_check.sh`` refuses a machine it cannot prove anything on with the
command that fixes it. The figures themselves need a GPU (docs/benchmarks.md, "GPU proof")."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import venv
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load_bench() -> ModuleType:
    """bench/gpu.py as a module (bench/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


gpu = _load_bench()


@pytest.mark.integration
@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU's check")
def test_dry_run_runs_every_row_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu-{date}-{gpu}.jsonl"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--dry-run", "--jsonl", str(out)],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
        env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (written,) = tmp_path.glob("gpu-*-cpu.jsonl")  # {date} and {gpu} filled in
    lines = [json.loads(line) for line in written.read_text().splitlines()]
    header = lines[0]
    assert header["kind"] == "header" and header["dry_run"] is True
    assert header["weights"] == "mimo-unet-synthetic.safetensors"
    rows = {line["key"]: line for line in lines if line["kind"] == "row"}
    assert {row["group"] for row in rows.values()} == set(gpu.ROWS)
    assert not [key for key, row in rows.items() if row["status"] == "error"]
    for row in rows.values():  # a row that did not run says why
        if row["status"] == "skipped":
            assert row["notes"].startswith("skipped: ") and len(row["notes"]) > 12
    # CUDA-only rows ran their code on the CPU, labelled, where they can.
    for key in ("model.bf16.b2", "model.fp16.b2", "compile.default", "precision.fp16"):
        assert rows[key]["status"] == "ok", key
    assert "dry run" in rows["compile.default"]["notes"]
    # `deblur run` through real Ray, end to end, once per codec (nvJPEG's row with Pillow).
    for key in ("ray.pillow", "ray.nvjpeg"):
        assert rows[key]["status"] == "ok" and rows[key]["extra"]["ok"] == 8, key
    assert "dry run: nvJPEG needs CUDA" in rows["ray.nvjpeg"]["notes"]
    assert rows["deblurrer-device"]["status"] == "ok"  # the device-resident packing
    # Four sizes, one image each: one graph per (bucket, power-of-two batch), so four.
    assert rows["graphs"]["extra"]["graphs"] == 4
    assert rows["worker"]["extra"]["ok"] == 8
    targets = [line for line in lines if line["kind"] == "target"]
    assert len(targets) == 3 and all("CPU: not a GPU figure" in t["basis"] for t in targets)
    assert "| target | value | goal | met | from |" in proc.stdout


def test_dry_run_sets_every_size_it_names() -> None:
    args = gpu.parse_args(["--dry-run"])
    for name, value in gpu.DRY_RUN.items():
        assert getattr(args, name) == value
    assert args.check_cuda_rows_on_cpu
    assert set(gpu.ROW_FUNCS) == set(gpu.ROWS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine passes this check")
def test_gpu_check_refuses_a_cpu_torch_with_the_command_to_run() -> None:
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 2, proc.stdout + proc.stderr
    version = torch.__version__.split("+")[0]
    assert (f"gpu_check: torch {torch.__version__} is a CPU build: this check needs an NVIDIA "
            f"GPU and a CUDA build of torch, e.g. pip install 'torch=={version}' --index-url "
            f"https://download.pytorch.org/whl/cu126") in proc.stdout
    assert "pytest" not in proc.stdout  # nothing ran after the refusal


def test_targets_are_taken_from_rows_of_the_run() -> None:
    table = gpu.Table({}, None)
    table.reference = table.add(gpu.Row("compile", "compile.default", "compiled", 100.0))
    table.add(gpu.Row("ray", "ray.pillow", "ray, Pillow", 60.0))
    table.add(gpu.Row("ray", "ray.nvjpeg", "ray, nvJPEG", 95.0))
    table.add(gpu.Row("authors", "authors", "authors' loop", 2.0))
    table.add(gpu.Row("precision", "precision.fp16", "fp16", notes="",
                      extra={"mean_levels": 0.02, "max_levels": 3}))
    bench = SimpleNamespace(cuda=True, engine_dtype=torch.float16)
    got = {t["target"]: t for t in gpu.targets(table, bench)}
    e2e = got["deblur run end to end / compiled model alone"]
    assert e2e["value"] == pytest.approx(0.95) and e2e["met"] is True  # nvJPEG's row first
    assert got["deblur run end to end / the authors' loop"]["value"] == pytest.approx(47.5)
    parity = got["fp16 (the engine's precision) vs fp32"]
    assert parity["met"] is False  # max 3 levels: over the 2 allowed
    assert "**no**" in gpu.targets_text(list(got.values()))


def test_gpu_check_installs_a_carried_ray_into_a_private_folder(tmp_path: Path) -> None:
    """On a GPU image without Ray, .whl/ is installed (here: an archive the way `prepare`
    packs Ray, holding a one-file package) where only this check's processes see it."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "gpu_check.sh", repo / "scripts")
    (repo / ".whl").mkdir()
    package = tmp_path / "pack" / "ray"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("__version__ = 'carried'\n")
    with tarfile.open(repo / ".whl" / "ray-carried-slim.tar.xz", "w:xz") as archive:
        archive.add(package, arcname="ray")
    bare = tmp_path / "bare"  # a Python without Ray (nor torch)
    venv.create(bare, with_pip=False)
    site = tmp_path / "site"
    proc = subprocess.run(["bash", str(repo / "scripts" / "gpu_check.sh")],
                          capture_output=True, text=True, timeout=120, cwd=repo,
                          env={**os.environ, "PYTHON": str(bare / "bin" / "python"),
                               "DEBLUR_CARRIED_SITE": str(site), "PYTHONPATH": ""})
    assert f"gpu_check: ray carried from .whl/ (in {site})" in proc.stdout, proc.stdout
    assert (site / "ray" / "__init__.py").is_file()
    # Then the check stops where there is nothing to measure, saying what to do.
    assert proc.returncode == 2
    assert "gpu_check: torch does not import" in proc.stdout
