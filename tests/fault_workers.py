"""Worker actors that misbehave on purpose, for the Ray tests of hangs and GPU faults.

``FaultWorker`` is the real ``WorkerActor`` (its ``process``, its exit on an unhealthy engine)
around the real ``ShardProcessor``, with a stand-in model: identity, except that the first
forward of a job does what the file ``<job_root>/../fault`` says, once across all actors:

- ``hang``: never returns (a wedged kernel or driver);
- ``cuda``: raises the RuntimeError torch raises after an illegal memory access.

Kept apart from the test modules so Ray workers import it by name, and it imports nothing heavy.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

from deblur.config import from_dict
from deblur.run.worker import ShardProcessor, WorkerActor, worker_name

ILLEGAL_ADDRESS = "CUDA error: an illegal memory access was encountered"


def _first_time(folder: Path) -> bool:
    """True for exactly one caller across processes (an exclusive create)."""
    try:
        os.close(os.open(folder / "fault.fired", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


class FaultWorker(WorkerActor):
    def __init__(self, config: dict[str, Any]) -> None:  # noqa: D107 - no model to load
        logging.basicConfig(level=logging.INFO)
        self.start_error = None  # WorkerActor.ready() reports a constructor failure from it
        self.folder: Path | None = None
        self.processor = ShardProcessor(from_dict(config), self._infer, worker_name())

    def process(self, job_root: str, shard_id: int, attempt: int) -> dict[str, Any]:
        self.folder = Path(job_root).parent
        return super().process(job_root, shard_id, attempt)

    def _infer(self, images: list[np.ndarray], shape: tuple[int, int] | None
               ) -> list[np.ndarray]:
        assert self.folder is not None
        order = self.folder / "fault"
        mode = order.read_text().strip() if order.exists() else ""
        if mode and _first_time(self.folder):
            if mode == "hang":
                threading.Event().wait()
            if mode == "cuda":
                raise RuntimeError(ILLEGAL_ADDRESS)
        return [img.copy() for img in images]
