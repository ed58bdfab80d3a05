"""The suite's one way to wait: poll the awaited condition itself, never sleep a fixed time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

Seen = TypeVar("Seen")


def wait_until(observe: Callable[[], Seen], timeout: float, what: str,
               done: Callable[[Seen], bool] = bool, interval: float = 0.2) -> Seen:
    """Poll `observe()` until `done` holds for what it returns, and return that. After `timeout`
    seconds, fail saying what was awaited and what was seen last."""
    deadline = time.monotonic() + timeout
    while True:
        seen = observe()
        if done(seen):
            return seen
        if time.monotonic() >= deadline:
            raise AssertionError(f"waited {timeout:g} s for {what}; last seen: {seen!r}")
        time.sleep(interval)
