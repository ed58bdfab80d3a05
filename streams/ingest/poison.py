"""Which rows of a refused batch the store will never take: the bisection behind the sink's error policy.

A store that refuses everything (a detached table, a server that is down) refuses every
part of a batch the same way; poison rows are refused for their data, while the rest of the
batch lands. So a refused batch is split in halves and each half is tried:

- a refusal that says the data is wrong (`is_data_error`: the rows cannot be typed, or
  ClickHouse's error code is a data error) is bisected down to the single rows: poison;
- any other refusal is bisected only while its sibling half landed (the store took part of
  the batch just now, so this half holds what it refuses); a lone row refused so is poison;
- a half refused without a data error while its sibling was refused too is left unlanded:
  the store refuses everything, and the caller retries those rows with backoff.

An outage costs three attempts per retry (the batch, then its halves), a poison row about
2 log2(n). Poison refused without a data error in both halves of a batch looks like an
outage and is retried (never dropped); so is a store that fails between two sibling halves.
"""

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
