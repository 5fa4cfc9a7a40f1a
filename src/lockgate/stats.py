"""The one `percentile` of lockgate: the simulator, the bench, rollback rules and benchmarks all use it.

Below every layer: it imports nothing from lockgate, so any part may use it and
the p95 that automatic rollback judges is the p95 the bench reports.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TypeVar, overload

T = TypeVar("T")
_RAISE = object()  # no `empty` given: no values is an error


@overload
def percentile(values: Iterable[float], q: float) -> float: ...
@overload
def percentile(values: Iterable[float], q: float, *, empty: T) -> float | T: ...


def percentile(values: Iterable[float], q: float, *, empty: object = _RAISE) -> object:
    """The q-th percentile (q in [0, 100]) of `values`, in any order.

    Linear interpolation between the closest ranks: numpy's default
    (`numpy.percentile(values, q, method="linear")`), i.e. the value at virtual
    index (n - 1) * q / 100 of the sorted values. `inf` counts as a value, and
    interpolating towards it gives `inf` (a value exactly on a finite rank stays
    finite). With no values: `empty` if given, else `ValueError`.
    """
    xs = sorted(values)
    if not xs:
        if empty is _RAISE:
            raise ValueError("percentile of no values")
        return empty
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    if xs[hi] == math.inf:  # avoid inf - inf
        return xs[lo] if pos == lo else math.inf
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)
