"""The driver at scale: the real actor pool and ledger feeding simulated GPU workers on Ray.

    .venv/bin/python bench/scale.py                          # 50 and 200 workers
    .venv/bin/python bench/scale.py --workers 50 --shards-per-worker 20

Each level runs a job of ``workers x shards-per-worker`` shards of ``--shard-size`` synthetic
images through the real ActorPool, real Ray actors (``deblur.dev.simulate.SimulatedWorker``: real
ledger I/O, a model that sleeps at ``--rate`` images/s per GPU, logical GPUs) and the ledger on
local disk. It prints, per level: shard dispatches per second with every worker up (and what the
workers could have absorbed), the GPUs' busy share and idle gaps between shards, the driver's
CPU per dispatch and peak RSS, and storage requests per shard for run, status and rerun, with
and without the ledger index. A last pair of runs holds shards fixed and multiplies the images
by 10 to show the driver's memory does not follow the image count.

Levels whose actor processes would not fit in this machine's memory are skipped with the
figure that stops them (each Ray actor is a process of about 80 MiB, counted as 110 with margin).
"""

from __future__ import annotations

import sys
from pathlib import Path

import argparse
import os
import platform
import shutil
import tempfile
import time
from typing import Any

from deblur.job.ledger import Ledger
from deblur.run.pool import ActorPool
from deblur.dev.simulate import Recorder, SimulatedWorker, figures, plan_job
from deblur.io.storage import Storage

ACTOR_MIB = 110  # one simulated worker process: ~80 MiB USS measured (ray + pyarrow), + margin


def vm_kib(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def available_mib() -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) // 1024
    return 0


def requests_of(action: Any) -> tuple[dict[str, int], float]:
    storage = Storage()
    start = time.perf_counter()
    action(storage)
    return dict(storage.ops), time.perf_counter() - start


def per_shard(ops: dict[str, int], shards: int) -> str:
    return " ".join(f"{k} {v / shards:.2f}" for k, v in sorted(ops.items()) if v)


def level(workers: int, shards_per_worker: int, shard_size: int, rate: float,
          root: str) -> dict[str, Any]:
    import ray

    shards = workers * shards_per_worker
    storage = Storage()
    ledger = plan_job(root, shards * shard_size, shard_size, storage,
                      {"scheduler.min_workers": workers, "scheduler.max_workers": workers,
                       "worker.gpus_per_worker": 1.0, "worker.cpus_per_worker": 0.0,
                       "scheduler.idle_timeout_s": 600.0})
    plan_ops = dict(storage.ops)
    storage.ops.clear()
    ray.init(address="local", num_cpus=2, num_gpus=workers, include_dashboard=False,
             configure_logging=False, log_to_driver=False,
             runtime_env={"env_vars": {"DEBLUR_SIM_RATE": str(rate)}})
    try:
        recorder = Recorder(workers)
        pool = ActorPool(ledger.config(), ledger, None, ray.remote(SimulatedWorker), recorder)
        cpu0, wall0 = time.process_time(), time.time()
        progress = pool.run(ledger.shard_ids(), shards * shard_size)
        cpu, wall = time.process_time() - cpu0, time.time() - wall0
    finally:
        ray.shutdown()
    assert progress.shards_done == shards and not progress.cancelled, progress
    seen = [r["shard"] for r in recorder.reports]
    assert sorted(seen) == list(range(shards)), "a shard was lost or run twice"
    run_ops: dict[str, int] = dict(storage.ops)
    for report in recorder.reports:
        for op, n in report["requests"].items():
            run_ops[op] = run_ops.get(op, 0) + n
    out = figures(recorder, (wall0, wall0 + wall))
    status_ops, status_s = requests_of(lambda s: Ledger.open(s, ledger.job_root).status())
    rerun_ops, rerun_s = requests_of(lambda s: Ledger.open(s, ledger.job_root).rerun_selection())
    os.unlink(ledger.job_root + "index.parquet")
    bare_ops, bare_s = requests_of(lambda s: Ledger.open(s, ledger.job_root).status())
    out.update(workers=workers, shards=shards, images=shards * shard_size,
               demand_per_s=workers * rate / shard_size, wall_s=wall,
               driver_cpu_ms_per_dispatch=1000 * cpu / shards, driver_cpu_s=cpu,
               driver_peak_rss_mib=vm_kib("VmHWM") / 1024, driver_rss_mib=vm_kib("VmRSS") / 1024,
               plan_ops=plan_ops, run_ops=run_ops, status_ops=status_ops, status_s=status_s,
               rerun_ops=rerun_ops, rerun_s=rerun_s, bare_status_ops=bare_ops,
               bare_status_s=bare_s)
    return out


def print_level(f: dict[str, Any]) -> None:
    shards = f["shards"]
    print(f"| {f['workers']} | {shards} | {f['images']:,} | {f['dispatches_per_s']:.0f} "
          f"(workers could take {f['demand_per_s']:.0f}) | {f['gpu_busy_share']:.0%} | "
          f"{f['idle_gap_p50_ms']:.1f} / {f['idle_gap_p99_ms']:.1f} / "
          f"{f['idle_gap_max_ms']:.0f} | {f['driver_cpu_ms_per_dispatch']:.2f} | "
          f"{f['driver_peak_rss_mib']:.0f} | {f['wall_s']:.0f} |", flush=True)


def total(ops: dict[str, int]) -> str:
    return " ".join(f"{k} {v}" for k, v in sorted(ops.items()) if v)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="50,200")
    parser.add_argument("--shards-per-worker", type=int, default=20)
    parser.add_argument("--shard-size", type=int, default=50)
    parser.add_argument("--rate", type=float, default=300.0, help="images/s per simulated GPU")
    parser.add_argument("--no-flat", action="store_true", help="skip the 10x-images pair")
    parser.add_argument("--memory-run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_run:
        memory_run(args.memory_run)
        return
    import ray

    print(f"# {platform.machine()}, {os.cpu_count()} cores, "
          f"{available_mib() / 1024:.1f} GiB available, ray {ray.__version__}")
    print("| workers | shards | images | dispatches/s | GPU busy | idle gap p50/p99/max ms "
          "| driver CPU ms/dispatch | driver peak RSS MiB | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    results = []
    for workers in (int(w) for w in args.workers.split(",")):
        need = workers * ACTOR_MIB
        if need > 0.8 * available_mib():
            print(f"| {workers} | skipped: {workers} actor processes need ~{need / 1024:.0f} GiB,"
                  f" {available_mib() / 1024:.0f} GiB available | | | | | | | |", flush=True)
            continue
        root = tempfile.mkdtemp(prefix=f"deblur-scale-{workers}-")
        try:
            f = level(workers, args.shards_per_worker, args.shard_size, args.rate, root)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        print_level(f)
        results.append(f)
    print()
    print("| workers | requests per shard: plan | per shard: run (driver + workers) | status, "
          "whole job | rerun selection, whole job | status without index | status s "
          "(index / none) |")
    print("|---|---|---|---|---|---|---|")
    for f in results:
        n = f["shards"]
        print(f"| {f['workers']} | {per_shard(f['plan_ops'], n)} | {per_shard(f['run_ops'], n)} "
              f"| {total(f['status_ops'])} | {total(f['rerun_ops'])} | "
              f"{total(f['bare_status_ops'])} | {f['status_s']:.2f} / "
              f"{f['bare_status_s']:.2f} |")
    if args.no_flat:
        return
    print()
    print("Driver memory against images (same shards, same duration, 10x images):")
    print("| shards | shard size | images | driver peak RSS MiB | driver RSS after MiB |")
    print("|---|---|---|---|---|")
    # Each run in a fresh process: VmHWM only ever grows within one.
    import subprocess

    for size, rate in ((args.shard_size, args.rate), (args.shard_size * 10, args.rate * 10)):
        done = subprocess.run([sys.executable, __file__, "--memory-run", f"{size}:{rate}"],
                              capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("|")]
        print(lines[-1] if lines else f"(failed: {done.stderr.strip().splitlines()[-1:]})",
              flush=True)


def memory_run(spec: str) -> None:
    """One 20-worker, 1000-shard job in this process; prints its memory line."""
    size, rate = spec.split(":")
    root = tempfile.mkdtemp(prefix="deblur-scale-mem-")
    try:
        f = level(20, 50, int(size), float(rate), root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"| {f['shards']} | {size} | {f['images']:,} | {f['driver_peak_rss_mib']:.0f} | "
          f"{f['driver_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
