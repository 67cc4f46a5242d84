"""Planning cost of big manifests: seconds and peak RSS per case, and growth per million rows.

    .venv/bin/python bench/manifest.py                        # 1M, 3M, 10M rows; file, folder
    .venv/bin/python bench/manifest.py --rows 100000 --layouts file --stores local moto

Each case runs in a fresh child process (so peak RSS is that case's own): it plans a manifest
of N keys into shards of 1000 through ``Ledger.create``, the code `deblur run` uses, either one
Parquet file (``file``) or a folder of 16 (``folder``: the source ``…/*.parquet``). The moto
server runs in this parent process, so its memory is not counted.
Targets (issue 17): >= 200,000 rows/s per planning process, peak RSS < 2 GB at 10M rows and
growth <= 20 MB per extra million rows.
"""

from __future__ import annotations

import sys
from pathlib import Path

import argparse
import io
import json
import os
import platform
import resource
import subprocess
import tempfile
import time

from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


CHUNK = 1_000_000  # keys generated (and one row group written) at a time
FILES = 16


def _keys(start: int, stop: int) -> pa.Table:
    return pa.table({"key": pa.array(
        [f"photos/{i % 997:03d}/camera roll/IMG_{i:08d}.jpg" for i in range(start, stop)])})


def manifest_bytes(start: int, stop: int) -> bytes:
    """A Parquet manifest of keys start..stop-1, one row group per CHUNK keys."""
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, pa.schema([("key", pa.string())]), compression="zstd") as w:
        for first in range(start, stop, CHUNK):
            w.write_table(_keys(first, min(stop, first + CHUNK)))
    return buf.getvalue()


def write_manifest(store: Any, root: str, rows: int, layout: str) -> str:
    """Put the case's manifest in the store; returns the job's source."""
    if layout == "file":
        source = f"{root}/manifest-{rows}.parquet"
        store.put(source, manifest_bytes(0, rows))
        return source
    bounds = [rows * i // FILES for i in range(FILES + 1)]
    for i in range(FILES):
        store.put(f"{root}/manifest-{rows}/part-{i:02d}.parquet",
                  manifest_bytes(bounds[i], bounds[i + 1]))
    return f"{root}/manifest-{rows}/*.parquet"


def _peak_rss_mib() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: on Linux the latter survives exec, so a
    child would report the parent's peak (the parent builds the big manifest)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(root: str, source: str, endpoint: str | None, plan_tasks: int = 0) -> None:
    """Plan one manifest and print a JSON line with seconds and RSS figures."""
    import logging

    logging.disable(logging.WARNING)
    from deblur import config as config_mod
    from deblur.job.ledger import Ledger
    from deblur.io.storage import Storage

    overrides = {"source": source, "destination": f"{root}/out",
                 "job_root": f"{root}/jobs/{time.time_ns()}/", "shard_size": 1000,
                 "plan_tasks": plan_tasks,
                 "model.random_weights": True, "storage.endpoint_url": endpoint}
    job = config_mod.load(None, overrides)
    storage = Storage(job.storage)
    rss_before = _peak_rss_mib()
    start, cpu = time.perf_counter(), time.process_time()
    ledger = Ledger.create(storage, job, job_id="bench", model_info={})
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = _peak_rss_mib()
    print(json.dumps({"rows": ledger.job()["rows"], "shards": ledger.job()["shards"],
                      "seconds": seconds, "cpu_seconds": cpu, "peak_rss_mib": peak,
                      "rss_before_mib": rss_before}))


def run_case(store: str, root: str, source: str, endpoint: str | None,
             plan_tasks: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--child", root, "--source", source,
           "--plan-tasks", str(plan_tasks)]
    if endpoint:
        cmd += ["--endpoint", endpoint]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["store"] = store
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="*",
                        default=[1_000_000, 3_000_000, 10_000_000])
    parser.add_argument("--layouts", nargs="*", default=["file", "folder"],
                        choices=["file", "folder"])
    parser.add_argument("--stores", nargs="*", default=["local"], choices=["local", "moto"])
    parser.add_argument("--plan-tasks", type=int, default=0,
                        help="plan the folder layout as this many Ray tasks (0: one process); "
                             "the tasks' memory is not in the driver's peak RSS")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.source, args.endpoint, args.plan_tasks)
        return

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}")
    results = []
    for store in args.stores:
        endpoint = None
        server = None
        if store == "moto":
            from moto.server import ThreadedMotoServer

            os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                              AWS_DEFAULT_REGION="us-east-1")
            import logging

            logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request
            server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            server.start()
            host, port = server.get_host_and_port()
            endpoint = f"http://{host}:{port}"
            from deblur.config import StorageConfig
            from deblur.io.storage import Storage

            Storage(StorageConfig(endpoint_url=endpoint)).client.create_bucket(Bucket="bench")
            root = "s3://bench"
            tmp = None
        else:
            tmp = tempfile.TemporaryDirectory()
            root = tmp.name
        from deblur.config import StorageConfig
        from deblur.io.storage import Storage

        store_client = Storage(StorageConfig(endpoint_url=endpoint))
        for layout in args.layouts:
            for rows in args.rows:
                source = write_manifest(store_client, root, rows, layout)
                tasks = args.plan_tasks if layout == "folder" else 0
                result = run_case(store, root, source, endpoint, tasks)
                result.update(layout=layout if not tasks else f"{layout}/{tasks} tasks")
                results.append(result)
                print(f"{store:5s} {result['layout']:6s} {rows:>11,} rows -> {result['shards']:>6} "
                      f"shards: {result['seconds']:7.1f} s, "
                      f"{rows / result['seconds']:>9,.0f} rows/s "
                      f"({rows / result['cpu_seconds']:,.0f} per CPU-second), "
                      f"peak RSS {result['peak_rss_mib']:5.0f} MiB (before planning "
                      f"{result['rss_before_mib']:.0f} MiB)", flush=True)
        if server is not None:
            server.stop()
        if tmp is not None:
            tmp.cleanup()
    for store in args.stores:
        for layout in args.layouts:
            by_rows = sorted((r for r in results
                              if r["store"] == store and r["layout"].startswith(layout)),
                             key=lambda r: r["rows"])
            if len(by_rows) < 2:
                continue
            small, big = by_rows[0], by_rows[-1]

            def growth(a: dict, b: dict) -> str:
                slope = (b["peak_rss_mib"] - a["peak_rss_mib"]) / ((b["rows"] - a["rows"]) / 1e6)
                return f"{slope:.1f} MiB ({a['rows']:,} -> {b['rows']:,})"

            rate = min(r["rows"] / r["seconds"] for r in by_rows)
            spans = [growth(small, big)]
            if len(by_rows) > 2:  # the last span: past the fixed buffers' fill
                spans.append(growth(by_rows[-2], big))
            print(f"{store} {layout}: growth per extra million rows {', '.join(spans)} "
                  f"(target <= 20), peak RSS at "
                  f"{big['rows']:,} rows {big['peak_rss_mib']:.0f} MiB (target < 2048), "
                  f"slowest {rate:,.0f} rows/s (target >= 200,000)")


if __name__ == "__main__":
    main()
