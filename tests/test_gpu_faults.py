"""GPU faults without a GPU: out of memory is retried smaller, a device fault or a dead engine
thread fails the worker (never its images), all injected on the CPU through fake forwards.

The Ray side (the actor exits and its shard is retried elsewhere) is in
tests/integration/test_hangs.py.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from deblur.config import JobConfig, ModelConfig
from deblur.errors import DeviceFaultError, WorkerUnhealthyError
from deblur.io.storage import Storage
from deblur.run.engine import Engine, is_device_fault, is_out_of_memory
from deblur.run.inference import Deblurrer
from deblur.run.worker import ShardProcessor
from tests.conftest import identity, image_bytes, job_config, make_job, noise

WAIT_S = 30.0
ILLEGAL_ADDRESS = "CUDA error: an illegal memory access was encountered"


@dataclass(eq=False)
class Img:
    pixels: np.ndarray
    name: str = ""


class Outcomes:
    """What the engine called back with, and an event per expected count."""

    def __init__(self, expected: int) -> None:
        self.ok: list[tuple[Img, np.ndarray]] = []
        self.errors: list[tuple[Img, Exception]] = []
        self.aborted: list[tuple[Img, BaseException]] = []
        self.expected = expected
        self.done = threading.Event()
        self.lock = threading.Lock()

    def _note(self) -> None:
        if len(self.ok) + len(self.errors) + len(self.aborted) >= self.expected:
            self.done.set()

    def on_output(self, item: Img, output: np.ndarray, ms: float) -> None:
        with self.lock:
            self.ok.append((item, output))
            self._note()

    def on_error(self, item: Img, exc: Exception) -> None:
        with self.lock:
            self.errors.append((item, exc))
            self._note()

    def on_abort(self, item: Img, exc: BaseException) -> None:
        with self.lock:
            self.aborted.append((item, exc))
            self._note()


def _config(**overrides: object) -> JobConfig:
    # A long max_wait: a batch closes only when the submitter says nothing more is coming.
    return job_config("/in", "/out", **{"batch.max_wait_ms": 60_000, **overrides})


def _feed(engine: Engine, items: list[Img]) -> None:
    engine.expect(len(items))
    for item in items:
        engine.submit(item)


def _items(count: int, size: tuple[int, int] = (32, 32)) -> list[Img]:
    return [Img(noise(size[1], size[0], i), f"img{i}") for i in range(count)]


def test_oom_and_fault_classification() -> None:
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert is_out_of_memory(MemoryError())
    assert not is_device_fault(RuntimeError("CUDA error: out of memory"))
    for text in (ILLEGAL_ADDRESS, "CUDA error: device-side assert triggered",
                 "CUDA error: uncorrectable ECC error encountered"):
        assert is_device_fault(RuntimeError(text)) and not is_out_of_memory(RuntimeError(text))
    assert not is_device_fault(ValueError("bad pixels"))


# -- the watchdog --------------------------------------------------------------------------

def test_a_device_fault_kills_the_engine_and_fails_every_item_it_holds() -> None:
    calls: list[int] = []

    def faulty(images: list[np.ndarray], shape: tuple[int, int] | None) -> list[np.ndarray]:
        calls.append(len(images))
        raise RuntimeError(ILLEGAL_ADDRESS)

    outcomes = Outcomes(expected=5)
    engine: Engine[Img] = Engine(faulty, _config(), outcomes.on_output, outcomes.on_error,
                                 on_abort=outcomes.on_abort)
    _feed(engine, _items(5))
    assert outcomes.done.wait(WAIT_S), "items left unresolved after the engine thread died"
    assert len(outcomes.aborted) == 5 and not outcomes.errors and not outcomes.ok
    assert calls == [5], "a device fault must not be retried image by image"
    assert not engine.healthy and isinstance(engine.fatal, DeviceFaultError)
    assert "illegal memory access" in str(engine.fatal)
    # Later submissions do not block or vanish: they are aborted at once.
    late = Outcomes(expected=1)
    engine._on_abort = late.on_abort
    _feed(engine, _items(1))
    assert late.done.is_set() and len(late.aborted) == 1


def test_a_bug_in_the_engine_thread_fails_the_held_items_instead_of_hanging() -> None:
    outcomes = Outcomes(expected=3)

    def broken_output(item: Img, output: np.ndarray, ms: float) -> None:
        raise ValueError("a bug downstream of the model")

    engine: Engine[Img] = Engine(identity, _config(), broken_output, outcomes.on_error,
                                 on_abort=outcomes.on_abort)
    _feed(engine, _items(3))
    assert outcomes.done.wait(WAIT_S), "items left unresolved after the engine thread died"
    assert len(outcomes.aborted) == 3
    assert isinstance(engine.fatal, ValueError) and not engine.healthy


def test_a_device_fault_fails_the_shard_and_commits_nothing(tmp_path: Path) -> None:
    files = {f"{i}.png": image_bytes(noise(24, 24, i), "PNG") for i in range(6)}
    ledger = make_job(str(tmp_path), files, **{"worker.io_threads": 2})

    def faulty(images: list[np.ndarray], shape: tuple[int, int] | None) -> list[np.ndarray]:
        raise RuntimeError(ILLEGAL_ADDRESS)

    processor = ShardProcessor(ledger.config(), faulty, "w0", Storage())
    with pytest.raises(WorkerUnhealthyError, match="illegal memory access"):
        processor.process(ledger.job_root, 0, 1)
    assert ledger.read_result(0) is None, "a device fault must not commit failed rows"
    assert processor.unhealthy and "DeviceFaultError" in processor.unhealthy
    with pytest.raises(WorkerUnhealthyError):  # nothing more runs on this worker
        processor.process(ledger.job_root, 0, 2)
    assert processor.buffer.used == 0, "aborted images must give their bytes back"


# -- out of memory -------------------------------------------------------------------------

def test_oom_splits_the_batch_in_halves_down_to_single_images() -> None:
    sizes: list[int] = []

    def small_batches_only(images: list[np.ndarray], shape: tuple[int, int] | None
                           ) -> list[np.ndarray]:
        sizes.append(len(images))
        if len(images) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return identity(images, shape)

    outcomes = Outcomes(expected=7)
    engine: Engine[Img] = Engine(small_batches_only, _config(), outcomes.on_output,
                                 outcomes.on_error)
    items = _items(7)
    _feed(engine, items)
    assert outcomes.done.wait(WAIT_S)
    assert not outcomes.errors and len(outcomes.ok) == 7
    for item, output in outcomes.ok:
        assert np.array_equal(item.pixels, output)
    assert sizes[0] == 7 and sizes.count(1) == 7
    assert sizes == [7, 3, 1, 2, 1, 1, 4, 2, 1, 1, 2, 1, 1], sizes  # halves, depth first
    assert engine.oom_retries == 6 and engine.healthy


class OomNet(nn.Module):
    """Identity 'network' that runs out of memory on batches or on passes over ``limit``."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.limit = limit
        self.passes: list[tuple[int, int, int]] = []

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        b, _, h, w = x.shape
        if b > 1 or h * w > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        self.passes.append((b, h, w))
        return [x, x, x * self.scale]


def test_oom_on_a_single_image_retries_it_tiled_with_smaller_tiles(tmp_path: Path) -> None:
    net = OomNet(limit=20_000)  # a 256x256 image (65,536 px) only fits in 128x128 tiles
    deblurrer = Deblurrer(net, ModelConfig(random_weights=True, device="cpu"))
    files = {f"{i}.png": image_bytes(noise(256, 256, i), "PNG") for i in range(3)}
    ledger = make_job(str(tmp_path), files, **{"worker.io_threads": 2})
    processor = ShardProcessor(ledger.config(), deblurrer.deblur, "w0", Storage(),
                               infer_tiled=deblurrer.deblur_tiled)
    report = processor.process(ledger.job_root, 0, 1)
    assert report["ok"] == 3, ledger.read_result(0).to_pylist()
    assert net.passes and all(b * h * w <= 20_000 for b, h, w in net.passes)
    assert processor.engine.oom_retries >= 3
    from PIL import Image

    for row in ledger.read_result(0).to_pylist():
        out = np.asarray(Image.open(row["output_key"]).convert("RGB")).astype(int)
        src = np.asarray(Image.open(row["key"]).convert("RGB")).astype(int)
        assert np.abs(out - src).max() <= 1  # identity tiles blend back to the image


def test_oom_at_every_size_is_one_failed_row_only(tmp_path: Path) -> None:
    net = OomNet(limit=0)
    deblurrer = Deblurrer(net, ModelConfig(random_weights=True, device="cpu"))
    files = {"a.png": image_bytes(noise(256, 256, 0), "PNG")}
    ledger = make_job(str(tmp_path), files, **{"worker.io_threads": 1})
    processor = ShardProcessor(ledger.config(), deblurrer.deblur, "w0", Storage(),
                               infer_tiled=deblurrer.deblur_tiled)
    processor.process(ledger.job_root, 0, 1)
    [row] = ledger.read_result(0).to_pylist()
    assert row["status"] == "failed" and row["reason"] == "inference_failed"
    assert "out of memory even alone and in tiles" in row["error"] and "a.png" in row["error"]
    assert processor.unhealthy is None  # out of memory is not a reason to drop the worker
