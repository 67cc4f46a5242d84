"""Planning cost of big manifests: seconds and peak RSS, local storage and moto S3.

    .venv/bin/python bench/manifest.py                       # 100k and 1M rows, both stores
    .venv/bin/python bench/manifest.py --rows 100000 --stores local

Each case runs in a fresh child process (so peak RSS is that case's own): it reads a Parquet
manifest of N keys and plans it into shards of 1000 through ``Ledger.create``, the code
`deblur run` uses. The moto server runs in this parent process, so its memory is not counted.
Targets on the 2-core CPU machine: 1M rows in under 30 s locally, peak RSS under 1 GiB, and RSS
growing by under 200 MiB from 100k to 1M rows.
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

import pyarrow as pa
import pyarrow.parquet as pq


def manifest_bytes(rows: int) -> bytes:
    keys = pa.array([f"photos/{i % 997:03d}/camera roll/IMG_{i:08d}.jpg" for i in range(rows)])
    buf = io.BytesIO()
    pq.write_table(pa.table({"key": keys}), buf, compression="zstd")
    return buf.getvalue()


def _peak_rss_mib() -> float:
    """This process's peak RSS. VmHWM, not ru_maxrss: on Linux the latter survives exec, so a
    child would report the parent's peak (the parent builds the big manifest)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(root: str, rows: int, endpoint: str | None) -> None:
    """Plan one manifest and print a JSON line with seconds and RSS figures."""
    import logging

    logging.disable(logging.WARNING)
    from deblur import config as config_mod
    from deblur.job.ledger import Ledger
    from deblur.io.storage import Storage

    overrides = {"source": f"{root}/manifest-{rows}.parquet", "destination": f"{root}/out",
                 "job_root": f"{root}/jobs/{rows}-{time.time_ns()}/", "shard_size": 1000,
                 "model.random_weights": True, "storage.endpoint_url": endpoint}
    job = config_mod.load(None, overrides)
    storage = Storage(job.storage)
    rss_before = _peak_rss_mib()
    start = time.perf_counter()
    ledger = Ledger.create(storage, job, job_id="bench", model_info={})
    seconds = time.perf_counter() - start
    peak = _peak_rss_mib()
    print(json.dumps({"rows": ledger.job()["rows"], "shards": ledger.job()["shards"],
                      "seconds": seconds, "peak_rss_mib": peak,
                      "rss_before_mib": rss_before}))


def run_case(store: str, root: str, rows: int, endpoint: str | None) -> dict:
    cmd = [sys.executable, __file__, "--child", root, "--rows", str(rows)]
    if endpoint:
        cmd += ["--endpoint", endpoint]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["store"] = store
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, nargs="*", default=[100_000, 1_000_000])
    parser.add_argument("--stores", nargs="*", default=["local", "moto"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.rows[0], args.endpoint)
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
        for rows in args.rows:
            store_client.put(f"{root}/manifest-{rows}.parquet", manifest_bytes(rows))
            result = run_case(store, root, rows, endpoint)
            results.append(result)
            print(f"{store:5s} {rows:>9,} rows -> {result['shards']:>5} shards: "
                  f"{result['seconds']:6.1f} s, {rows / result['seconds']:>9,.0f} rows/s, "
                  f"peak RSS {result['peak_rss_mib']:.0f} MiB "
                  f"(before planning {result['rss_before_mib']:.0f} MiB)")
        if server is not None:
            server.stop()
        if tmp is not None:
            tmp.cleanup()
    for store in args.stores:
        by_rows = {r["rows"]: r for r in results if r["store"] == store}
        if 100_000 in by_rows and 1_000_000 in by_rows:
            growth = by_rows[1_000_000]["peak_rss_mib"] - by_rows[100_000]["peak_rss_mib"]
            big = by_rows[1_000_000]
            print(f"{store}: 1M rows {big['seconds']:.1f} s (target < 30 s local), peak RSS "
                  f"{big['peak_rss_mib']:.0f} MiB (target < 1024), growth 100k->1M "
                  f"{growth:.0f} MiB (target < 200)")


if __name__ == "__main__":
    main()
