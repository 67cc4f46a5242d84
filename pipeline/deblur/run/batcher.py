"""Dynamic batching: group decoded images by padded shape into batches for one forward pass.

An image's bucket is its size rounded up to ``bucket_multiple`` (so 1279x719 and 1280x720 share
one), plus its dtype. A bucket's batch closes when it holds ``max_batch`` images, when one more
image would exceed ``pixel_budget`` padded pixels (a batch of 12 MP photos closes at one or
two where 64 thumbnails fit), or when its oldest image has waited ``max_wait_ms``. Images whose
*padded* pass (their bucket shape) would be over ``tile_pixels`` never wait: they go alone,
marked for tiled inference. Padded, not raw: a 1 x 1,000,000 strip has a million pixels but
its pass is at least 4 x 1,000,000 (the network's multiple), and more with a coarser bucket.

No threads and no Ray here: the caller (the worker's engine thread) calls ``add``, ``poll`` and
``flush`` and runs what they return. ``clock`` is injectable so tests control time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from deblur.config import BatchConfig

T = TypeVar("T")

NET_MULTIPLE = 4
"""What the network pads each side to (deblur.model.STRIDE, two stride-2 stages; a test keeps
the two equal): here so the batcher need not import torch."""


@dataclass
class Batch(Generic[T]):
    """Items that run in one forward pass, padded to ``shape`` (H, W)."""

    items: list[T]
    shape: tuple[int, int]
    dtype: str
    tiled: bool = False
    created: float = 0.0
    closed_reason: str = ""  # full, pixel_budget, max_wait, flush, tiled, retry

    @property
    def padded_pixels(self) -> int:
        return len(self.items) * self.shape[0] * self.shape[1]


@dataclass
class _Open(Generic[T]):
    items: list[T] = field(default_factory=list)
    created: float = 0.0


def bucket_shape(height: int, width: int, multiple: int) -> tuple[int, int]:
    return (math.ceil(height / multiple) * multiple, math.ceil(width / multiple) * multiple)


class DynamicBatcher(Generic[T]):
    """Collects items per (bucket shape, dtype) and hands back closed batches."""

    def __init__(self, config: BatchConfig, tile_pixels: int,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.tile_pixels = tile_pixels
        self.clock = clock
        self._open: dict[tuple[tuple[int, int], str], _Open[T]] = {}

    def __len__(self) -> int:
        return sum(len(o.items) for o in self._open.values())

    def _limit(self, shape: tuple[int, int]) -> int:
        """How many images of this padded shape fit one batch (at least one)."""
        return max(1, min(self.config.max_batch,
                          self.config.pixel_budget // (shape[0] * shape[1])))

    def add(self, item: T, height: int, width: int, dtype: str) -> list[Batch[T]]:
        """Queue one image; returns the batches this closed (possibly none)."""
        now = self.clock()
        shape = bucket_shape(height, width, self.config.bucket_multiple)
        if shape[0] * shape[1] > self.tile_pixels:  # what the pass would cost, padding included
            return [Batch([item], (height, width), dtype, tiled=True, created=now,
                          closed_reason="tiled")]
        key = (shape, dtype)
        pending = self._open.get(key)
        if pending is None:
            pending = self._open[key] = _Open(created=now)
        pending.items.append(item)
        limit = self._limit(shape)
        if len(pending.items) >= limit:
            del self._open[key]
            reason = "full" if limit == self.config.max_batch else "pixel_budget"
            return [Batch(pending.items, shape, dtype, created=pending.created,
                          closed_reason=reason)]
        return []

    def next_deadline(self) -> float | None:
        """Clock time at which the oldest open batch must go, or None when nothing waits."""
        if not self._open:
            return None
        wait = self.config.max_wait_ms / 1000.0
        return min(o.created for o in self._open.values()) + wait

    def poll(self) -> list[Batch[T]]:
        """Close every batch whose oldest image has waited ``max_wait_ms``."""
        now = self.clock()
        wait = self.config.max_wait_ms / 1000.0
        due = [k for k, o in self._open.items() if now - o.created >= wait]
        return [self._close(k, "max_wait") for k in sorted(due, key=self._age)]

    def flush(self) -> list[Batch[T]]:
        """Close every open batch now, oldest first (nothing more is coming soon)."""
        return [self._close(k, "flush") for k in sorted(self._open, key=self._age)]

    def _age(self, key: tuple[tuple[int, int], str]) -> float:
        return self._open[key].created

    def _close(self, key: tuple[tuple[int, int], str], reason: str) -> Batch[T]:
        pending = self._open.pop(key)
        return Batch(pending.items, key[0], key[1], created=pending.created,
                     closed_reason=reason)
