"""`StructuredStats`: an engine core's structured-outputs counters, shipped in `EngineStats`.

Cumulative since the core started (the frontend adds a dead core's to its successor's, as it
does the step histograms): compiles by result, their seconds, grammar-cache lookups, and the
seconds each step spent filling bitmasks. Plain data, no llguidance: the API process imports it.
"""
from __future__ import annotations

from dataclasses import dataclass

from lockgate.engine.step_stats import HistogramCounts

# Seconds spent filling a step's bitmasks (steps with at least one constrained row).
MASK_SECONDS_BUCKETS: tuple[float, ...] = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                                           0.1, 0.25)
# The `result` label of lockgate:structured_compiles_total, in StructuredStats' field order.
COMPILE_RESULTS: tuple[str, ...] = ("ok", "error", "timeout", "rejected")


@dataclass(slots=True)
class StructuredStats:
    compiles_ok: int = 0
    compiles_error: int = 0  # the grammar did not compile (or the tokenizer could not be built)
    compiles_timeout: int = 0  # over the compile time limit: its requests failed
    compiles_rejected: int = 0  # refused without compiling: the tenant's queue was full, or known too slow
    compile_seconds: float = 0.0  # worker time of finished compiles (timed-out ones count once they end)
    cache_hits: int = 0
    cache_misses: int = 0
    mask_seconds: HistogramCounts | None = None

    def compiles(self) -> tuple[int, ...]:
        """Counts in COMPILE_RESULTS' order."""
        return self.compiles_ok, self.compiles_error, self.compiles_timeout, self.compiles_rejected

    def plus(self, other: StructuredStats | None) -> StructuredStats:
        """A new one holding both (a restarted core's counts add to the dead one's)."""
        if other is None:
            other = StructuredStats()
        masks = (self.mask_seconds or HistogramCounts()).plus(other.mask_seconds)
        return StructuredStats(
            self.compiles_ok + other.compiles_ok, self.compiles_error + other.compiles_error,
            self.compiles_timeout + other.compiles_timeout, self.compiles_rejected + other.compiles_rejected,
            self.compile_seconds + other.compile_seconds, self.cache_hits + other.cache_hits,
            self.cache_misses + other.cache_misses, masks)
