"""Which ``Codec`` an actor uses: Pillow in-process, Pillow in worker processes, or nvJPEG.

``make_codec`` picks once per actor and logs one line saying what runs and why not nvJPEG.
Its own module, above both ``io/codec.py`` and ``io/nvjpeg.py``: the nvJPEG backend builds on
the Pillow codec's functions, so the choice between them cannot live in either.
"""

from __future__ import annotations

import logging
import os

from deblur.config import CodecConfig
from deblur.errors import ConfigError, one_line
from deblur.io.codec import Codec, PillowCodec, PillowProcessCodec

log = logging.getLogger("deblur.io.codec_choice")


def pool_processes(config: CodecConfig, cuda: bool, cpus: float) -> int:
    """How many Pillow processes an actor with ``cpus`` CPUs runs (``codec.processes``).

    Auto (None): with the model on CUDA and at least 3 CPUs, all but one of them (capped at the
    machine's cores). The one left is the actor's own: its engine thread feeds the GPU, its
    fetch/upload threads and the pickling of pixels to and from the pool all share one GIL.
    With 1-2 CPUs a pool would be a single process doing the same serial work as in-process,
    plus a copy of every image through a pipe and another process's memory: 0 (in-process).
    On a CPU model: 0, since the network is the bottleneck by orders of magnitude and already
    uses every reserved core (torch.set_num_threads(cpus_per_worker)); processes would only
    take cores from it.
    """
    if config.processes is not None:
        return config.processes
    if not cuda:
        return 0
    cores = min(int(cpus), os.cpu_count() or 1)
    return cores - 1 if cores >= 3 else 0


def _cuda_unavailable(device: str) -> str | None:
    """Why the model (and so the codec) will not be on CUDA, or None when it will."""
    if device == "cpu":
        return "model.device=cpu"
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return "torch is not importable"
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


def make_codec(config: CodecConfig, device: str = "auto", cpus: float = 1.0) -> Codec:
    """The codec backend for an actor whose model runs on ``device`` (model.device: auto, cpu
    or cuda) with ``cpus`` reserved CPUs. Logs one line: what runs, and why not nvJPEG.

    nvJPEG (``deblur.io.nvjpeg``) is tried only with CUDA present and ``codec.backend`` not
    ``pillow``; torchvision is imported only then. Its Pillow fallback (and the backend when
    nvJPEG is not used) runs in-process or in a pool per ``pool_processes``. With
    ``codec.backend=nvjpeg`` and no nvJPEG, raises ``ConfigError``.
    """
    unavailable = _cuda_unavailable(device)
    processes = pool_processes(config, unavailable is None, cpus)
    pillow: Codec = PillowCodec(config)
    if processes:
        try:
            pillow = PillowProcessCodec(config, processes)
        except Exception as exc:  # noqa: BLE001 - e.g. the parent's __main__ cannot be imported
            log.error("codec: cannot start %d Pillow processes (%s: %s); decoding in-process",
                      processes, type(exc).__name__, one_line(exc))
    if config.backend == "pillow":
        reason = "codec.backend=pillow"
    elif unavailable is not None:
        reason = unavailable
    else:
        try:
            from deblur.io.nvjpeg import NvJpegCodec

            gpu = NvJpegCodec(config, pillow)
        except ModuleNotFoundError as exc:
            reason = (f"{exc.name} is not installed: install the torchvision build that matches "
                      f"your torch (docs/deploy.md)")
        except Exception as exc:  # noqa: BLE001 - a broken install, an nvJPEG self-test failure
            reason = f"nvJPEG is not usable: {type(exc).__name__}: {one_line(exc)}"
        else:
            log.info("codec: %s", gpu.name)
            return gpu
    if config.backend == "nvjpeg":
        pillow.close()
        raise ConfigError(f"codec.backend=nvjpeg, but nvJPEG cannot run here: {reason}")
    log.info("codec: %s (not nvJPEG: %s)", pillow.name, reason)
    return pillow
