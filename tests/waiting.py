"""The suite's one way to wait: poll the awaited condition itself, never sleep a fixed time."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

Seen = TypeVar("Seen")


def wait_until(observe: Callable[[], Seen], timeout: float, what: str,
               done: Callable[[Seen], bool] = bool, interval: float = 0.2) -> Seen:
    """Poll `observe()` until `done` holds for what it returns, and return that. After `timeout`
    seconds, fail saying what was awaited and what was seen last."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()  # never set: only its bounded wait between two looks
    while True:
        seen = observe()
        if done(seen):
            return seen
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"waited {timeout:g} s for {what}; last seen: {seen!r}")
        pause.wait(min(interval, left))  # never past the deadline
