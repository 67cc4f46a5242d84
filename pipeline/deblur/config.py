"""One typed job configuration, built once at the edge and passed down.

Layers, later wins: dataclass defaults -> a YAML file (``configs/*.yaml``) -> CLI flags. Each
stage gets its own frozen dataclass; ``JobConfig`` composes them. Credentials never live here:
they come from the standard AWS chain (environment, profile, IRSA).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from deblur.errors import ConfigError


def parse_shape(text: str, where: str) -> tuple[int, int]:
    """``"720x1280"`` -> (720, 1280); the error names the setting and the expected form."""
    height, sep, width = text.lower().partition("x")
    if not (sep and height.isdigit() and width.isdigit() and int(height) and int(width)):
        raise ConfigError(f"{where}: {text!r} is not a size: write HEIGHTxWIDTH, e.g. 720x1280")
    return int(height), int(width)

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
COMPILE_CHOICES = ("auto", "on", "off")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
OUTPUT_FORMATS = ("same", "jpeg", "png", "webp")
CODEC_BACKENDS = ("auto", "pillow", "nvjpeg")
RETRY_MODES = ("standard", "adaptive", "legacy")
MODEL_NAMES = ("mimo-unet", "mimo-unet-plus", "mimo-unet-plusplus")
"""The registry's names (pipeline/deblur/model MODELS; a test keeps the two equal), here so a config
is checked without importing torch."""
SCENE_MODEL = "deblurgs"
"""The scene job type (pipeline/deblur/scene): DeblurGS, fitted per scene, no weights."""


def tile_side(tile_pixels: int) -> int:
    """The side of the square tiles an image over ``tile_pixels`` is cut into (a multiple of
    4, at least 64), as run/inference.py tile_grid cuts them (a test keeps the two equal):
    validation checks the overlap against it before a job starts, instead of every large
    image failing at run time."""
    import math

    return max(64, math.isqrt(tile_pixels) // 4 * 4)


@dataclass(frozen=True)
class ModelConfig:
    """Which network runs and how."""

    name: str = "mimo-unet"
    """Registry name: mimo-unet, mimo-unet-plus, mimo-unet-plusplus; or deblurgs, the scene
    job type (a folder of scene folders in, the ``scene:`` section applies)."""
    weights: str | None = None
    """URI of the checkpoint (local path, file://, s3://). Required unless random_weights."""
    random_weights: bool = False
    """Run with untrained weights (smoke tests only: the output is not deblurred)."""
    precision: str = "auto"
    """auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16. 16-bit sources always run in
    fp32, and a batch with a non-finite output is rerun in fp32 (docs/benchmarks.md)."""
    compile: str = "auto"
    """torch.compile the network: auto (on CUDA only), on, off. One graph per (bucket shape,
    batch size); a compile failure falls back to eager with one logged reason."""
    compile_mode: str = "default"
    """torch.compile mode: default, reduce-overhead (CUDA graphs) or max-autotune."""
    compile_cache_dir: str | None = None
    """Inductor's on-disk cache, so a new actor does not recompile from scratch. Default:
    TORCHINDUCTOR_CACHE_DIR if set, else ~/.cache/deblur/inductor."""
    warm_shapes: tuple[str, ...] = ()
    """Image sizes (HxW, e.g. 720x1280) compiled when the worker starts, for every batch
    size the engine uses, so the first shard does not wait for compilation."""
    channels_last: bool = True
    """NHWC memory format on CUDA (ignored on CPU, where it does not help these convs)."""
    tile_pixels: int = 4_000_000
    """Images above this many pixels run as overlapping tiles (bounded memory)."""
    tile_overlap: int = 32
    """Overlap in pixels between neighbouring tiles; blended linearly."""
    device: str = "auto"
    """auto (cuda when available), cpu or cuda."""

    def validate(self) -> None:
        if self.name == SCENE_MODEL:  # fitted per scene from its views: no network settings
            if self.weights or self.random_weights:
                raise ConfigError(f"model.name={SCENE_MODEL} fits each scene from its views: "
                                  "drop --weights / --random-weights")
            if self.device not in ("auto", "cpu", "cuda"):
                raise ConfigError(f"model.device={self.device!r}: choose auto, cpu or cuda")
            return
        if self.name not in MODEL_NAMES:
            raise ConfigError(f"model.name={self.name!r}: unknown model; choose one of "
                              f"{', '.join(MODEL_NAMES + (SCENE_MODEL,))}")
        if not self.weights and not self.random_weights:
            raise ConfigError(
                "no model weights given: pass --weights URI (e.g. the authors' MIMO-UNet.pkl), "
                "or --random-weights for a smoke test whose output is NOT deblurred"
            )
        if self.weights and self.random_weights:
            raise ConfigError("both --weights and --random-weights given: choose one")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"model.precision={self.precision!r}: choose one of {PRECISIONS}")
        if self.tile_pixels < 64 * 64:
            raise ConfigError(f"model.tile_pixels={self.tile_pixels}: must be at least 4096")
        if self.tile_overlap < 0 or self.tile_overlap % 4:
            raise ConfigError(
                f"model.tile_overlap={self.tile_overlap}: must be a non-negative multiple of 4"
            )
        if self.tile_overlap >= tile_side(self.tile_pixels) // 2:
            raise ConfigError(
                f"model.tile_overlap={self.tile_overlap}: must be under half the tile side "
                f"({tile_side(self.tile_pixels)} for model.tile_pixels={self.tile_pixels}); "
                f"lower the overlap or raise tile_pixels")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"model.device={self.device!r}: choose auto, cpu or cuda")
        if self.compile not in COMPILE_CHOICES:
            raise ConfigError(f"model.compile={self.compile!r}: choose one of {COMPILE_CHOICES}")
        if self.compile_mode not in COMPILE_MODES:
            raise ConfigError(
                f"model.compile_mode={self.compile_mode!r}: choose one of {COMPILE_MODES}")
        for shape in self.warm_shapes:
            parse_shape(shape, "model.warm_shapes")


@dataclass(frozen=True)
class CodecConfig:
    """How images are decoded and written back."""

    output_format: str = "same"
    """same (as the input), jpeg, png or webp."""
    quality: int = 95
    """JPEG/WebP quality, 1..100."""
    max_pixels: int = 150_000_000
    """Images declaring more pixels are refused before decoding (decompression bombs)."""
    processes: int | None = None
    """Pillow decode/encode in this many worker processes (off the actor's GIL); 0 runs them
    in the actor's threads. None = auto: with the model on CUDA and worker.cpus_per_worker >= 3,
    cpus_per_worker - 1 processes (one core stays for the actor's engine and I/O threads);
    otherwise 0 (a CPU model needs those cores itself, and one process gains nothing)."""
    backend: str = "auto"
    """auto (nvJPEG on the GPU for JPEG when CUDA and torchvision are there, Pillow otherwise),
    pillow, or nvjpeg (refuse to start without it)."""

    def validate(self) -> None:
        if self.output_format not in OUTPUT_FORMATS:
            raise ConfigError(
                f"codec.output_format={self.output_format!r}: choose one of {OUTPUT_FORMATS}"
            )
        if not 1 <= self.quality <= 100:
            raise ConfigError(f"codec.quality={self.quality}: must be within 1..100")
        if self.max_pixels < 1:
            raise ConfigError(f"codec.max_pixels={self.max_pixels}: must be positive")
        if self.processes is not None and not 0 <= self.processes <= 256:
            raise ConfigError(f"codec.processes={self.processes}: must be within 0..256, or "
                              f"null for auto")
        if self.backend not in CODEC_BACKENDS:
            raise ConfigError(f"codec.backend={self.backend!r}: choose one of {CODEC_BACKENDS}")


@dataclass(frozen=True)
class StorageConfig:
    """Object storage client settings (credentials come from the AWS chain, never here)."""

    endpoint_url: str | None = None
    """S3 endpoint (MinIO, Ceph, R2, moto). Default: AWS_ENDPOINT_URL or AWS itself."""
    region: str | None = None
    """Region; default from the AWS chain."""
    retry_mode: str = "adaptive"
    """botocore retry mode: standard or adaptive (client-side rate limiting on throttles)."""
    max_attempts: int = 10
    """Total attempts per request, first included."""
    max_pool_connections: int = 64
    """HTTP connections per process; sized to the worker's I/O threads."""
    list_concurrency: int = 16
    """Folders of a big S3 source prefix listed at once while planning (1: one sequential
    listing); the order of the keys, hence row ids, is the same either way."""

    def validate(self) -> None:
        if self.list_concurrency < 1:
            raise ConfigError(
                f"storage.list_concurrency={self.list_concurrency}: must be >= 1")
        if self.retry_mode not in RETRY_MODES:
            raise ConfigError(f"storage.retry_mode={self.retry_mode!r}: choose {RETRY_MODES}")
        if self.max_attempts < 1:
            raise ConfigError(f"storage.max_attempts={self.max_attempts}: must be >= 1")
        if self.max_pool_connections < 1:
            raise ConfigError(
                f"storage.max_pool_connections={self.max_pool_connections}: must be >= 1"
            )


@dataclass(frozen=True)
class BatchConfig:
    """Dynamic batching of decoded images before the model."""

    max_batch: int = 16
    """Most images in one forward pass."""
    pixel_budget: int = 16_000_000
    """Most padded pixels in one batch (bounds activation memory)."""
    max_wait_ms: float = 50.0
    """A partial batch is sent after waiting this long for more same-shape images."""
    bucket_multiple: int = 4
    """Images are batched with others of the same size rounded up to this multiple. 4 (the
    network's own multiple) keeps every output independent of its batch; a coarser bucket
    puts more images in a batch but the network then sees the padding, which changes pixels
    near and far from the border (docs/benchmarks.md has the measured effect)."""

    def validate(self) -> None:
        if self.max_batch < 1:
            raise ConfigError(f"batch.max_batch={self.max_batch}: must be >= 1")
        if self.pixel_budget < 4096:
            raise ConfigError(f"batch.pixel_budget={self.pixel_budget}: must be >= 4096")
        if self.max_wait_ms < 0:
            raise ConfigError(f"batch.max_wait_ms={self.max_wait_ms}: must be >= 0")
        if self.bucket_multiple < 4 or self.bucket_multiple % 4:
            raise ConfigError(
                f"batch.bucket_multiple={self.bucket_multiple}: must be a multiple of 4"
            )


@dataclass(frozen=True)
class WorkerConfig:
    """One Ray worker actor: its resources and I/O pipeline."""

    gpus_per_worker: float = 1.0
    """GPUs per actor (fractions allowed; a logical GPU on CPU-only machines)."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per actor for Ray scheduling."""
    io_threads: int = 8
    """Threads for fetch+decode and for encode+upload, each."""
    prefetch: int = 32
    """Decoded images queued ahead of the model (backpressure bound)."""
    max_buffered_bytes: int | None = None
    """Most bytes of decoded pixels (inputs and their outputs awaiting encode) an actor holds
    at once; an image larger than this alone still runs, by itself. None = auto: a quarter of
    the memory the actor's container (cgroup) or machine has, within 256 MiB .. 8 GiB."""

    def validate(self) -> None:
        if self.gpus_per_worker < 0:
            raise ConfigError(f"worker.gpus_per_worker={self.gpus_per_worker}: must be >= 0")
        if self.io_threads < 1 or self.prefetch < 1:
            raise ConfigError("worker.io_threads and worker.prefetch must be >= 1")
        if self.max_buffered_bytes is not None and self.max_buffered_bytes < 1 << 20:
            raise ConfigError(f"worker.max_buffered_bytes={self.max_buffered_bytes}: must be "
                              f">= 1048576 (1 MiB), or null for auto")


@dataclass(frozen=True)
class SchedulerConfig:
    """The driver: the autoscaling worker pool and retries."""

    address: str | None = None
    """Ray address; None starts Ray in-process (the embedded default)."""
    min_workers: int = 1
    """Actors kept alive even when idle."""
    max_workers: int = 1
    """Most actors; pending ones ask the Ray autoscaler for GPU nodes."""
    idle_timeout_s: float = 60.0
    """An actor idle this long (and above min_workers) is retired."""
    shards_per_worker: int = 2
    """Shards in flight per actor (2 keeps the GPU busy across shard boundaries)."""
    max_attempts: int = 3
    """Attempts per shard on actor/node loss before its rows are recorded failed."""
    worker_start_attempts: int = 3
    """Workers whose constructor fails (bad image, no usable GPU, …) before the run gives up
    (exit 4, state failed_to_start). Each retry avoids the nodes where one failed, so one bad
    node is tolerated; once workers run, failures only stop the pool from growing."""
    index_interval_s: float = 30.0
    """Seconds between writes of the ledger index (status/rerun read it instead of results)."""
    ray_num_gpus: int | None = None
    """Logical GPUs for an in-process Ray (default: as many as max_workers need on CPU)."""
    lease_ttl_s: float = 60.0
    """The driver's lease on its job root (<job_root>/lease.json) lasts this long and is
    renewed every third of it; `deblur rerun` / `run --resume` refuse a live lease of another
    driver and take over one a killed driver left once it expires (at most this long)."""

    worker_start_timeout_s: float = 600.0
    """With no worker ready, the run ends (exit 4) once a worker has waited this long to be
    placed, naming the resource no node offers (e.g. GPU: 1). Covers autoscaler time to
    bring up a GPU node; while one worker runs, more waiting for capacity is fine."""
    shard_deadline_floor_s: float = 900.0
    """A shard in flight longer than max(this, shard_deadline_factor x shard_size x the p95
    seconds per image of finished shards) has its actor killed and is retried elsewhere."""
    shard_deadline_factor: float = 10.0
    """Headroom over the measured p95 per-image time (see shard_deadline_floor_s)."""
    shard_deadline_unmeasured_s: float = 7200.0
    """The deadline until a shard of this run has finished (model load, compilation and a
    first shard on a slow device all fit)."""
    isolate_after: int = 2
    """A shard whose worker died this many times (counted in the ledger, across driver
    restarts) is run image by image on a worker of its own; an image that alone kills its
    worker this many times is one failed row (reason worker_crash)."""
    retry_backoff_s: float = 1.0
    """Wait before a shard's retry: this, doubled per attempt, up to retry_backoff_max_s."""
    retry_backoff_max_s: float = 30.0
    """Cap of the retry wait, and of the wait between probes while the store is unreachable
    (dispatch pauses then, and those attempts do not count against the shard)."""

    def validate(self) -> None:
        if self.isolate_after < 1:
            raise ConfigError(f"scheduler.isolate_after={self.isolate_after}: must be >= 1")
        if not 0 <= self.retry_backoff_s <= self.retry_backoff_max_s:
            raise ConfigError(
                f"scheduler.retry_backoff_s={self.retry_backoff_s}: must be >= 0 and at most "
                f"retry_backoff_max_s={self.retry_backoff_max_s}")
        for name in ("worker_start_timeout_s", "shard_deadline_floor_s",
                     "shard_deadline_factor", "shard_deadline_unmeasured_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"scheduler.{name}={getattr(self, name)}: must be > 0")
        if self.min_workers < 0 or self.max_workers < 1:
            raise ConfigError("scheduler: min_workers must be >= 0 and max_workers >= 1")
        if self.min_workers > self.max_workers:
            raise ConfigError(
                f"scheduler.min_workers={self.min_workers} exceeds "
                f"max_workers={self.max_workers}"
            )
        if self.shards_per_worker < 1 or self.max_attempts < 1:
            raise ConfigError("scheduler: shards_per_worker and max_attempts must be >= 1")
        if self.worker_start_attempts < 1:
            raise ConfigError(
                f"scheduler.worker_start_attempts={self.worker_start_attempts}: must be >= 1")
        if self.index_interval_s <= 0:
            raise ConfigError(f"scheduler.index_interval_s={self.index_interval_s}: must be > 0")
        if self.lease_ttl_s <= 0:
            raise ConfigError(f"scheduler.lease_ttl_s={self.lease_ttl_s}: must be > 0")


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus endpoint on the driver and snapshots under the job root."""

    enabled: bool = True
    """Serve /metrics from the driver (snapshots to storage are always written)."""
    host: str = "127.0.0.1"
    """Bind address; 0.0.0.0 on a cluster so Prometheus can scrape the head pod."""
    port: int = 9464
    """Port of /metrics; 0 picks a free one (printed at start)."""
    snapshot_interval_s: float = 30.0
    """Seconds between metric snapshots written to <job_root>/metrics/."""

    def validate(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"metrics.port={self.port}: must be within 0..65535")
        if self.snapshot_interval_s <= 0:
            raise ConfigError(
                f"metrics.snapshot_interval_s={self.snapshot_interval_s}: must be > 0")


@dataclass(frozen=True)
class QualityConfig:
    """Per-image quality figures (pipeline/deblur/observe/quality.py)."""

    sharpness_sample_rate: float = 1.0
    """Share of images that get sharpness figures (deterministic by row); 0 turns them off."""
    seed: int = 0
    """Seed of that sample and of the QA sample in the report."""

    def validate(self) -> None:
        if not 0.0 <= self.sharpness_sample_rate <= 1.0:
            raise ConfigError(f"quality.sharpness_sample_rate={self.sharpness_sample_rate}: "
                              f"must be within 0..1")


SCENE_RASTERISERS = ("auto", "torch", "gsplat")


@dataclass(frozen=True)
class SceneConfig:
    """DeblurGS scene fits (``--model deblurgs``). The schedule, learning rates and
    densification values are 3DGS's (Kerbl et al. 2023), on which DeblurGS builds; the
    DeblurGS-specific ones (sub-frames, the annealing's starting threshold and length, the
    camera-motion learning rates) are our choices, to check against the paper's numbers. A
    CPU run wants far fewer steps (configs/scene-cpu.yaml, docs/benchmarks.md)."""

    steps: int = 30_000
    """Optimisation steps per scene (one view's blurry render per step)."""
    subframes: int = 10
    """Poses sampled along each view's exposure; the blurry render is their renders' mean."""
    min_views: int = 3
    """A scene with fewer views is failed (too_few_views): one view gives no parallax."""
    resolution_scale: float = 1.0
    """Views are fitted at this fraction of their size (0.25: a quarter of each side); the
    sharp outputs are rendered at the full size."""
    ssim_lambda: float = 0.2
    """Loss = (1 - lambda) L1 + lambda D-SSIM, as 3DGS and DeblurGS."""
    densify_from: int = 500
    """First step that may densify: before it only Gaussians and camera motion move."""
    densify_until: int = 15_000
    """Last step that may densify."""
    densify_every: int = 100
    """Steps between densification (clone, split, prune) passes."""
    densify_grad_start: float = 0.002
    """Gaussian Densification Annealing: the screen-space gradient a Gaussian needs to be
    cloned or split starts this high, while the camera motion is still wrong, ..."""
    densify_grad_end: float = 0.0002
    """... and decays log-linearly to this (3DGS's threshold) by ``densify_anneal_until``."""
    densify_anneal_until: int = 7_500
    """Step at which the threshold reaches ``densify_grad_end``."""
    opacity_reset_every: int = 3_000
    """Steps between opacity resets (0: never), as 3DGS."""
    prune_opacity: float = 0.005
    """Gaussians below this opacity are removed at densification."""
    max_gaussians: int = 1_000_000
    """No densification beyond this many Gaussians (bounds memory on small devices)."""
    lr_means: float = 1.6e-4
    """Mean learning rate, times the scene's extent; decays exponentially ..."""
    lr_means_final: float = 1.6e-6
    """... to this at the last step."""
    lr_scales: float = 0.005
    """Log-scale learning rate."""
    lr_quats: float = 0.001
    """Rotation learning rate."""
    lr_opacity: float = 0.05
    """Opacity-logit learning rate."""
    lr_colour: float = 0.0025
    """Colour (SH degree 0) learning rate."""
    lr_pose: float = 1e-3
    """Camera motion (start and end twists) learning rate; decays exponentially ..."""
    lr_pose_final: float = 1e-5
    """... to this at the last step."""
    rasteriser: str = "auto"
    """auto (gsplat on CUDA when installed, ours otherwise), torch (ours), gsplat."""
    seed: int = 0
    """Seeds the view order and the initial motion, so a scene's fit is reproducible."""

    def validate(self) -> None:
        positive = {"steps": self.steps, "subframes": self.subframes,
                    "densify_every": self.densify_every, "max_gaussians": self.max_gaussians}
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"scene.{name}={value}: must be >= 1")
        if self.min_views < 2:
            raise ConfigError(f"scene.min_views={self.min_views}: must be >= 2 (one view "
                              "gives no parallax)")
        if not 0 < self.resolution_scale <= 1:
            raise ConfigError(f"scene.resolution_scale={self.resolution_scale}: must be in "
                              "(0, 1]")
        if not 0 <= self.ssim_lambda <= 1:
            raise ConfigError(f"scene.ssim_lambda={self.ssim_lambda}: must be in [0, 1]")
        if not 0 <= self.densify_from <= self.densify_until:
            raise ConfigError(f"scene.densify_from={self.densify_from} must be >= 0 and <= "
                              f"scene.densify_until={self.densify_until}")
        if not 0 < self.densify_grad_end <= self.densify_grad_start:
            raise ConfigError(f"scene.densify_grad_end={self.densify_grad_end} must be > 0 "
                              f"and <= scene.densify_grad_start={self.densify_grad_start}")
        if self.opacity_reset_every < 0:
            raise ConfigError(f"scene.opacity_reset_every={self.opacity_reset_every}: must be "
                              ">= 0 (0: never)")
        if not 0 <= self.prune_opacity < 1:
            raise ConfigError(f"scene.prune_opacity={self.prune_opacity}: must be in [0, 1)")
        rates = {"lr_means": self.lr_means, "lr_means_final": self.lr_means_final,
                 "lr_scales": self.lr_scales, "lr_quats": self.lr_quats,
                 "lr_opacity": self.lr_opacity, "lr_colour": self.lr_colour,
                 "lr_pose": self.lr_pose, "lr_pose_final": self.lr_pose_final}
        for name, value in rates.items():
            if not value > 0:
                raise ConfigError(f"scene.{name}={value}: must be > 0")
        if self.rasteriser not in SCENE_RASTERISERS:
            raise ConfigError(f"scene.rasteriser={self.rasteriser!r}: choose one of "
                              f"{', '.join(SCENE_RASTERISERS)}")


@dataclass(frozen=True)
class JobConfig:
    """Everything one job needs; stored in job.json for provenance and reruns."""

    source: str = ""
    """Manifest object or prefix/folder to list (s3://… or local)."""
    destination: str = ""
    """Prefix/folder the deblurred images go under."""
    job_root: str | None = None
    """Ledger location; default DEST/_deblur/<job_id>/."""
    shard_size: int = 1000
    """Images per shard (the unit of dispatch, retry and commit)."""
    follow_links: bool = False
    """Local folder sources: read symbolic links that resolve outside the source folder
    (otherwise such a row fails as outside_source). Links inside it are always read."""
    allow_prefixes: tuple[str, ...] = ()
    """Prefixes (s3://… or folders) that absolute/URI manifest entries must lie under; an
    entry elsewhere fails as outside_source. Empty: the manifest's own bucket (S3) or folder
    (local), SOURCE and DESTINATION."""
    overwrite_inputs: bool = False
    """Allow rows whose output is their own input (DEST == SOURCE, or an output_key naming
    the input); each original is kept under <job_root>/originals/ before it is replaced.
    Otherwise such a row fails as would_overwrite_input."""
    plan_tasks: int = 0
    """Plan a manifest of several Parquet files (``…/*.parquet``) as up to this many Ray tasks
    at once, one per file (the same ledger as planning in one process); 0: one process."""
    model: ModelConfig = field(default_factory=ModelConfig)
    codec: CodecConfig = field(default_factory=CodecConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    scene: SceneConfig = field(default_factory=SceneConfig)

    def validate(self) -> JobConfig:
        if self.shard_size < 1:
            raise ConfigError(f"shard_size={self.shard_size}: must be >= 1")
        if self.plan_tasks < 0:
            raise ConfigError(f"plan_tasks={self.plan_tasks}: must be >= 0 (0: plan in one "
                              f"process)")
        if any(not p for p in self.allow_prefixes):
            raise ConfigError("allow_prefixes: an empty prefix would allow everything; name a "
                              "bucket/prefix or folder")
        for section in (self.model, self.codec, self.storage, self.batch, self.worker,
                        self.scheduler, self.metrics, self.quality, self.scene):
            section.validate()
        # Rules across sections: each would otherwise fail on every worker after Ray started.
        if self.model.name == SCENE_MODEL and self.plan_tasks:
            raise ConfigError(f"plan_tasks={self.plan_tasks}: a scene job plans one shard per "
                              "scene in one process; set plan_tasks: 0")
        if self.codec.backend == "nvjpeg" and self.model.device == "cpu":
            raise ConfigError("codec.backend=nvjpeg decodes on the GPU but model.device=cpu: "
                              "choose codec.backend auto or pillow, or model.device auto/cuda")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML types only (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check a YAML scalar against a field's annotation (ints may stand for floats)."""
    hint = typing.get_origin(annotation)
    if hint is tuple:  # a YAML/JSON list of items of one type, e.g. tuple[str, ...]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={value!r}: expected a list")
        item = typing.get_args(annotation)[0]
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    allowed = typing.get_args(annotation) if hint in (typing.Union, types.UnionType) else (
        annotation,)
    if value is None and type(None) in allowed:
        return None
    for kind in allowed:
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind in (str, bool) and isinstance(value, kind):
            return value
    names = " or ".join(getattr(k, "__name__", str(k)) for k in allowed)
    raise ConfigError(f"{where}={value!r}: expected {names}")


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        path = f"{where}.{name}" if where else name
        if name not in known:
            raise ConfigError(f"unknown config key {path!r}; valid keys: {sorted(known)}")
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, path)
        else:
            kwargs[name] = _coerce(value, hint, path)
    return cls(**kwargs)


def from_dict(data: dict[str, Any]) -> JobConfig:
    """Build a JobConfig from nested plain data (YAML or job.json), rejecting unknown keys."""
    return _build(JobConfig, data, "")


def load(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> JobConfig:
    """Defaults, then the YAML file at ``path``, then ``overrides`` (dotted keys), validated.

    Args:
        path: a YAML job config, or None for defaults only.
        overrides: ``{"batch.max_batch": 8, "source": "s3://…"}``; None values are ignored so
            unset CLI flags do not clobber the file.
    """
    import yaml

    data: dict[str, Any] = {}
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror}") from exc
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from exc
    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return from_dict(data).validate()

