"""`lockgate.stats.percentile`: numpy's default (linear) definition, its edge cases, empty input."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest

from lockgate.stats import percentile


def test_matches_numpy_linear_on_random_data() -> None:
    rng = random.Random(18)
    for n in (1, 2, 3, 7, 10, 100, 1001):
        xs = [rng.uniform(-5.0, 50.0) for _ in range(n)]
        for q in (0, 0.1, 1, 25, 50, 62.5, 90, 95, 99, 99.9, 100, rng.uniform(0, 100)):
            want = float(np.percentile(xs, q, method="linear"))
            assert percentile(xs, q) == pytest.approx(want, rel=1e-12, abs=1e-12), (n, q)


def test_one_value_is_every_percentile() -> None:
    for q in (0, 37.5, 50, 100):
        assert percentile([4.25], q) == 4.25


def test_bounds_are_min_and_max() -> None:
    xs = [3.0, -1.0, 8.0, 2.0]
    assert percentile(xs, 0) == -1.0
    assert percentile(xs, 100) == 8.0


def test_unsorted_input_and_iterables() -> None:
    assert percentile([4, 1, 3, 2], 50) == 2.5
    assert percentile(iter([4, 1, 3, 2]), 50) == 2.5
    assert percentile(range(101), 99) == 99
    assert percentile((5, 1), 25) == 2.0


def test_infinite_values() -> None:
    xs = [1.0, 2.0, 3.0, math.inf]
    assert percentile(xs, 50) == 2.5
    assert percentile(xs, 95) == math.inf  # interpolating towards a failure is a failure
    assert percentile(xs, 100 * 2 / 3) == 3.0  # exactly on a finite rank


def test_empty_input_raises_or_gives_the_callers_value() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    assert percentile([], 50, empty=None) is None
    assert math.isnan(percentile([], 50, empty=math.nan))


def test_q_out_of_range_is_refused() -> None:
    for q in (-0.1, 100.1):
        with pytest.raises(ValueError):
            percentile([1.0, 2.0], q)
