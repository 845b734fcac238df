"""Waiting for a condition in tests: poll it, bounded, without assuming how fast it is."""

from __future__ import annotations

import time
from collections.abc import Callable


def until(pred: Callable[[], bool], timeout: float, every: float = 0.01) -> bool:
    """Whether `pred()` became true within `timeout` seconds (polled every `every`)."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True
