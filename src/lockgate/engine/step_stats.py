"""Per-step engine statistics, aggregated in the core as cumulative histograms.

The core observes every step's duration and token count into fixed buckets and
ships the running totals with each `StepOutputs` (inside `EngineStats`): a few
dozen integers per message, no per-step list, nothing lost if the API process
reads late. The bucket bounds live here, shared by both processes, so they
never cross the socket.
"""
from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field

# Seconds per engine step (schedule + model + sampling + outputs).
STEP_SECONDS_BUCKETS: tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15,
                                           0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Tokens per step (prompt tokens computed + tokens sampled), as vLLM's iteration_tokens_total.
ITERATION_TOKENS_BUCKETS: tuple[float, ...] = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


@dataclass(slots=True)
class HistogramCounts:
    """A cumulative histogram: `counts[i]` observations <= bounds[i] and > bounds[i-1]; the last
    entry holds those above every bound (+Inf). msgspec encodes it as-is."""

    counts: list[int] = field(default_factory=list)
    sum: float = 0.0

    @classmethod
    def empty(cls, bounds: tuple[float, ...]) -> HistogramCounts:
        return cls([0] * (len(bounds) + 1), 0.0)

    @property
    def count(self) -> int:
        return sum(self.counts)

    def observe(self, value: float, bounds: tuple[float, ...]) -> None:
        self.counts[bisect_left(bounds, value)] += 1  # Prometheus buckets are `le`: bisect_left
        self.sum += value

    def plus(self, other: HistogramCounts | None) -> HistogramCounts:
        """A new histogram holding both (a restarted core's counts add to the dead one's)."""
        if other is None or not other.counts:
            return HistogramCounts(list(self.counts), self.sum)
        if not self.counts:
            return HistogramCounts(list(other.counts), other.sum)
        return HistogramCounts([a + b for a, b in zip(self.counts, other.counts)], self.sum + other.sum)

    def cumulative(self, bounds: tuple[float, ...]) -> list[tuple[float, float]]:
        """(upper bound, cumulative count) pairs, +Inf last: Prometheus `le` buckets."""
        out: list[tuple[float, float]] = []
        total = 0
        counts = self.counts or [0] * (len(bounds) + 1)
        for bound, n in zip((*bounds, float("inf")), counts):
            total += n
            out.append((float(bound), float(total)))
        return out
