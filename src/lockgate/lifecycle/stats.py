"""Per-version request outcomes and shadow comparison figures, over a sliding window.

Token agreement itself is `eval/agreement.py` (shared with `lockgate eval`).

Rollback rules (rollback.py) read the window: the last `window` requests of a
version, so an old incident ages out and a canary is judged on what it does now.
Totals since the version was loaded feed /metrics (histogram buckets as
step_stats.HistogramCounts, which the Prometheus collector renders).
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from lockgate.engine.step_stats import HistogramCounts
from lockgate.observability.record import RequestRecord
from lockgate.stats import percentile

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
DEFAULT_WINDOW = 200


@dataclass(slots=True)
class Outcome:
    ok: bool
    ttft_s: float | None = None  # submission to the first token (engine side: no HTTP or queueing before it)
    tpot_s: float | None = None  # mean time per output token after the first


# (outcome, final token ids of choice 0) -> None; outcome None: given up by its client (not judged)
OnEnd = Callable[[Outcome | None, list[int]], None]


def outcome_of(record: RequestRecord, ok: bool) -> Outcome:
    """A request's outcome from its record (the request's one clock): TTFT from its submission to
    the engine, so versions are compared on what their engines do."""
    since = record.admitted if record.admitted is not None else record.started
    ttft = None if record.first_token is None else record.first_token - since
    return Outcome(ok, ttft, record.tpot_s)


def _pct(values: list[float], q: float) -> float | None:
    """A window's percentile for the JSON figures, rounded; None for no values."""
    x = percentile(values, q, empty=None)
    return None if x is None else round(x, 6)


@dataclass(slots=True)
class VersionStats:
    window: int = DEFAULT_WINDOW
    recent: deque[Outcome] = field(default_factory=deque)
    total: int = 0
    errors: int = 0
    ttft_hist: HistogramCounts = field(default_factory=lambda: HistogramCounts.empty(LATENCY_BUCKETS))

    def record(self, outcome: Outcome) -> None:
        self.recent.append(outcome)
        while len(self.recent) > self.window:
            self.recent.popleft()
        self.total += 1
        if not outcome.ok:
            self.errors += 1
        elif outcome.ttft_s is not None:
            self.ttft_hist.observe(outcome.ttft_s, LATENCY_BUCKETS)

    def reset_window(self) -> None:
        """A deliberate traffic change starts a new judgement (a rolled-back canary given traffic
        again must not be rolled back at once on its old figures)."""
        self.recent.clear()

    @property
    def window_requests(self) -> int:
        return len(self.recent)

    @property
    def error_rate(self) -> float | None:
        n = len(self.recent)
        return None if n == 0 else sum(not o.ok for o in self.recent) / n

    def ttfts(self) -> list[float]:
        return [o.ttft_s for o in self.recent if o.ok and o.ttft_s is not None]

    def tpots(self) -> list[float]:
        return [o.tpot_s for o in self.recent if o.ok and o.tpot_s is not None]

    def to_json(self) -> dict[str, object]:
        ttft, tpot = self.ttfts(), self.tpots()
        rate = self.error_rate
        return {"requests_total": self.total, "errors_total": self.errors, "window_requests": len(self.recent),
                "error_rate": None if rate is None else round(rate, 6),
                "ttft_p50_s": _pct(ttft, 50), "ttft_p95_s": _pct(ttft, 95),
                "tpot_p50_s": _pct(tpot, 50), "tpot_p95_s": _pct(tpot, 95)}


@dataclass(slots=True)
class Pair:
    """One shadowed request: the primary's and the shadow's figures."""

    primary: Outcome
    shadow: Outcome
    agreement: float | None = None  # greedy requests only
    first_match: bool | None = None


@dataclass(slots=True)
class ShadowStats:
    """A model's shadow version against the primaries it shadowed."""

    window: int = DEFAULT_WINDOW
    pairs: deque[Pair] = field(default_factory=deque)
    sent: int = 0
    dropped: int = 0  # not sent: the shadow was saturated (or not ready)
    completed: int = 0
    errors: int = 0
    greedy: int = 0

    def record(self, pair: Pair) -> None:
        self.pairs.append(pair)
        while len(self.pairs) > self.window:
            self.pairs.popleft()
        if pair.shadow.ok:
            self.completed += 1
        else:
            self.errors += 1
        if pair.agreement is not None:
            self.greedy += 1

    def agreements(self) -> list[Pair]:
        return [p for p in self.pairs if p.agreement is not None]

    @property
    def agreement(self) -> float | None:
        g = self.agreements()
        return None if not g else sum(p.agreement for p in g) / len(g)  # type: ignore[misc]

    @property
    def first_match_rate(self) -> float | None:
        g = self.agreements()
        return None if not g else sum(bool(p.first_match) for p in g) / len(g)

    def to_json(self) -> dict[str, object]:
        def side(which: str) -> dict[str, object]:
            outs = [getattr(p, which) for p in self.pairs]
            ttft = [o.ttft_s for o in outs if o.ok and o.ttft_s is not None]
            tpot = [o.tpot_s for o in outs if o.ok and o.tpot_s is not None]
            errs = sum(not o.ok for o in outs)
            return {"ttft_p50_s": _pct(ttft, 50), "ttft_p95_s": _pct(ttft, 95),
                    "tpot_p50_s": _pct(tpot, 50), "tpot_p95_s": _pct(tpot, 95),
                    "errors": errs, "error_rate": round(errs / len(outs), 6) if outs else None}

        agree, first = self.agreement, self.first_match_rate
        return {"sent": self.sent, "dropped": self.dropped, "completed": self.completed, "errors": self.errors,
                "window_pairs": len(self.pairs), "greedy_pairs": len(self.agreements()),
                "token_agreement": None if agree is None else round(agree, 6),
                "first_32_match_rate": None if first is None else round(first, 6),
                "primary": side("primary"), "shadow": side("shadow")}
