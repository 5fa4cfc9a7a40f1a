"""Hedged requests: a second copy of a slow request on another replica or version.

A non-streaming request that is safe to repeat (greedy, or seeded) and has opted in
(`x-lockgate-hedge: true`) is watched from submission: if it has produced nothing by
its class's TTFT p95 (measured here over the latest answers of the class; the class's
TTFT target until enough are seen), a copy goes to another replica of its version, or
else to another ready version of its model. The copy whose first token comes first
wins; the other is aborted at once and never billed (the pipeline observes only the
winner's outputs). Greedy and seeded copies give the same answer, so which one wins
changes only when it arrives.

Hedges are capped at a share of traffic (`--hedge-budget`, 5% by default): every
request earns that fraction of a hedge, each hedge spends one (a token bucket, so a
burst of stalls cannot double the load).
"""
from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from lockgate.lifecycle.fleet_stream import FleetStream
from lockgate.stats import percentile

HEDGE_HEADER = "x-lockgate-hedge"
WINDOW = 512  # latest TTFTs per class
MIN_SAMPLES = 20  # below this the class's target stands in for its p95
MIN_DELAY_S = 0.01
MAX_CREDIT = 10.0  # hedges that may be saved up


@dataclass(slots=True)
class Hedger:
    budget: float = 0.05  # hedges per request, at most
    credit: float = 1.0
    sent: int = 0  # hedges sent
    won: int = 0  # ... that answered first
    skipped: int = 0  # wanted one, the budget (or no other replica/version) said no
    _ttft: dict[str, deque[float]] = field(default_factory=dict)

    def note_request(self) -> None:
        """Every request submitted earns its share of a hedge."""
        self.credit = min(MAX_CREDIT, self.credit + self.budget)

    def observe_ttft(self, cls: str, ttft_s: float) -> None:
        window = self._ttft.get(cls)
        if window is None:
            window = self._ttft[cls] = deque(maxlen=WINDOW)
        window.append(ttft_s)

    def delay_s(self, cls: str, target_s: float) -> float:
        """How long a request of class `cls` waits for its first output before it is hedged."""
        window = self._ttft.get(cls)
        if window is None or len(window) < MIN_SAMPLES:
            return max(MIN_DELAY_S, target_s)
        return max(MIN_DELAY_S, percentile(window, 95))

    def take(self) -> bool:
        if self.budget <= 0 or self.credit < 1.0:
            self.skipped += 1
            return False
        self.credit -= 1.0
        self.sent += 1
        return True

    def refund(self) -> None:
        """A hedge taken but sent nowhere (no other replica or version): nothing was spent."""
        self.credit += 1.0
        self.sent -= 1
        self.skipped += 1

    def to_json(self) -> dict[str, object]:
        return {"budget": self.budget, "sent": self.sent, "won": self.won, "skipped": self.skipped}


async def first_of(a: FleetStream, b: FleetStream) -> tuple[FleetStream, FleetStream]:
    """(winner, loser): the stream whose first output (or end) comes first. A copy that fails
    leaves the race to the other; when both fail, the first's error is raised."""
    ta = asyncio.ensure_future(a.peek(None))
    tb = asyncio.ensure_future(b.peek(None))
    pending = {ta, tb}
    failed: BaseException | None = None
    try:
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                exc = t.exception()
                if exc is None:
                    return (a, b) if t is ta else (b, a)
                failed = failed or exc
        assert failed is not None
        raise failed
    finally:
        for t in (ta, tb):
            if not t.done():
                t.cancel()

