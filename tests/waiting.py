"""The suite's one way to wait: poll the awaited condition itself, never sleep a fixed time; and
the one way to pace a load (`paced`), which is not a wait for anything."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

Seen = TypeVar("Seen")
Item = TypeVar("Item")


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


def paced(items: Iterable[Item], per_second: float) -> Iterator[Item]:
    """The items, at most `per_second` of them a second: a steady load, as agents send it."""
    began = time.monotonic()
    pause = threading.Event()  # never set
    for index, item in enumerate(items):
        ahead = began + index / per_second - time.monotonic()
        if ahead > 0:
            pause.wait(ahead)
        yield item
