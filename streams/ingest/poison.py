"""Which rows of a refused batch the store will never take: the bisection behind the sink's error policy.
The rules: streams/ingest/README.md, "Poison rows"."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Generic, TypeVar

from streams.errors import StoreError

T = TypeVar("T")


class UnfitRows(StoreError):
    """Rows the table's column types cannot hold: their data is wrong, whatever the store's state."""


@dataclass
class Landing(Generic[T]):
    """What became of a batch: what was refused for its data, and what is still to land."""

    poison: list[tuple[T, Exception]] = field(default_factory=list)
    unlanded: list[T] = field(default_factory=list)
    error: Exception | None = None  # why the unlanded rows were refused
    refusal: Exception | None = None  # why the whole batch was refused, if it was


def land(items: list[T], insert: Callable[[list[T]], None], is_data_error: Callable[[Exception], bool]) -> Landing[T]:
    """Insert `items` (with `insert`, which raises when the store refuses), isolating poison rows."""
    landing: Landing[T] = Landing()

    def attempt(chunk: list[T]) -> Exception | None:
        try:
            insert(chunk)
        except Exception as error:  # whatever the store says, the policy decides below
            return error
        return None

    def settle(chunk: list[T], error: Exception, sibling_landed: bool) -> None:
        if not (sibling_landed or is_data_error(error)):
            landing.unlanded += chunk
            landing.error = error
        elif len(chunk) == 1:
            landing.poison.append((chunk[0], error))
        else:
            split(chunk)

    def split(chunk: list[T]) -> None:
        middle = len(chunk) // 2
        first, second = chunk[:middle], chunk[middle:]
        first_error, second_error = attempt(first), attempt(second)
        if first_error is not None:
            settle(first, first_error, second_error is None)
        if second_error is not None:
            settle(second, second_error, first_error is None)

    landing.refusal = attempt(items)
    if landing.refusal is not None:
        if len(items) > 1:
            split(items)  # does the store take part of it?
        else:
            settle(items, landing.refusal, sibling_landed=False)
    return landing
