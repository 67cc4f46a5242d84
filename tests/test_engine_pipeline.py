"""The engine queues batch k+1 on the device before collecting batch k (``launch``), so a GPU
goes from one batch to the next while the host unpacks and packs. Checked on the CPU with a
fake launch that records the order of events, and with the real Deblurrer's launch/collect
against its synchronous path."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from deblur.config import ModelConfig
from deblur.model.weights import load_model
from deblur.run.engine import Engine
from deblur.run.inference import Deblurrer
from tests.conftest import noise
from tests.test_gpu_faults import WAIT_S, Img, Outcomes, _config, _feed, _items


class RecordingLaunch:
    """launch(images) -> collect; both noted in ``events`` in the order they happen."""

    def __init__(self, fail_collect_of: int | None = None) -> None:
        self.events: list[str] = []
        self.launched = 0
        self.fail_collect_of = fail_collect_of
        self.lock = threading.Lock()

    def __call__(self, images: list[np.ndarray], shape: tuple[int, int] | None):
        with self.lock:
            self.launched += 1
            number = self.launched
            self.events.append(f"launch {number} ({len(images)})")

        def collect() -> list[np.ndarray]:
            with self.lock:
                self.events.append(f"collect {number}")
            if number == self.fail_collect_of and len(images) > 1:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected at collect)")
            return [img + 1 for img in images]

        return collect


def _infer(images: list[np.ndarray], shape: tuple[int, int] | None) -> list[np.ndarray]:
    return [img + 1 for img in images]


def test_the_next_batch_is_queued_before_the_last_one_is_collected() -> None:
    items = _items(8)
    outcomes = Outcomes(len(items))
    launch = RecordingLaunch()
    engine = Engine(_infer, _config(**{"batch.max_batch": 2}), outcomes.on_output,
                    outcomes.on_error, launch=launch)
    _feed(engine, items)
    assert outcomes.done.wait(WAIT_S)
    assert not outcomes.errors
    # Every output is the launch's, in submission order (batches are collected in order).
    assert [item.name for item, _ in outcomes.ok] == [item.name for item in items]
    for item, output in outcomes.ok:
        assert np.array_equal(output, item.pixels + 1)
    events = launch.events
    assert launch.launched == 4
    for number in (1, 2, 3):  # batch k+1 went to the device before batch k was waited for
        assert events.index(f"launch {number + 1} (2)") < events.index(f"collect {number}")
    assert events[-1] == "collect 4"  # the last batch is collected without a successor
    _, busy, _ = engine.drain_stats()
    assert busy >= 0.0


def test_a_lone_batch_is_collected_without_waiting_for_another() -> None:
    """With nothing queued behind it, an in-flight batch is collected at once (no deadlock)."""
    items = _items(3)
    outcomes = Outcomes(len(items))
    launch = RecordingLaunch()
    engine = Engine(_infer, _config(**{"batch.max_batch": 8}), outcomes.on_output,
                    outcomes.on_error, launch=launch)
    _feed(engine, items)
    assert outcomes.done.wait(WAIT_S)
    assert launch.events == ["launch 1 (3)", "collect 1"]


def test_a_fault_seen_at_collect_is_handled_like_one_at_launch() -> None:
    """Out of memory surfacing when the batch is awaited: the batch is split, nothing lost."""
    items = _items(4)
    outcomes = Outcomes(len(items))
    launch = RecordingLaunch(fail_collect_of=1)
    engine = Engine(_infer, _config(**{"batch.max_batch": 4}), outcomes.on_output,
                    outcomes.on_error, launch=launch)
    _feed(engine, items)
    assert outcomes.done.wait(WAIT_S)
    assert not outcomes.errors and len(outcomes.ok) == 4
    assert engine.oom_retries == 1
    for item, output in outcomes.ok:
        assert np.array_equal(output, item.pixels + 1)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])])
def test_deblurrer_launch_collects_what_deblur_returns(device: str) -> None:
    """Two batches in flight at once (alternating host buffers) give the synchronous outputs.

    On CUDA the second batch is packed while the first one's upload may still be queued: one
    shared host buffer would hand the first batch the second's pixels."""
    torch.manual_seed(0)
    config = ModelConfig(random_weights=True, compile="off", device=device)
    deblurrer = Deblurrer(load_model(config), config)
    first = [noise(24, 16, i) for i in range(3)]
    second = [noise(24, 16, 10 + i) for i in range(3)]  # same shape: same buffer pair
    expected = deblurrer.deblur(first) + deblurrer.deblur(second)
    collect_first = deblurrer.launch(first)
    collect_second = deblurrer.launch(second)
    got = collect_first() + collect_second()
    for want, have in zip(expected, got):
        assert np.array_equal(want, have)
