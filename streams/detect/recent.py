"""A bounded memory of runs by id: which were closed (tombstones), which were seen and how."""

from __future__ import annotations

from typing import Generic, TypeVar

import numpy as np

V = TypeVar("V")


class RunMemory(Generic[V]):
    """hash(run_id) -> a value, each entry until a bound the caller moves on with `expire` (an
    event time, a count of runs). New entries go to a dict; every `SEAL_EVERY` of them, and once
    the oldest held are `slack` past due, they are sealed into sorted numpy arrays where those due
    are dropped: 16 bytes a run (24 with values, which are meant to be shared objects). Keyed by
    hash(run_id), an int a third of an id's bytes: two ids that hash alike (2**-64 a pair) share
    an entry. A run put again keeps its newest until and value."""

    SEAL_EVERY = 16_384

    def __init__(self, slack: int = 0) -> None:
        self.slack = slack
        self._new: dict[int, tuple[int, V]] = {}  # hash -> (until, value)
        self._hashes = np.empty(0, np.int64)  # sorted
        self._until = np.empty(0, np.int64)  # of each hash
        self._values = np.empty(0, object)  # of each hash
        self._next_due = 2 ** 62  # the earliest until held
        self.bound = 0  # entries with until at or before it are gone

    def put(self, run_id: str, until: int, value: V = True) -> None:
        self._new[hash(run_id)] = (until, value)
        self._next_due = min(self._next_due, until)
        if len(self._new) >= self.SEAL_EVERY:
            self._seal()

    def get(self, run_id: str, default: V | None = None) -> V | None:
        key = hash(run_id)
        entry = self._new.get(key)
        if entry is None:
            at = int(np.searchsorted(self._hashes, key))
            if at == len(self._hashes) or self._hashes[at] != key:
                return default
            entry = int(self._until[at]), self._values[at]
        return entry[1] if entry[0] > self.bound else default

    def __contains__(self, run_id: str) -> bool:
        return self.get(run_id) is not None

    def __len__(self) -> int:
        """Entries held, those due but not sealed away yet included."""
        return len(self._new) + len(self._hashes)

    def expire(self, bound: int) -> None:
        """Forget entries until `bound`: at once for lookups, from memory at the next seal."""
        self.bound = bound
        if self._next_due + self.slack <= bound:
            self._seal()

    def _seal(self) -> None:
        count = len(self._new)
        entries = self._new.values()
        hashes = np.concatenate((self._hashes, np.fromiter(self._new.keys(), np.int64, count)))
        until = np.concatenate((self._until, np.fromiter((u for u, _ in entries), np.int64, count)))
        new_values = np.empty(count, object)
        new_values[:] = [v for _, v in entries]
        values = np.concatenate((self._values, new_values))
        self._new = {}
        live = until > self.bound
        hashes, until, values = hashes[live], until[live], values[live]
        # by hash, and within one the later entry last: the dict's own are newer than sealed ones
        order = np.lexsort((np.arange(len(hashes)), hashes))
        hashes, until, values = hashes[order], until[order], values[order]
        last = np.append(hashes[1:] != hashes[:-1], True)[:len(hashes)]
        self._hashes, self._until, self._values = hashes[last], until[last], values[last]
        self._next_due = int(self._until.min()) if len(self._until) else 2 ** 62


class RunSet:
    """A set of hash(run_id) that only grows: new ones in a set, which `seal` (and every
    `SEAL_EVERY` adds) merges into a sorted numpy array, 8 bytes a run where a set takes ~95."""

    SEAL_EVERY = 4_096
    __slots__ = ("_sealed", "_new")

    def __init__(self) -> None:
        self._sealed = np.empty(0, np.int64)
        self._new: set[int] = set()

    def add(self, run_id: str) -> None:
        key = hash(run_id)
        if key in self._new:
            return
        sealed = self._sealed
        if len(sealed):
            at = int(sealed.searchsorted(key))
            if at < len(sealed) and sealed[at] == key:
                return
        self._new.add(key)
        if len(self._new) >= self.SEAL_EVERY:
            self.seal()

    def seal(self) -> None:
        if self._new:
            self._sealed = np.union1d(self._sealed, np.fromiter(self._new, np.int64, len(self._new)))
            self._new = set()

    def __len__(self) -> int:
        return len(self._sealed) + len(self._new)
