"""`deblur train`: MIMO-UNet training on Ray Train, checkpoints and metrics in storage under OUT.

One training loop (``train_loop``) runs on every Ray Train worker (``TorchTrainer``;
``prepare_model`` wraps the network in DistributedDataParallel, gloo on CPU workers, NCCL on
GPUs). The authors' recipe: Adam at 1e-4, their MultiStepLR (halve the rate at every sixth
of the run: 500 of their 3000 epochs), random crops and horizontal flips, the multi-scale L1 +
0.1 x FFT loss (``train.loss``); mixed precision on CUDA.

OUT (a local folder or an s3:// prefix, written through ``io.storage`` by rank 0 only):

    OUT/train.json                      the run's settings; a resumed run must match them
    OUT/checkpoints/step-00000500.pt    {'model', 'optimizer', 'scheduler', 'scaler', 'step'}
    OUT/checkpoints/latest.json         the newest complete checkpoint (written after it)
    OUT/metrics.jsonl                   one line per evaluation: step, loss, lr, held-out PSNR
    OUT/model.safetensors               the final weights, fp16, provenance in the metadata
    OUT/best.safetensors                the weights of the best held-out PSNR so far (same
                                        format; its metadata names the step)

A run started again with the same OUT resumes from latest.json at its step: optimizer,
schedule and the data stream continue where they stopped (samples are a function of their
index, ``train.data``), so a killed and resumed run ends with the weights an uninterrupted one
would have. Checkpoints hold ``{'model': state_dict, …}``, the authors' layout, so a
checkpoint is also a valid ``--weights`` / ``--init`` file.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from deblur.errors import ConfigError, PipelineError
from deblur.train.blur import BlurConfig

log = logging.getLogger(__name__)

TRAINABLE = ("mimo-unet", "mimo-unet-plus")
FINAL_NAME = "model.safetensors"
BEST_NAME = "best.safetensors"
TRAIN_JSON = "train.json"
METRICS_NAME = "metrics.jsonl"
LATEST = "checkpoints/latest.json"


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run depends on (``deblur train`` options)."""

    out: str
    data: str | None = None
    """Paired manifest: ``key`` = blurry, ``reference`` = sharp."""
    synthetic: str | None = None
    """Sharp images (manifest, folder or prefix) blurred on the fly (``train.blur``)."""
    model: str = "mimo-unet"
    init: str | None = None
    """Weights to start from (any file ``deblur run --weights`` loads)."""
    steps: int = 3000
    batch: int = 4
    """Samples per worker per step (the authors: 4)."""
    crop: int = 256
    rotate: bool = True
    """Random 90-degree rotations on top of the authors' horizontal flip (all 8 orientations:
    blurry and sharp turn together, so the blur turns with the image)."""
    min_scale: float = 1.0
    """--synthetic: show each sharp crop at a random scale in [min_scale, 1] before blurring
    (1: off). More textures from few photographs."""
    lr: float = 1e-4
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float = 1.0
    threads: int | None = None
    """torch intra-op threads per worker (default: Ray's, one per reserved CPU)."""
    loader_workers: int = 0
    """DataLoader processes per worker making samples (0: in the training thread)."""
    seed: int = 0
    checkpoint_every: int = 500
    eval_every: int = 500
    log_every: int = 10
    holdout: int | None = None
    """Images kept out of training for the held-out PSNR; None: 1 in 20 (at least 1 when
    there are 4 or more)."""
    eval_size: int = 256
    time_limit_s: float | None = None
    """Stop after this much training time, with a checkpoint and the final weights written
    (resume later with the same OUT)."""
    keep_checkpoints: int = 2
    identity_init: bool = True
    """From scratch, zero the three output convolutions so the untrained network returns its
    input (it is residual: out = conv(features) + input): training starts at the blurry
    input's quality instead of a random colour cast, which matters for short runs."""
    address: str | None = None
    blur: BlurConfig = field(default_factory=BlurConfig)
    command: str = ""
    """The command line, recorded in the final weights' metadata."""

    def validate(self) -> None:
        if (self.data is None) == (self.synthetic is None):
            raise ConfigError("give exactly one of DATA (a manifest with key and reference "
                              "columns) or --synthetic SHARP_SOURCE")
        if self.model not in TRAINABLE:
            hint = (" (mimo-unet-plusplus runs mimo-unet-plus weights: train mimo-unet-plus)"
                    if self.model == "mimo-unet-plusplus" else "")
            raise ConfigError(f"--model {self.model!r}: trainable models are "
                              f"{', '.join(TRAINABLE)}{hint}")
        if self.crop < 16 or self.crop % 4:
            raise ConfigError(f"--crop {self.crop}: must be a multiple of 4, at least 16")
        for name in ("steps", "batch", "workers", "checkpoint_every", "eval_every",
                     "log_every", "keep_checkpoints", "eval_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be "
                                  f"at least 1")
        if not 0.1 <= self.min_scale <= 1.0:
            raise ConfigError(f"--min-scale {self.min_scale}: must be within 0.1..1 (1: off)")
        if not 0 < self.lr < 1:
            raise ConfigError(f"--lr {self.lr}: must be within (0, 1)")
        if self.gpus_per_worker < 0 or self.cpus_per_worker <= 0:
            raise ConfigError("--gpus-per-worker must be >= 0 and --cpus-per-worker > 0")
        if self.gpus_per_worker > 0 and not torch.cuda.is_available() and not self.address:
            raise ConfigError(f"--gpus-per-worker {self.gpus_per_worker}: no CUDA device here; "
                              f"use 0 to train on the CPU, or --address a GPU cluster")
        if self.holdout is not None and self.holdout < 0:
            raise ConfigError(f"--holdout {self.holdout}: must be >= 0")
        if self.time_limit_s is not None and self.time_limit_s < 0:
            raise ConfigError("--time-limit must be >= 0")
        self.blur.validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        values = dict(data)
        blur = dict(values.pop("blur", {}))
        if "jpeg_quality" in blur:
            blur["jpeg_quality"] = tuple(blur["jpeg_quality"])
        return cls(**values, blur=BlurConfig(**blur))

    def resume_key(self) -> dict[str, Any]:
        """What a resumed run must share with the run that wrote OUT."""
        return {"model": self.model, "steps": self.steps, "batch": self.batch,
                "workers": self.workers, "crop": self.crop, "seed": self.seed,
                "data": self.data, "synthetic": self.synthetic, "rotate": self.rotate,
                "min_scale": self.min_scale}


def milestones(steps: int) -> list[int]:
    """The authors' schedule scaled to ``steps``: halve the rate at every sixth of the run
    (their lr_steps = 500, 1000, …, 3000 epochs of 3000)."""
    return [max(1, round(steps * k / 6)) for k in range(1, 7)]


def _join(out: str, name: str) -> str:
    from deblur.io.storage import join

    return join(out.rstrip("/") + "/", name)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


def identity_init(model: nn.Module) -> None:
    """Zero the convolutions that produce the three output images (see TrainConfig)."""
    net = _unwrap(model)
    for conv in (net.ConvsOut[0], net.ConvsOut[1], net.feat_extract[5]):  # type: ignore[index]
        for p in conv.parameters():
            nn.init.zeros_(p)


# -- storage of a run ----------------------------------------------------------------------


def read_latest(out: str) -> dict[str, Any] | None:
    """The newest complete checkpoint under OUT (loaded on the CPU), or None."""
    from deblur.io.storage import get_storage

    storage = get_storage()
    pointer = _join(out, LATEST)
    if not storage.exists(pointer):
        return None
    latest = json.loads(storage.get(pointer))
    data = storage.get(_join(out, latest["path"]))
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if int(state["step"]) != int(latest["step"]):
        raise PipelineError(f"{pointer} says step {latest['step']} but its checkpoint holds "
                            f"step {state['step']}")
    return state


def check_resumable(config: TrainConfig) -> int:
    """The step a run with ``config`` starts at (0 or the latest checkpoint's); refuses an
    OUT written by a run with other settings, before anything starts."""
    from deblur.io.storage import get_storage

    storage = get_storage()
    uri = _join(config.out, TRAIN_JSON)
    if not storage.exists(uri):
        return 0
    previous = json.loads(storage.get(uri)).get("resume_key", {})
    mine = config.resume_key()
    differ = [f"{k} {previous.get(k)!r} -> {v!r}" for k, v in mine.items()
              if previous.get(k) != v]
    if differ:
        raise ConfigError(f"{config.out} holds a training run with other settings "
                          f"({'; '.join(differ)}); resume with the same options or choose a "
                          f"new OUT")
    pointer = _join(config.out, LATEST)
    return int(json.loads(storage.get(pointer))["step"]) if storage.exists(pointer) else 0


def save_checkpoint(out: str, step: int, model: nn.Module, optimizer: Any, scheduler: Any,
                    scaler: Any, keep: int) -> str:
    """Write the step's checkpoint, then point latest.json at it, then prune old ones."""
    from deblur.io.storage import get_storage

    storage = get_storage()
    name = f"checkpoints/step-{step:08d}.pt"
    buf = io.BytesIO()
    torch.save({"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "step": step}, buf)
    storage.put(_join(out, name), buf.getvalue())
    # The pointer moves only after the checkpoint is whole: a kill in between resumes from
    # the previous one.
    storage.put(_join(out, LATEST), json.dumps({"step": step, "path": name}).encode())
    old = sorted(info.key for info in storage.list(_join(out, "checkpoints/"), (".pt",)))
    for key in old[:-keep]:
        storage.delete(_join(out, "checkpoints/" + key))
    return name


def weights_metadata(config: TrainConfig, step: int, psnr: float | None,
                     blurry_psnr: float | None, device: torch.device, world: int
                     ) -> dict[str, Any]:
    """The provenance written into model.safetensors and best.safetensors."""
    return {"model": config.model, "steps": step, "planned_steps": config.steps,
            "trained_by": "deblur train", "command": config.command,
            "config": config.to_dict(), "torch": torch.__version__,
            "device": device.type, "workers": world,
            "holdout_psnr": psnr, "holdout_blurry_psnr": blurry_psnr}


def best_record(metrics: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The evaluation with the highest held-out PSNR (the earliest of equals), or None."""
    scored = [m for m in metrics if m.get("holdout_psnr") is not None]
    return max(scored, key=lambda m: (m["holdout_psnr"], -m["step"])) if scored else None


def final_weights(model: nn.Module, metadata: dict[str, Any]) -> bytes:
    """The network's weights as fp16 safetensors with string metadata."""
    from safetensors.torch import save

    state = {k: v.detach().to("cpu", torch.float16).contiguous()
             for k, v in _unwrap(model).state_dict().items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    return save(state, metadata={"format": "pt", **meta})


# -- the loop ------------------------------------------------------------------------------


@dataclass
class _Context:
    rank: int = 0
    world: int = 1
    ray: bool = False


def _context() -> _Context:
    try:
        import ray.train

        ctx = ray.train.get_context()
        return _Context(ctx.get_world_rank(), ctx.get_world_size(), True)
    except Exception:  # noqa: BLE001 - not inside a Ray Train worker: one local process
        return _Context()


def split_holdout(pairs: list[Any], holdout: int | None) -> tuple[list[Any], list[Any]]:
    """(training images, held-out images): the last ones by name are held out."""
    pairs = sorted(pairs, key=lambda p: p.name)
    n = holdout if holdout is not None else (max(1, len(pairs) // 20) if len(pairs) >= 4 else 0)
    n = min(n, len(pairs) - 1)
    return pairs[:len(pairs) - n], pairs[len(pairs) - n:]


@torch.no_grad()
def evaluate(model: nn.Module, holdout: list[tuple[torch.Tensor, torch.Tensor]],
             device: torch.device) -> float:
    """Mean PSNR (dB) of the network's outputs, quantised to 8 bits as a job writes them."""
    net = _unwrap(model)
    was_training = net.training
    net.eval()
    scores = []
    for blurry, sharp in holdout:
        out = net(blurry[None].to(device))[-1].float().clamp(0, 1)
        out = (out * 255).round() / 255
        mse = float(((out.cpu()[0] - sharp) ** 2).mean())
        scores.append(10 * math.log10(1 / max(mse, 1e-12)))
    net.train(was_training)
    return float(np.mean(scores)) if scores else float("nan")


def baseline_psnr(holdout: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    scores = [10 * math.log10(1 / max(float(((b - s) ** 2).mean()), 1e-12)) for b, s in holdout]
    return float(np.mean(scores)) if scores else float("nan")


def say(line: str) -> None:
    """A progress line on the worker's stdout, once.

    Not print(): Ray Train replaces print in its workers with a logger call that also tees to
    the redirected stdout, and every line reached the terminal twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def quiet_ray_train() -> None:
    """Ray worker setup hook of `deblur train`: silence Ray Train's placement-group monitor.

    It polls the state API every second to see whether the train controller died; without
    Ray's dashboard (local Ray here starts without it) that API does not answer and the
    monitor printed a warning a second on the user's terminal. Its errors still show. Also
    Ray Train's INFO line per ``ray.train.report``, which repeats the whole metrics dict that
    the progress lines already show."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner"
                      ).setLevel(logging.ERROR)
    try:  # that module names its logger by its file path, not its module name
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray Train layout: its INFO line shows, nothing breaks
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def train_step(model: nn.Module, optimizer: Any, scheduler: Any, scaler: Any,
               blurry: torch.Tensor, sharp: torch.Tensor, device: torch.device
               ) -> torch.Tensor:
    """One optimizer step on a batch (DDP averages the gradients in backward); the loss."""
    from deblur.train.loss import mimo_loss

    # channels_last: oneDNN's and cuDNN's fast convolution layout (about 10% a step on a
    # 2-core CPU; tensor cores want it under AMP).
    blurry = blurry.to(device, non_blocking=True, memory_format=torch.channels_last)
    sharp = sharp.to(device, non_blocking=True)
    with torch.autocast(device_type=device.type, dtype=torch.float16,
                        enabled=device.type == "cuda"):
        outputs = model(blurry)
    loss, _ = mimo_loss(outputs, sharp)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return loss.detach()


def fingerprint(model: nn.Module) -> torch.Tensor:
    """Sum and sum of squares of every weight, in fp64: equal replicas give equal values."""
    params = [p.detach().double() for p in _unwrap(model).parameters()]
    return torch.stack([sum(p.sum() for p in params), sum((p * p).sum() for p in params)])


def replicas_in_sync(model: nn.Module, device: torch.device) -> bool:
    """Whether every worker holds the same weights (a collective: all ranks call it)."""
    mine = fingerprint(model).to(device)
    gathered = [torch.zeros_like(mine) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, mine)
    return all(bool(torch.equal(g, gathered[0])) for g in gathered)


def train_loop(config_dict: dict[str, Any]) -> None:
    """One worker's training (every rank runs this; rank 0 also writes OUT)."""
    from deblur.io.storage import get_storage
    from deblur.model import create_model
    from deblur.model.weights import load_weights
    from deblur.train.data import PairDataset, RankSampler, holdout_set, load_images

    config = TrainConfig.from_dict(config_dict)
    ctx = _context()
    if ctx.ray:  # again here: Ray Train sets its workers' log levels after the setup hook ran
        quiet_ray_train()
    if config.threads:
        torch.set_num_threads(config.threads)
    if ctx.ray:
        import ray.train.torch

        device = ray.train.torch.get_device()
    else:
        device = torch.device("cuda" if config.gpus_per_worker > 0 else "cpu")
    amp = device.type == "cuda"
    storage = get_storage()
    leader = ctx.rank == 0

    torch.manual_seed(config.seed)  # every rank builds the same initial network
    model = create_model(config.model).train()
    state = read_latest(config.out)
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        start = int(state["step"])
    elif config.init:
        load_weights(model, config.init, config.model)
    elif config.identity_init:
        identity_init(model)
    model.to(device, memory_format=torch.channels_last)
    if ctx.ray and ctx.world > 1:
        import ray.train.torch

        model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones(config.steps), 0.5)
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
    del state

    pairs = load_images(config.data or config.synthetic or "", paired=config.data is not None)
    train_pairs, held = split_holdout(pairs, config.holdout)
    dataset = PairDataset(train_pairs, config.crop, config.seed, config.blur,
                          rotate=config.rotate, min_scale=config.min_scale)
    sampler = RankSampler(start, config.steps, config.batch, ctx.rank, ctx.world)
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch, sampler=sampler,
                                         num_workers=config.loader_workers,
                                         pin_memory=amp, drop_last=True)
    holdout = holdout_set(held, config.eval_size, config.seed, config.blur) if leader else []
    base_psnr = baseline_psnr(holdout)

    metrics: list[dict[str, Any]] = []
    metrics_uri = _join(config.out, METRICS_NAME)
    if leader:
        if start == 0:
            storage.put(_join(config.out, TRAIN_JSON), json.dumps(
                {"config": config.to_dict(), "resume_key": config.resume_key(),
                 "train_images": [p.name for p in train_pairs],
                 "holdout_images": [p.name for p in held]}, indent=2).encode())
        elif storage.exists(metrics_uri):
            metrics = [json.loads(line) for line in storage.get(metrics_uri).decode().splitlines()
                       if line.strip() and json.loads(line)["step"] <= start]
        say(f"train: {config.model} on {device.type}, {ctx.world} worker(s) x batch "
              f"{config.batch}, crop {config.crop}, {len(train_pairs)} training images, "
              f"{len(held)} held out; steps {start}/{config.steps}"
              + (f" (resumed from {start})" if start else "")
              + (f"; held-out PSNR of the blurry input {base_psnr:.2f} dB" if held else ""))

    # Resumed: best.safetensors may hold a step past the checkpoint (a kill in between); it
    # stays unless this run beats the best that the kept metrics record.
    best = best_record(metrics)
    began = time.monotonic()
    window_loss, window_n, window_t = 0.0, 0, time.monotonic()
    done = start
    stopped = False
    for blurry, sharp in loader:
        loss = train_step(model, optimizer, scheduler, scaler, blurry, sharp, device)
        done += 1
        window_loss += float(loss.detach())
        window_n += 1

        stopped = (config.time_limit_s is not None
                   and time.monotonic() - began >= config.time_limit_s)
        if ctx.world > 1:  # every rank stops at the same step, or DDP would hang
            flag = torch.tensor([float(stopped)], device=device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stopped = bool(flag.item())
        last = done == config.steps or stopped

        if leader and (done % config.log_every == 0 or last):
            elapsed = time.monotonic() - window_t
            rate = window_n / elapsed if elapsed > 0 else float("nan")
            eta = (config.steps - done) / rate if rate > 0 else float("nan")
            say(f"step {done}/{config.steps}  loss {window_loss / window_n:.4f}  "
                  f"lr {scheduler.get_last_lr()[0]:.2e}  {rate:.2f} steps/s  "
                  f"ETA {_fmt_time(eta) if math.isfinite(eta) else '?'}")
            window_loss, window_n, window_t = 0.0, 0, time.monotonic()
        if done % config.eval_every == 0 or done % config.checkpoint_every == 0 or last:
            record: dict[str, Any] = {"step": done, "loss": float(loss.detach()),
                                      "lr": scheduler.get_last_lr()[0],
                                      "elapsed_s": round(time.monotonic() - began, 1)}
            if ctx.world > 1:
                record["replicas_in_sync"] = replicas_in_sync(model, device)
                if not record["replicas_in_sync"]:
                    log.warning("step %d: the workers' weights differ (DDP out of sync)", done)
            if leader:
                if holdout and (done % config.eval_every == 0 or last):
                    record["holdout_psnr"] = evaluate(model, holdout, device)
                    record["holdout_blurry_psnr"] = base_psnr
                    say(f"step {done}: held-out PSNR {record['holdout_psnr']:.2f} dB "
                          f"(blurry input {base_psnr:.2f} dB)")
                    # A short or noisy run can peak before its last step (and a long one
                    # overfit): keep the best weights as well as the last.
                    if best is None or record["holdout_psnr"] > best["holdout_psnr"]:
                        best = record
                        storage.put(_join(config.out, BEST_NAME), final_weights(
                            model, weights_metadata(config, done, record["holdout_psnr"],
                                                    base_psnr, device, ctx.world)))
                if done % config.checkpoint_every == 0 or last:
                    save_checkpoint(config.out, done, model, optimizer, scheduler, scaler,
                                    config.keep_checkpoints)
                metrics.append(record)
                storage.put(metrics_uri, "".join(json.dumps(m) + "\n" for m in metrics
                                                 ).encode())
            if ctx.ray:
                import ray.train

                ray.train.report(record)
        if stopped:
            break

    final_uri = _join(config.out, FINAL_NAME)
    # Also when a resumed run had nothing left to do: a kill between the last checkpoint and
    # the final file must not leave a finished run without its weights.
    if leader and (done > start or not storage.exists(final_uri)):
        psnr = metrics[-1].get("holdout_psnr") if metrics else None
        storage.put(final_uri, final_weights(model, weights_metadata(
            config, done, psnr, base_psnr if holdout else None, device, ctx.world)))
        say(f"train: {'stopped at the time limit' if stopped else 'done'} at step {done}; "
              f"weights: {final_uri}")
        if best is not None:
            say(f"train: best held-out PSNR {best['holdout_psnr']:.2f} dB at step "
                  f"{best['step']}: {_join(config.out, BEST_NAME)}")


# -- the driver ------------------------------------------------------------------------------


def preflight(config: TrainConfig) -> int:
    """Every check that can fail fast, before Ray starts: options, OUT, data, --init."""
    from deblur.config import ModelConfig
    from deblur.model.weights import provenance
    from deblur.train.data import _rows

    config.validate()
    for module in ("ray.train.torch", "scipy.signal", "safetensors"):
        try:
            __import__(module)
        except ImportError as exc:
            raise ConfigError(f"deblur train needs {module.split('.')[0]} ({exc}): "
                              f"pip install 'deblur[train]'") from None
    start = check_resumable(config)
    source = config.data or config.synthetic or ""
    try:
        first = next(iter(_rows(source)), None)
    except PipelineError as exc:
        raise ConfigError(f"training data {source}: {exc}") from None
    if first is None:
        raise ConfigError(f"training data {source}: no images found")
    if config.data is not None and first[1] is None:
        raise ConfigError(f"training data {source}: no reference column (the sharp images); "
                          f"a paired manifest needs key (blurry) and reference (sharp), or use "
                          f"--synthetic with sharp images")
    if config.init:
        provenance(ModelConfig(name=config.model, weights=config.init))
    return start


def absolute_paths(config: TrainConfig) -> TrainConfig:
    """Local paths made absolute: Ray Train workers run in a folder of their own."""
    from deblur.io.storage import is_s3

    def fix(uri: str | None) -> str | None:
        if uri is None or is_s3(uri) or uri.startswith("file://"):
            return uri
        return os.path.abspath(uri) + ("/" if uri.endswith("/") else "")

    return dataclasses.replace(config, out=fix(config.out) or config.out, data=fix(config.data),
                               synthetic=fix(config.synthetic), init=fix(config.init))


def train(config: TrainConfig, use_ray: bool = True) -> dict[str, Any]:
    """Run training to ``config.steps`` (or the time limit); returns the last metrics.

    ``use_ray=False`` runs the loop in this process (one worker; tests and debugging).
    """
    from deblur.io.storage import get_storage

    config = absolute_paths(config)
    preflight(config)
    if not use_ray:
        train_loop(config.to_dict())
    else:
        _fit(config)
    storage = get_storage()
    uri = _join(config.out, METRICS_NAME)
    lines = storage.get(uri).decode().splitlines() if storage.exists(uri) else []
    return json.loads(lines[-1]) if lines else {}


def _fit(config: TrainConfig) -> None:
    import tempfile

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        runtime_env = {"worker_process_setup_hook": "deblur.train.trainer.quiet_ray_train"}
        if config.address:
            ray.init(address=config.address, log_to_driver=True, runtime_env=runtime_env)
        else:
            cpus = max(os.cpu_count() or 1, math.ceil(config.workers * config.cpus_per_worker))
            ray.init(address="local", num_cpus=cpus, include_dashboard=False,
                     log_to_driver=True, configure_logging=False, runtime_env=runtime_env)
    resources = {"CPU": config.cpus_per_worker}
    if config.gpus_per_worker > 0:
        resources["GPU"] = config.gpus_per_worker
    # Ray Train's own run folder holds only its bookkeeping (our checkpoints go to OUT).
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=config.to_dict(),
        scaling_config=ScalingConfig(num_workers=config.workers,
                                     use_gpu=config.gpus_per_worker > 0,
                                     resources_per_worker=resources),
        run_config=RunConfig(name="deblur-train",
                             storage_path=tempfile.mkdtemp(prefix="deblur-train-")),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # noqa: BLE001 - Ray wraps worker errors; report one line
        from deblur.errors import one_line

        raise PipelineError(f"training failed: {one_line(exc)}") from None
    if getattr(result, "error", None) is not None:
        from deblur.errors import one_line

        raise PipelineError(f"training failed: {one_line(result.error)}")
