"""A bounded memory of the runs seen last, for recognising a run delivered again."""

from __future__ import annotations

from typing import Generic, TypeVar

V = TypeVar("V")
_MISSING = object()


class RecentRuns(Generic[V]):
    """The runs seen last, each with a value: at least `size` of them, at most twice that, in
    two generations of dicts (the older one dropped whole when the newer fills: O(1), where an
    OrderedDict's pop of its oldest holds a linked entry per run). Keyed by hash(run_id), an
    int a third of an id's bytes; two ids that hash alike (2**-64 a pair) share a value."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._new: dict[int, V] = {}
        self._old: dict[int, V] = {}

    def get(self, run_id: str, default: V | None = None) -> V | None:
        key = hash(run_id)
        value = self._new.get(key, _MISSING)
        if value is _MISSING:
            value = self._old.get(key, default)
        return value

    def __setitem__(self, run_id: str, value: V) -> None:
        self._new[hash(run_id)] = value
        if len(self._new) >= self.size:
            self._old, self._new = self._new, {}

    def __contains__(self, run_id: str) -> bool:
        return self.get(run_id, _MISSING) is not _MISSING

    def __len__(self) -> int:
        return len(self._new) + len(self._old)
