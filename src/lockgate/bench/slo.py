"""Latency SLOs: `ttft_p95<0.5,tpot_p99<50ms` parsed into terms, checked per request and per run.

A run passes a term when the term's percentile over the run's requests is within
the threshold; requests that failed or were rejected count as infinitely slow,
so a server cannot pass by shedding load. Cancelled streams are left out (the
client chose to stop them). A single request meets a term when its own value is
within the threshold (for ITL: the same percentile of that request's own gaps).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

METRICS = ("ttft", "tpot", "itl", "e2e")
_TERM = re.compile(r"^(ttft|tpot|itl|e2e)_p(\d+(?:\.\d+)?)\s*(<=|<)\s*(\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)\s*(ms|s)?$")


class SLOError(ValueError):
    """A malformed --slo string."""


@dataclass(slots=True, frozen=True)
class SLOTerm:
    metric: str         # one of METRICS
    percentile: float   # in (0, 100]
    threshold_s: float  # seconds, > 0

    @property
    def name(self) -> str:
        return f"{self.metric}_p{self.percentile:g}"

    def __str__(self) -> str:
        return f"{self.name}<{self.threshold_s:g}"


def parse_slo(text: str) -> list[SLOTerm]:
    """`"ttft_p95<0.5, e2e_p99<2s, itl_p90<80ms"` -> terms. Raises SLOError with the offending part."""
    terms: list[SLOTerm] = []
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in parts):
        raise SLOError(f"empty SLO term in {text!r}; expected e.g. 'ttft_p95<0.5,tpot_p99<0.05'")
    for part in parts:
        m = _TERM.match(part.lower())
        if not m:
            raise SLOError(f"bad SLO term {part!r}: expected METRIC_pNN<SECONDS with METRIC one of "
                           f"{', '.join(METRICS)} (e.g. 'ttft_p95<0.5' or 'tpot_p99<50ms')")
        metric, pct, _, value, unit = m.groups()
        p, v = float(pct), float(value) / (1000.0 if unit == "ms" else 1.0)
        if not 0 < p <= 100:
            raise SLOError(f"bad SLO term {part!r}: the percentile must be in (0, 100]")
        if not v > 0 or not math.isfinite(v):
            raise SLOError(f"bad SLO term {part!r}: the threshold must be a positive number of seconds")
        term = SLOTerm(metric, p, v)
        if any(t.name == term.name for t in terms):
            raise SLOError(f"SLO term {term.name} given twice")
        terms.append(term)
    return terms
