"""The GPU's own utilisation, from NVML, for ``deblur_gpu_utilization_ratio``.

The engine's busy share (``deblur_engine_busy_ratio``) says how long the model ran, not how
busy the device was: another process on the same GPU, or kernels that leave SMs idle, make the
two differ. NVML's figure is the share of its last sample period (1/6 s to 1 s, set by the
driver) during which a kernel ran, read when a shard ends.

``pynvml`` comes from the ``nvidia-ml-py`` package (the ``gpu`` extra). It is imported only in
a process where CUDA is already initialised (the worker's model put it there), so a CPU worker
or one without the package just reports nothing: the series is absent, never an error.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

log = logging.getLogger("deblur.observe.gpu")

# One per process: the NVML handle of this process's device, or False once it proved
# unavailable (no package, no driver library), so a worker does not retry on every shard.
_handle: Any = None


def _cuda_in_use() -> bool:
    # Looks torch up instead of importing it (the pipeline-overhead bench has no model).
    torch = sys.modules.get("torch")
    return torch is not None and bool(torch.cuda.is_initialized())


def _device_handle(pynvml: Any) -> Any:
    """NVML enumerates every GPU of the node, whatever CUDA_VISIBLE_DEVICES says (Ray sets it
    per actor): map this process's CUDA device through it, by index or by UUID."""
    import torch

    pynvml.nvmlInit()
    index = torch.cuda.current_device()
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")
               if v.strip()]
    name = visible[index] if index < len(visible) else str(index)
    if name.isdigit():
        return pynvml.nvmlDeviceGetHandleByIndex(int(name))
    return pynvml.nvmlDeviceGetHandleByUUID(name)


def device_utilization() -> float | None:
    """This process's GPU utilisation in [0, 1], or None where it cannot be read."""
    global _handle
    if _handle is False or not _cuda_in_use():
        return None
    try:
        import pynvml

        if _handle is None:
            _handle = _device_handle(pynvml)
        return min(1.0, pynvml.nvmlDeviceGetUtilizationRates(_handle).gpu / 100.0)
    except Exception as exc:  # noqa: BLE001 - ImportError, NVMLError: a missing figure only
        log.info("GPU utilisation not reported (NVML unavailable: %s)", exc)
        _handle = False
        return None
