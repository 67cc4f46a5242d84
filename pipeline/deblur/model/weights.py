"""Load model weights from a URI, safely, and record their digest for provenance.

Accepted files:
- the authors' format: ``torch.save({'model': state_dict, ...})`` as .pkl or .pth (their
  training checkpoints also carry 'optimizer', 'epoch', … which are ignored), fp32 or fp16;
- a bare state_dict saved with ``torch.save``;
- safetensors (``.safetensors``), when the ``safetensors`` package is installed.

Pickles are read with ``torch.load(weights_only=True)`` only: a checkpoint that needs arbitrary
objects is refused, never retried with ``weights_only=False`` (that would run its code).

Memory: a checkpoint is never held as one bytes object. ``fetch`` hashes a local file in chunks
where it lies, or streams an s3:// object in ranged chunks into a temporary file, hashing as it
goes, once per process (the driver's provenance check and its load share it); the tensors are
then memory-mapped from that file (zip checkpoints, safetensors), so loading costs the model's
parameters once, not the file twice (a 3 GB file used to cost 7 GB).
"""

from __future__ import annotations

import atexit
import hashlib
import os
import tempfile
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from deblur.config import SCENE_MODEL
from deblur.errors import StorageError, WeightsError
from deblur.model import MODELS, create_model

if TYPE_CHECKING:
    from deblur.config import ModelConfig


_TORCH_MAGIC = (b"PK\x03\x04", b"\x80")
"""How torch.save output starts: a zip archive (torch >= 1.6), or a pickle (protocol 2+)."""


def read_bytes(uri: str) -> bytes:
    """Fetch the checkpoint through the project's storage layer (local, file://, s3://)."""
    from deblur.io.storage import get_storage

    try:
        return get_storage().get(uri)
    except StorageError as exc:
        raise WeightsError(f"cannot read weights {uri!r}: {exc}") from exc


CHUNK_BYTES = 4 << 20
"""How much of a checkpoint is read (and hashed) at a time."""

_FETCHED: dict[tuple[str, int, Any], tuple[str, str]] = {}
"""(uri, size, mtime or ETag) -> (local file, sha256): what this process has read. The size
and version are in the key so a file replaced under the same name is read again."""
_FETCH_LOCK = threading.Lock()


def fetch(uri: str) -> tuple[str, str]:
    """A local file holding the checkpoint at ``uri`` and its sha256, read once per process.

    A local path (or file://) is hashed in chunks where it lies; an s3:// object is streamed in
    ranged chunks into a temporary file (removed when the process exits), hashed on the way.
    """
    from deblur.io.storage import get_storage, is_s3, to_local_path

    with _FETCH_LOCK:
        try:
            if not is_s3(uri):
                path = to_local_path(uri)
                stat = os.stat(path)
                key: tuple[str, int, Any] = (uri, stat.st_size, stat.st_mtime_ns)
                if key not in _FETCHED:
                    _FETCHED[key] = (path, _hash_file(path))
                return _FETCHED[key]
            storage = get_storage()
            info = storage.head(uri)
            key = (uri, info.size, info.etag or info.mtime)
            known = _FETCHED.get(key)
            if known is not None and os.path.exists(known[0]):
                return known
            digest = hashlib.sha256()
            suffix = os.path.splitext(uri)[1][:16]
            fd, path = tempfile.mkstemp(prefix="deblur-weights-", suffix=suffix)
            atexit.register(_remove, path)
            with os.fdopen(fd, "wb") as f:
                for start in range(0, info.size, CHUNK_BYTES):
                    chunk = storage.get_range(uri, min(CHUNK_BYTES, info.size - start), start)
                    digest.update(chunk)
                    f.write(chunk)
        except (StorageError, OSError) as exc:
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise WeightsError(f"cannot read weights {uri!r}: {detail}") from exc
        _FETCHED[key] = (path, digest.hexdigest())
        return _FETCHED[key]


def _hash_file(path: str) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(CHUNK_BYTES)  # one reused buffer: the read costs one chunk of memory
    view = memoryview(buffer)
    with open(path, "rb") as f:
        while count := f.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def read_state_dict(uri: str) -> tuple[dict[str, torch.Tensor], str]:
    """(the checkpoint's flat {name: tensor} dict, its sha256), tensors mapped from the file
    ``fetch`` left, so no copy of the file's bytes is held in memory."""
    path, digest = fetch(uri)
    with open(path, "rb") as f:
        head = f.read(512)
    if uri.endswith(".safetensors") or head[8:10] == b'{"':
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise WeightsError(
                f"weights {uri!r} are safetensors but the safetensors package is not "
                f"installed: pip install 'deblur[safetensors]'") from exc
        try:
            return load_file(path), digest
        except Exception as exc:
            raise WeightsError(f"weights {uri!r} are not valid safetensors: {exc}") from exc
    if not head.startswith(_TORCH_MAGIC):
        from deblur.io.codec import sniff

        raise WeightsError(f"weights {uri!r} are not a PyTorch checkpoint or safetensors file "
                           f"({os.path.getsize(path)} bytes, {sniff(head)}); give the .pkl/.pth "
                           f"that torch.save wrote, or a .safetensors file")
    try:
        # mmap: tensors point into the file's pages instead of being read into new memory
        # (zip checkpoints only; a legacy pickle is read from the file as it goes).
        obj = torch.load(path, map_location="cpu", weights_only=True,
                         mmap=head.startswith(b"PK"))
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
    return dict(obj), digest


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
    """Model name and the weights' sha256, as job.json records them, after checking that the
    weights load strictly into the model on the CPU.

    The driver calls this before Ray starts and before anything is written, so a wrong file
    or model name fails in seconds with one line (WeightsError / ModelError) instead of on
    every worker. The file is read once per process (``fetch``: hashed as it streams, tensors
    memory-mapped from it), so the weights are never held twice.
    """
    if config.name == SCENE_MODEL:  # a scene job fits its own model per scene: no weights
        return {"name": config.name, "weights": None, "weights_sha256": None,
                "random_weights": False}
    if config.name not in MODELS:
        create_model(config.name)  # raises the ModelError naming the valid ones
    if config.random_weights:
        return {"name": config.name, "weights": None, "weights_sha256": None,
                "random_weights": True}
    uri = config.weights or ""
    state_dict, digest = read_state_dict(uri)  # streamed and hashed once, tensors mapped
    model = create_model(config.name)
    check_compatible(model, state_dict, config.name, uri)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:  # e.g. a dtype copy_ cannot do; check_compatible saw the keys
        raise WeightsError(f"weights {uri!r} do not load into model {config.name!r}: "
                           f"{str(exc).splitlines()[0]}") from None
    del model, state_dict
    return {"name": config.name, "weights": uri, "weights_sha256": digest,
            "random_weights": False}


def load_model(config: ModelConfig) -> nn.Module:
    """The configured network with its weights (or random ones, only when asked for)."""
    model = create_model(config.name)
    if not config.random_weights:
        assert config.weights, "ModelConfig.validate() requires weights or random_weights"
        load_weights(model, config.weights, config.name)
    return model


def load_weights(model: nn.Module, uri: str, model_name: str) -> str:
    """Load ``uri`` into ``model`` strictly (fp16 checkpoints are cast to the model's dtype).

    Returns the sha256 of the bytes loaded (hashed as they were read: ``fetch``).
    """
    state_dict, digest = read_state_dict(uri)
    check_compatible(model, state_dict, model_name, uri)
    model.load_state_dict(state_dict, strict=True)  # copy_ casts fp16 tensors to fp32 params
    return digest
