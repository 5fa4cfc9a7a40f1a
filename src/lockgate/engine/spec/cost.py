"""When proposals pay: a step's measured cost by rows, and the per-step plan built on it.

On a GPU a decode step is memory-bound up to many rows, so extra verify rows are almost free;
on a CPU they are not (the int8 dot products of a 16-row step cost far more than one row's).
The core measures its own step time at a few row counts at start-up (`ModelRunner.measure_rows`)
and plans each step with that curve: proposal rows are added, most likely accepted first
(request i's j-th proposal is accepted with probability alpha_i^j, alpha_i its measured per-token
acceptance), while the expected tokens per second of the step still rise. A big batch is
compute-bound, so its marginal row costs as much as a token is worth, and speculation turns off
by itself; `disable_by_batch_size` is where that happens for well-accepted proposals (reported).
"""
from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass

# Row counts measured at start-up (steps of this many decode rows, each with the LM head).
CALIBRATION_ROWS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)


@dataclass(slots=True)
class StepCostCurve:
    """Seconds of a step by rows, piecewise linear through measured points, linear past the last."""

    rows: list[int]
    seconds: list[float]

    @classmethod
    def from_points(cls, points: dict[int, float]) -> StepCostCurve:
        rows = sorted(points)
        if not rows:
            raise ValueError("a cost curve needs at least one measured point")
        # A noisy measurement must not make a row count look cheaper than a smaller one.
        secs, best = [], 0.0
        for r in rows:
            best = max(best, points[r])
            secs.append(best)
        return cls(rows, secs)

    def time(self, rows: int) -> float:
        r, s = self.rows, self.seconds
        if rows <= r[0]:
            return s[0] * max(rows, 1) / r[0] if rows < r[0] else s[0]
        i = bisect.bisect_left(r, rows)
        if i < len(r) and r[i] == rows:
            return s[i]
        if i == len(r):  # past the last point: the last segment's slope (at least the mean per row)
            slope = (s[-1] - s[-2]) / (r[-1] - r[-2]) if len(r) > 1 else s[-1] / r[-1]
            return s[-1] + max(slope, 0.0) * (rows - r[-1])
        lo, hi = r[i - 1], r[i]
        return s[i - 1] + (s[i] - s[i - 1]) * (rows - lo) / (hi - lo)

    def relative(self, rows: int) -> float:
        """A step of `rows` rows against a one-row step."""
        return self.time(rows) / self.time(1)


def plan(curve: StepCostCurve, base_rows: int, base_tokens: int, offers: list[tuple[float, int]],
         extra_cost: float = 0.0) -> list[int]:
    """Proposal rows per offer: `offers` are (alpha, available proposals) of the decodes that may
    speculate; the step already has `base_rows` rows producing `base_tokens` tokens. Rows go to
    the highest acceptance probabilities first while expected tokens / step time still rises.
    `extra_cost`: seconds each proposal costs besides its row (a draft model's forward pass share)."""
    counts = [0] * len(offers)
    if not offers or base_rows <= 0:
        return counts
    heap = [(-a, i, 1) for i, (a, n) in enumerate(offers) if n > 0 and a > 0]
    heapq.heapify(heap)
    rows, tokens, extra = base_rows, float(base_tokens), 0.0
    t = curve.time(rows)
    while heap:
        neg, i, j = heapq.heappop(heap)
        gain = -neg  # alpha_i ** j: the chance that this proposal and every one before it are accepted
        t_next = curve.time(rows + 1) + extra + extra_cost
        if (tokens + gain) * t <= tokens * t_next:
            break  # the most likely remaining proposal no longer pays for its row
        counts[i] += 1
        rows, tokens, extra, t = rows + 1, tokens + gain, extra + extra_cost, t_next
        alpha, avail = offers[i]
        if j < avail:
            heapq.heappush(heap, (-(alpha ** (j + 1)), i, j + 1))
    return counts


def break_even_batch(curve: StepCostCurve, alpha: float, k: int, limit: int = 1024) -> int | None:
    """The smallest number of decodes at which requests of acceptance `alpha` with k proposals each
    get none: where speculation turns off for the step (None: it never does up to `limit`)."""
    b = 1
    while b <= limit:
        if sum(plan(curve, b, b, [(alpha, k)] * b)) == 0:
            return b
        b = b + 1 if b < 16 else b + max(1, b // 4)
    return None
