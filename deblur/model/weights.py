"""Load model weights from a URI, safely, and record their digest for provenance.

Accepted files:
- the authors' format: ``torch.save({'model': state_dict, ...})`` as .pkl or .pth (their
  training checkpoints also carry 'optimizer', 'epoch', … which are ignored), fp32 or fp16;
- a bare state_dict saved with ``torch.save``;
- safetensors (``.safetensors``), when the ``safetensors`` package is installed.

Pickles are read with ``torch.load(weights_only=True)`` only: a checkpoint that needs arbitrary
objects is refused, never retried with ``weights_only=False`` (that would run its code).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from deblur.errors import StorageError, WeightsError

if TYPE_CHECKING:
    from deblur.config import ModelConfig


def read_bytes(uri: str) -> bytes:
    """Fetch the checkpoint through the project's storage layer (local, file://, s3://)."""
    from deblur.io.storage import get_storage

    try:
        return get_storage().get(uri)
    except StorageError as exc:
        raise WeightsError(f"cannot read weights {uri!r}: {exc}") from exc


def parse_state_dict(data: bytes, uri: str) -> dict[str, torch.Tensor]:
    """Bytes of a checkpoint -> a flat {name: tensor} dict, without running pickled code."""
    # safetensors: an 8-byte little-endian header length, then a JSON header.
    if uri.endswith(".safetensors") or data[8:10] == b'{"':
        return _parse_safetensors(data, uri)
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, …
        raise WeightsError(
            f"cannot load weights {uri!r} safely ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); only tensors and plain "
            f"containers are accepted (torch.load weights_only=True). Re-save the checkpoint as "
            f"{{'model': model.state_dict()}} or as .safetensors"
        ) from exc
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]  # the authors' {'model': sd, 'optimizer': …, 'epoch': …}
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(
            f"weights {uri!r} hold no state_dict: expected {{'model': state_dict}} or a "
            f"state_dict of tensors, found {type(obj).__name__}"
        )
    return dict(obj)


def _parse_safetensors(data: bytes, uri: str) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load as load_safetensors
    except ImportError as exc:
        raise WeightsError(
            f"weights {uri!r} are safetensors but the safetensors package is not installed: "
            f"pip install 'deblur[safetensors]'"
        ) from exc
    try:
        return load_safetensors(data)
    except Exception as exc:
        raise WeightsError(f"weights {uri!r} are not valid safetensors: {exc}") from exc


def check_compatible(model: nn.Module, state_dict: Mapping[str, torch.Tensor], model_name: str,
                     uri: str) -> None:
    """Raise a WeightsError naming missing/unexpected keys and shape mismatches."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    if not (missing or unexpected or shapes):
        return
    parts = [f"weights {uri!r} do not fit model {model_name!r}"]
    for label, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                        ("shape mismatches", shapes)):
        if keys:
            shown = ", ".join(keys[:8]) + (f", … ({len(keys)} in all)" if len(keys) > 8 else "")
            parts.append(f"{label}: {shown}")
    if any(k.startswith("module.") for k in unexpected):
        parts.append("hint: strip the 'module.' prefix DataParallel adds")
    raise WeightsError("; ".join(parts))


def provenance(config: ModelConfig) -> dict[str, Any]:
    """Model name and the weights' sha256, as job.json records them (read once by the driver)."""
    if config.random_weights:
        return {"name": config.name, "weights": None, "weights_sha256": None,
                "random_weights": True}
    digest = hashlib.sha256(read_bytes(config.weights or "")).hexdigest()
    return {"name": config.name, "weights": config.weights, "weights_sha256": digest,
            "random_weights": False}


def load_weights(model: nn.Module, uri: str, model_name: str) -> str:
    """Load ``uri`` into ``model`` strictly (fp16 checkpoints are cast to the model's dtype).

    Returns the sha256 of the bytes loaded.
    """
    data = read_bytes(uri)
    state_dict = parse_state_dict(data, uri)
    check_compatible(model, state_dict, model_name, uri)
    model.load_state_dict(state_dict, strict=True)  # copy_ casts fp16 tensors to fp32 params
    return hashlib.sha256(data).hexdigest()
