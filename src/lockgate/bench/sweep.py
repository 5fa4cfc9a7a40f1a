"""Find the highest request rate that meets the SLO: grow geometrically, then bisect.

Probe `start`, `start * growth`, ... until a probe fails (or `max_rate` passes);
when the very first probe fails, halve instead until one passes. Then bisect
between the highest passing and the lowest failing rate until they are within
`tolerance` (relative) of each other. Each probe is a short fixed-rate phase;
a probe passes when every SLO term holds and the error rate is within bounds.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

GROWTH = 2.0
MAX_HALVINGS = 8


@dataclass(slots=True)
class Probe:
    rate: float
    passed: bool
    reason: str                 # why it failed ("" when it passed)
    summary: dict[str, Any]     # the probe's aggregates (stats.Summary as JSON)


@dataclass(slots=True)
class SweepResult:
    best_rate: float            # highest passing rate probed (0.0 when none passed)
    found: bool                 # a passing rate was found
    bracketed: bool             # a failing rate above it was found too (else: capped by max_rate)
    probes: list[Probe] = field(default_factory=list)


async def search(probe: Callable[[float], Awaitable[Probe]], start: float, max_rate: float,
                 tolerance: float, max_probes: int) -> SweepResult:
    probes: list[Probe] = []
    lo: float | None = None   # highest passing
    hi: float | None = None   # lowest failing

    async def run(rate: float) -> bool:
        p = await probe(rate)
        probes.append(p)
        return p.passed

    rate = min(start, max_rate)
    while len(probes) < max_probes:  # growth
        if await run(rate):
            lo = rate
            if rate >= max_rate:
                break
            rate = min(rate * GROWTH, max_rate)
        else:
            hi = rate
            break
    halvings = 0
    while lo is None and hi is not None and halvings < MAX_HALVINGS and len(probes) < max_probes:
        rate, halvings = hi / GROWTH, halvings + 1
        if await run(rate):
            lo = rate
        else:
            hi = rate
    while lo is not None and hi is not None and (hi - lo) / lo > tolerance and len(probes) < max_probes:
        mid = (lo + hi) / 2
        if await run(mid):
            lo = mid
        else:
            hi = mid
    return SweepResult(lo or 0.0, lo is not None, lo is not None and hi is not None, probes)
