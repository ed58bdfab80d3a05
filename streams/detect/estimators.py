"""The one estimator convention of Trackside's numbers: quantiles interpolate linearly between order
statistics (numpy's default, `method="linear"`), rates are ratios of sums, empty is None."""

from __future__ import annotations

from collections.abc import Sequence


def quantile(ordered: Sequence[float], q: float) -> float | None:
    """The q-quantile of sorted values, interpolated linearly; None when there are none."""
    if not ordered:
        return None
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def ratio(numerator: float, denominator: float) -> float | None:
    """A rate as the ratio of two sums (cost per success = all cost / successes); None when
    nothing was counted below the line."""
    return numerator / denominator if denominator else None
