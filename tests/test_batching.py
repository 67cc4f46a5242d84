"""Dynamic batching alone: buckets, max batch, pixel budget, max wait, tiling, flush."""

from __future__ import annotations

import pytest

from deblur.run.batcher import DynamicBatcher, bucket_shape
from deblur.config import BatchConfig


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _batcher(clock: Clock, tile_pixels: int = 4_000_000, **kw: object) -> DynamicBatcher[str]:
    cfg = BatchConfig(**{"max_batch": 4, "pixel_budget": 10_000_000, "max_wait_ms": 50,
                         "bucket_multiple": 16, **kw})  # type: ignore[arg-type]
    return DynamicBatcher(cfg, tile_pixels=tile_pixels, clock=clock)


def test_close_at_max_batch_and_group_by_bucket_and_dtype() -> None:
    b = _batcher(Clock())
    assert b.add("a", 719, 1279, "uint8") == []
    assert b.add("b", 720, 1280, "uint8") == []  # same 720x1280 bucket
    assert b.add("c", 720, 1280, "uint16") == []  # other dtype: other batch
    assert b.add("d", 100, 100, "uint8") == []  # other shape
    assert b.add("e", 710, 1270, "uint8") == []
    [batch] = b.add("f", 720, 1280, "uint8")
    assert batch.items == ["a", "b", "e", "f"] and batch.shape == (720, 1280)
    assert batch.closed_reason == "full" and len(b) == 2


def test_pixel_budget_limits_big_images() -> None:
    b = _batcher(Clock(), tile_pixels=50_000_000, max_batch=64, pixel_budget=30_000_000)
    closed = []
    for i in range(5):  # 12 MP photos: two fit the budget
        closed += b.add(f"big{i}", 3000, 4000, "uint8")
    assert [len(x.items) for x in closed] == [2, 2]
    assert all(x.closed_reason == "pixel_budget" for x in closed)
    assert all(x.padded_pixels <= 30_000_000 for x in closed)
    small = []
    for i in range(64):  # thumbnails: max_batch applies
        small += b.add(f"t{i}", 64, 64, "uint8")
    assert [len(x.items) for x in small] == [64]


def test_single_image_over_budget_still_runs_alone() -> None:
    b = _batcher(Clock(), pixel_budget=1_000_000, tile_pixels=4_000_000)
    [batch] = b.add("x", 1500, 1500, "uint8")
    assert batch.items == ["x"] and not batch.tiled


def test_max_wait_closes_partial_batches_oldest_first() -> None:
    clock = Clock()
    b = _batcher(clock)
    b.add("a", 32, 32, "uint8")
    clock.now += 0.02
    b.add("b", 64, 64, "uint8")
    assert b.next_deadline() == pytest.approx(100.05)
    assert b.poll() == []
    clock.now = 100.051
    [first] = b.poll()
    assert first.items == ["a"] and first.closed_reason == "max_wait"
    clock.now = 100.071
    [second] = b.poll()
    assert second.items == ["b"] and b.next_deadline() is None


def test_oversized_images_go_to_tiling_immediately() -> None:
    b = _batcher(Clock())
    [batch] = b.add("huge", 4000, 6000, "uint8")
    assert batch.tiled and batch.shape == (4000, 6000) and len(b) == 0


def test_flush_returns_everything() -> None:
    b = _batcher(Clock())
    for i, size in enumerate([16, 32, 32, 48]):
        b.add(str(i), size, size, "uint8")
    flushed = b.flush()
    assert sorted(x for batch in flushed for x in batch.items) == ["0", "1", "2", "3"]
    assert len(b) == 0 and b.flush() == []


def test_bucket_shape() -> None:
    assert bucket_shape(719, 1279, 16) == (720, 1280)
    assert bucket_shape(1, 1, 4) == (4, 4)
