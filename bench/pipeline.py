"""End-to-end pipeline throughput against plain loops doing the same work, in one run.

    .venv/bin/python bench/pipeline.py                     # local storage and moto S3
    .venv/bin/python bench/pipeline.py --stores local --images 32

Two cases, each on local storage and on moto S3 (its standalone server on 127.0.0.1):
(a) identity model, 1280x720 JPEG: the pipeline's own overhead. Baseline: a plain threaded
    loop (fetch -> decode -> encode -> write, ``--threads`` threads) over the same images.
(b) real MIMO-UNet (random weights) at 256x256: baseline is model-only throughput (the
    Deblurrer on pre-decoded batches of the same size), so the ratio says how well I/O hides
    behind compute.
Pipeline throughput counts from the moment the first worker is ready (model loading excluded,
pipeline fill included) to the job's end, through the real actor pool, Ray actor and ledger.

A shared 2-core machine drifts by tens of percent within a minute, so the identity case runs
``--repeats`` rounds of baseline, pipeline, and closes with one more baseline: each pipeline
figure is divided by the mean of the baselines run just before and just after it, and the
median of those ratios is reported (the table shows every round).
"""

from __future__ import annotations

import sys
from pathlib import Path

import argparse
import os
import platform
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import numpy as np

from deblur.io import codec
from deblur import config as config_mod
from deblur.dev.samples import make_scene, motion_blur
from deblur.cluster import start_ray
from deblur.run.driver import execute, open_or_plan
from deblur.io.storage import Storage, get_storage
from deblur.run.worker import ShardProcessor, WorkerActor, worker_name


def identity(images: list[np.ndarray], shape: tuple[int, int] | None) -> list[np.ndarray]:
    return images


class IdentityWorker(WorkerActor):
    """The real worker with the model replaced by identity: measures pipeline overhead."""

    def __init__(self, config: dict[str, Any]) -> None:  # noqa: D107 - no super(): no model
        self.processor = ShardProcessor(config_mod.from_dict(config), identity, worker_name())


def make_inputs(storage: Storage, prefix: str, count: int, width: int, height: int) -> list[str]:
    encoded = []
    for i in range(min(count, 8)):  # a few distinct scenes, repeated: generation is slow
        blurry = motion_blur(make_scene(np.random.default_rng(i), height, width), 9, 20.0 * i)
        encoded.append(_jpeg(blurry))
    uris = [f"{prefix}/img{i:04d}.jpg" for i in range(count)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda iu: storage.put(iu[1], encoded[iu[0] % len(encoded)]),
                      enumerate(uris)))
    return uris


def _jpeg(pixels: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def plain_loop(storage: Storage, uris: list[str], out_prefix: str, threads: int,
               infer: Any) -> float:
    """images/s of fetch -> decode -> infer -> encode -> write with a thread pool."""
    cfg = config_mod.CodecConfig()

    def one(uri: str) -> None:
        image = codec.decode(storage.get(uri), uri, cfg)
        (out,) = infer([image.pixels], None)
        storage.put(f"{out_prefix}/{uri.rsplit('/', 1)[1]}", codec.encode(image, out, cfg))

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, uris))
    return len(uris) / (time.perf_counter() - start)


def model_only(uris: list[str], storage: Storage, job: config_mod.JobConfig) -> float:
    from deblur.run.inference import Deblurrer
    from deblur.model.weights import load_model

    images = [codec.decode(storage.get(u), u, job.codec).pixels for u in uris]
    deblurrer = Deblurrer(load_model(job.model), job.model)
    batch = job.batch.max_batch
    deblurrer.deblur(images[:batch])  # warm-up
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        deblurrer.deblur(images[i:i + batch])
    return len(images) / (time.perf_counter() - start)


def pipeline_run(job: config_mod.JobConfig, storage: Storage, actor_class: Any) -> float:
    ledger = open_or_plan(job, storage, resume=False)
    first_ready: list[float] = []

    def on_progress(progress: Any) -> None:
        if progress.workers_active and not first_ready:
            first_ready.append(time.monotonic())

    outcome = execute(job, ledger, ledger.shard_ids(), ledger.status().pending, on_progress,
                      actor_class)
    end = time.monotonic()
    assert outcome.complete and outcome.status.failed == 0, outcome.status
    return outcome.status.ok / (end - first_ready[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stores", default="local,s3")
    parser.add_argument("--images", type=int, default=96, help="1280x720 images, identity")
    parser.add_argument("--small", type=int, default=48, help="256x256 images, real model")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--repeats", type=int, default=3,
                        help="identity rounds, each bracketed by baselines")
    args = parser.parse_args()
    import ray

    server = None
    if "s3" in args.stores:
        from moto.server import ThreadedMotoServer

        import logging

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="bench",
                          AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    # Sharpness figures are off here: the baselines do not compute them (bench/quality.py
    # measures their cost separately). The metrics endpoint takes a free port.
    base = config_mod.load(None, {"model.random_weights": True, "scheduler.max_workers": 1,
                                  "quality.sharpness_sample_rate": 0.0, "metrics.port": 0,
                                  "worker.io_threads": args.threads,
                                  "worker.cpus_per_worker": float(os.cpu_count() or 1)})
    start_ray(base)
    storage = get_storage()
    print(f"# {platform.machine()}, {os.cpu_count()} cores, ray {ray.__version__}")
    print("| store | case | baseline | baseline images/s | pipeline images/s | ratio |")
    print("|---|---|---|---|---|---|")
    for store in args.stores.split(","):
        if store == "s3":
            import boto3

            boto3.client("s3").create_bucket(Bucket="bench")
            root = "s3://bench"
        else:
            root = tempfile.mkdtemp(prefix="deblur-bench-")
        big = make_inputs(storage, f"{root}/hd", args.images, 1280, 720)
        small = make_inputs(storage, f"{root}/small", args.small, 256, 256)
        actor = ray.remote(IdentityWorker)
        loops = [plain_loop(storage, big, f"{root}/loop-hd", args.threads, identity)]
        ratios = []
        for round_ in range(args.repeats):
            job = replace(base, source=f"{root}/hd", destination=f"{root}/out-hd-{round_}",
                          shard_size=max(1, args.images // 4))
            pipe = pipeline_run(job, storage, actor)
            loops.append(plain_loop(storage, big, f"{root}/loop-hd", args.threads, identity))
            bracket = (loops[-2] + loops[-1]) / 2  # the baselines just before and just after
            ratios.append(pipe / bracket)
            print(f"| {store} | identity, 1280x720 JPEG, round {round_ + 1} | plain threaded "
                  f"loop (before/after) | {loops[-2]:.1f}/{loops[-1]:.1f} | {pipe:.1f} | "
                  f"{ratios[-1]:.2f}x |", flush=True)
        print(f"| {store} | identity, 1280x720 JPEG: median of {len(ratios)} | | | | "
              f"**{float(np.median(ratios)):.2f}x** |", flush=True)
        job = replace(base, source=f"{root}/small", destination=f"{root}/out-small",
                      shard_size=max(1, args.small // 4))
        only = model_only(small, storage, job)
        pipe = pipeline_run(job, storage, None)
        print(f"| {store} | MIMO-UNet fp32, 256x256 JPEG | model only | {only:.2f} | "
              f"{pipe:.2f} | {pipe / only:.2f}x |", flush=True)
    ray.shutdown()
    if server is not None:
        server.stop()


if __name__ == "__main__":
    main()
