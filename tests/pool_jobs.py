"""Jobs for codec pool processes in tests, kept apart from the test modules: a pool process
imports the module of the function it runs, and this one imports nothing heavy."""

from __future__ import annotations

import os
import time


def maybe_crash(value: str) -> str:
    """Kills its process on "crash"; otherwise takes a moment and answers."""
    if value == "crash":
        time.sleep(0.2)  # let the others reach the pool first
        os._exit(3)
    time.sleep(0.6)
    return value.upper()
