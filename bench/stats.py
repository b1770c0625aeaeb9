"""Small statistics helpers: percentiles, medians of repeats with their spread, thinned samples."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linearly interpolated; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def thin(values: Iterable[float], points: int = 1500) -> list[float]:
    """At most `points` values spread evenly by rank (enough to draw a distribution)."""
    ordered = sorted(values)
    if len(ordered) <= points:
        return ordered
    step = (len(ordered) - 1) / (points - 1)
    return [ordered[round(index * step)] for index in range(points)]


@dataclass(frozen=True)
class Spread:
    """The median of repeated measurements with the lowest and highest value seen."""

    median: float
    low: float
    high: float
    count: int

    @classmethod
    def of(cls, values: Iterable[float | None]) -> Spread | None:
        present = [value for value in values if value is not None and math.isfinite(value)]
        if not present:
            return None
        return cls(statistics.median(present), min(present), max(present), len(present))
