"""Send times for open-loop load shapes: fixed rate (Poisson or constant), ramp, bursts.

Every shape is an arrival intensity rate(t); its integral L(t) maps "unit time"
to wall time. Poisson arrivals are a unit-rate Poisson process (exponential
gaps of mean 1) mapped through L^-1; constant arrivals are the integers 0, 1,
2, ... mapped the same way. So a ramp gets Poisson or evenly spaced arrivals
from one formula, and a fixed rate is the special case L(t) = rate * t.
"""
from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator

ARRIVALS = ("poisson", "constant")
MAX_ARRIVALS = 10_000_000  # a guard against a typo like --rate 1e9


def _units(kind: str, rng: random.Random) -> Iterator[float]:
    """Arrivals of a unit-rate process: Poisson (the first after one exponential gap) or 0, 1, 2, ..."""
    if kind == "constant":
        k = 0
        while True:
            yield float(k)
            k += 1
    u = 0.0
    while True:
        u += rng.expovariate(1.0)
        yield u


def _take(inverse: Callable[[float], float], kind: str, rng: random.Random,
          duration_s: float | None, count: int | None) -> list[float]:
    if duration_s is None and count is None:
        raise ValueError("a load shape needs a duration or a request count")
    out: list[float] = []
    for u in _units(kind, rng):
        t = inverse(u)
        if (duration_s is not None and t >= duration_s) or (count is not None and len(out) >= count):
            break
        if len(out) >= MAX_ARRIVALS:
            raise ValueError(f"more than {MAX_ARRIVALS} requests: lower the rate or the duration")
        out.append(t)
    return out


def fixed_rate(rate: float, kind: str, seed: int, duration_s: float | None = None,
               count: int | None = None) -> list[float]:
    """Send times (seconds from the start) at `rate` requests/s.

    Poisson over a duration sends exactly round(rate * duration) requests at
    uniformly random times: a Poisson process conditioned on its count. The
    gaps stay exponential (bursty), but two runs at one rate offer the same
    load, which short sweep probes need (a free count varies by +-1/sqrt(n)).
    """
    if not rate > 0:
        raise ValueError("rate must be > 0")
    if kind == "poisson" and duration_s is not None:
        n = round(rate * duration_s)
        if n > MAX_ARRIVALS:
            raise ValueError(f"more than {MAX_ARRIVALS} requests: lower the rate or the duration")
        rng = random.Random(seed)
        ts = sorted(rng.uniform(0.0, duration_s) for _ in range(n))
        return ts[:count] if count is not None else ts
    return _take(lambda u: u / rate, kind, random.Random(seed), duration_s, count)


def ramp(start_rate: float, end_rate: float, duration_s: float, kind: str, seed: int,
         count: int | None = None) -> list[float]:
    """Rate rising (or falling) linearly from `start_rate` to `end_rate` over `duration_s`."""
    a, b, d = start_rate, end_rate, duration_s
    if a < 0 or b < 0 or a + b <= 0:
        raise ValueError("ramp rates must be >= 0 and not both 0")
    slope = (b - a) / d

    def inverse(u: float) -> float:
        # L(t) = a t + slope t^2 / 2 = u, solved for t >= 0.
        if abs(slope) < 1e-12:
            return u / a
        disc = a * a + 2 * slope * u
        if disc < 0:  # a falling ramp never reaches this many arrivals
            return math.inf
        return (math.sqrt(disc) - a) / slope

    return _take(inverse, kind, random.Random(seed), d, count)


def bursts(size: int, interval_s: float, duration_s: float | None = None,
           count: int | None = None) -> list[float]:
    """`size` requests at once every `interval_s` seconds, from t = 0."""
    if size < 1 or not interval_s > 0:
        raise ValueError("a burst needs size >= 1 and interval > 0")
    return _take(lambda u: (u // size) * interval_s, "constant", random.Random(0), duration_s, count)
