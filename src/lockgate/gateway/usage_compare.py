"""`usage compare`: two slices of the ledger side by side (two time windows, or two model versions).

Pure: totals and latency samples in, the comparison out. Totals (requests,
tokens, exact cost, errors) cover every row of a side; the latency percentiles
come from at most `MAX_SAMPLES` of its newest timed rows (`capped` says when
there were more). TPOT of a row is (e2e - ttft) / (completion_tokens - 1), for
rows with more than one completion token and both times set. A change is
(B - A) / A: `None` where A is 0 and B is not (no ratio exists), 0.0 where both are.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lockgate.stats import percentile
from lockgate.store.money import usd

MAX_SAMPLES = 200_000  # timed rows read per side for the percentiles
PERCENTILES = (50, 95, 99)


@dataclass(slots=True)
class Side:
    """One side's ledger slice: its filter (for the output), totals and latency samples."""

    label: str
    filters: dict[str, Any]
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_nusd: int = 0
    errors: int = 0
    timings: list[tuple[float, float | None, int]] = field(default_factory=list)  # (ttft_s, e2e_s, completion)
    capped: bool = False  # more timed rows existed than were read


def tpot(ttft_s: float, e2e_s: float | None, completion_tokens: int) -> float | None:
    """Seconds per output token after the first; None where it is undefined."""
    if e2e_s is None or completion_tokens <= 1:
        return None
    return max(0.0, e2e_s - ttft_s) / (completion_tokens - 1)


def _percentiles(values: list[float]) -> dict[str, float | None]:
    return {f"p{q}": percentile(values, q, empty=None) for q in PERCENTILES}


def summarize(side: Side) -> dict[str, Any]:
    """One side's figures: totals, cost per 1k tokens, error rate, TTFT/TPOT percentiles."""
    tokens = side.prompt_tokens + side.completion_tokens
    ttfts = [t for t, _, _ in side.timings]
    tpots = [v for v in (tpot(*t) for t in side.timings) if v is not None]
    return {
        "label": side.label, "filters": side.filters,
        "requests": side.requests, "prompt_tokens": side.prompt_tokens,
        "completion_tokens": side.completion_tokens,
        "cost_usd": usd(side.cost_nusd), "cost_nusd": side.cost_nusd,
        # Per 1k prompt + completion tokens; from the exact integer, divided once.
        "cost_per_1k_tokens_usd": usd(side.cost_nusd) * 1000 / tokens if tokens else None,
        "error_rate": side.errors / side.requests if side.requests else None,
        "ttft_s": _percentiles(ttfts), "tpot_s": _percentiles(tpots),
        "timed_requests": len(side.timings), "capped": side.capped,
    }


def change(a: float | None, b: float | None) -> float | None:
    """(b - a) / a, the relative change from A to B."""
    if a is None or b is None:
        return None
    if a == 0:
        return 0.0 if b == 0 else None
    return (b - a) / a


COMPARED = ("requests", "prompt_tokens", "completion_tokens", "cost_usd", "cost_per_1k_tokens_usd", "error_rate")


def compare(a: Side, b: Side) -> dict[str, Any]:
    """Both sides' figures and the relative change of each, B vs A."""
    sa, sb = summarize(a), summarize(b)
    delta: dict[str, Any] = {k: change(sa[k], sb[k]) for k in COMPARED}
    for k in ("ttft_s", "tpot_s"):
        delta[k] = {p: change(sa[k][p], sb[k][p]) for p in sa[k]}
    out: dict[str, Any] = {"object": "usage.compare", "a": sa, "b": sb, "change": delta,
                           "max_samples": MAX_SAMPLES}
    if a.capped or b.capped:
        out["note"] = (f"latency percentiles from the newest {MAX_SAMPLES} timed requests of a side that "
                       "had more; totals cover every request")
    return out
