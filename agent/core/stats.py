"""Percentiles by nearest rank: the one definition the gate's telemetry, its
latency figures and the benchmarks share.

The nearest-rank percentile q of n values is the value at rank ceil(q * n)
in ascending order (1-based): always one of the values, never interpolated,
so "p99 = 12 ms" means a decision that really took 12 ms.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["nearest_rank", "percentiles"]


def nearest_rank(ordered: Sequence[float], q: float) -> float:
    """The nearest-rank q-quantile (0 < q <= 1) of values already sorted ascending."""
    if not ordered:
        raise ValueError("no values")
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def percentiles(values: Sequence[float], qs: Sequence[float] = (0.5, 0.99, 0.999)) -> dict[float, float]:
    """{q: nearest-rank quantile} of the values (any order); {} when there are none."""
    if not values:
        return {}
    ordered = sorted(values)
    return {q: nearest_rank(ordered, q) for q in qs}
