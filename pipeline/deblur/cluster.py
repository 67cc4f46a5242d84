"""Ray start-up: join ``scheduler.address`` or start Ray in this process.

One small module that the driver (``run/driver.py``) and planning in Ray tasks
(``job/parallel.py``) both call, so planning never reaches up into the driver.
"""

from __future__ import annotations

import math
import os

from deblur.config import JobConfig


def start_ray(config: JobConfig, *, verbose: bool = False) -> None:
    """Connect to ``scheduler.address`` or start Ray in-process (the embedded default).

    In-process on a machine without CUDA, Ray gets logical GPUs so the same actors (asking for
    ``gpus_per_worker``) schedule as they would on a GPU node, and run on the CPU.

    Workers' output is not copied to this process's stdout unless ``verbose`` (it stays in
    Ray's session logs); Ray's own logger goes through ours, i.e. to the job's log file.
    """
    import ray

    from deblur.console import quiet_ray_logger

    if ray.is_initialized():
        return
    quiet_ray_logger()
    sched = config.scheduler
    if sched.address:
        ray.init(address=sched.address, log_to_driver=verbose, configure_logging=False)
        return
    num_gpus = sched.ray_num_gpus
    if stand_in_gpus(config):
        num_gpus = math.ceil(sched.max_workers * config.worker.gpus_per_worker)
    cpus = max(os.cpu_count() or 1,
               math.ceil(sched.max_workers * config.worker.cpus_per_worker) + 1)
    # address="local": always a fresh instance, never a cluster some `ray start` left behind.
    ray.init(address="local", num_cpus=cpus, num_gpus=num_gpus, include_dashboard=False,
             log_to_driver=verbose, configure_logging=False)


def stand_in_gpus(config: JobConfig) -> bool:
    """Whether the GPUs workers ask for are logical ones ``start_ray`` declares: Ray in this
    process on a machine without CUDA, and ``scheduler.ray_num_gpus`` not set. The workers then
    run on the CPU, so what a person reads about them never mentions a GPU."""
    if config.scheduler.address or config.scheduler.ray_num_gpus is not None:
        return False
    import torch

    return not torch.cuda.is_available()
