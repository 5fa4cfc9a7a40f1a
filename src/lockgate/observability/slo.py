"""SLO tracking per priority class: attainment, error budget and multi-window burn rates.

A class's objective (`PriorityClass.objective`, e.g. 0.99) is the fraction of its
requests that must be good: completed within the class's TTFT and TPOT targets
(`RequestRecord.slo_good` says which requests count). Over the SLO period
(30 days by default) the error budget is `(1 - objective) * requests` bad
requests; the burn rate of a window is its error rate divided by `1 - objective`
(1.0 spends the budget exactly over the period). Alerts follow Google's SRE
workbook: page when both 1h and 5m burn above 14.4, ticket when both 6h and 30m
burn above 6.

Counts live in memory in two rings of time buckets: one-minute buckets over the
last 6 hours (the burn-rate windows) and coarser ones over the whole period. A
restart starts them empty; Prometheus keeps the long history
(`lockgate:slo_requests_total`).
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from lockgate.gateway.classes import ClassTable, PriorityClass

DEFAULT_PERIOD_S = 30 * 86400.0
FINE_BUCKET_S = 60.0
FINE_SPAN_S = 6 * 3600.0
COARSE_BUCKETS = 720  # the period in this many buckets (30 days: one per hour)
# Burn-rate windows, as Prometheus labels them, in seconds.
WINDOWS: dict[str, float] = {"5m": 300.0, "30m": 1800.0, "1h": 3600.0, "6h": 21600.0}
# (long window, short window, burn-rate threshold): page and ticket, per the SRE workbook.
FAST_BURN = ("1h", "5m", 14.4)
SLOW_BURN = ("6h", "30m", 6.0)


class _Ring:
    """Counts of (all, good) events in fixed-width time buckets, the newest `n` kept."""

    __slots__ = ("width", "n", "stamp", "total", "good")

    def __init__(self, width: float, n: int) -> None:
        self.width = width
        self.n = n
        self.stamp = [-1] * n  # which bucket index each slot holds now
        self.total = [0] * n
        self.good = [0] * n

    def add(self, t: float, good: bool) -> None:
        idx = int(t // self.width)
        slot = idx % self.n
        if self.stamp[slot] != idx:
            self.stamp[slot], self.total[slot], self.good[slot] = idx, 0, 0
        self.total[slot] += 1
        self.good[slot] += good

    def sum(self, now: float, span: float) -> tuple[int, int]:
        """(all, good) in the buckets that overlap the last `span` seconds (the current one included)."""
        last = int(now // self.width)
        k = min(self.n, max(1, math.ceil(span / self.width)))
        total = good = 0
        for idx in range(last - k + 1, last + 1):
            slot = idx % self.n
            if self.stamp[slot] == idx:
                total += self.total[slot]
                good += self.good[slot]
        return total, good


@dataclass(slots=True)
class ClassReport:
    name: str
    objective: float
    ttft_s: float
    tpot_s: float
    requests: int  # SLO events in the period
    good: int
    attainment: float | None  # good / requests; None without requests
    error_budget_remaining: float  # 1.0 untouched, 0.0 spent, negative overspent
    burn_rates: dict[str, float]  # window label -> burn rate
    fast_burn: bool  # page: 1h and 5m both above 14.4
    slow_burn: bool  # ticket: 6h and 30m both above 6

    def to_json(self) -> dict[str, object]:
        return {"class": self.name, "objective": self.objective,
                "targets": {"ttft_s": self.ttft_s, "tpot_s": self.tpot_s},
                "requests": self.requests, "good": self.good, "bad": self.requests - self.good,
                "attainment": self.attainment, "error_budget_remaining": self.error_budget_remaining,
                "burn_rates": self.burn_rates, "alerts": {"fast_burn": self.fast_burn, "slow_burn": self.slow_burn}}


class SloTracker:
    def __init__(self, classes: ClassTable, period_s: float = DEFAULT_PERIOD_S,
                 clock: Callable[[], float] = time.time) -> None:
        if not period_s >= FINE_BUCKET_S:
            raise ValueError(f"the SLO period must be at least {FINE_BUCKET_S:g} s, got {period_s}")
        self.classes = classes
        self.period_s = float(period_s)
        self.clock = clock
        coarse = max(FINE_BUCKET_S, self.period_s / COARSE_BUCKETS)
        self._fine = {c.name: _Ring(FINE_BUCKET_S, int(FINE_SPAN_S // FINE_BUCKET_S) + 1) for c in classes.classes}
        self._coarse = {c.name: _Ring(coarse, math.ceil(self.period_s / coarse) + 1) for c in classes.classes}
        # Cumulative counts since start, for the Prometheus counter.
        self.totals = {c.name: [0, 0] for c in classes.classes}  # [all, good]

    def record(self, cls: str, good: bool) -> None:
        if cls not in self._fine:
            return  # a class unknown to the table (none are: names come from it)
        now = self.clock()
        self._fine[cls].add(now, good)
        self._coarse[cls].add(now, good)
        self.totals[cls][0] += 1
        self.totals[cls][1] += good

    def window(self, cls: str, span_s: float) -> tuple[int, int]:
        """(requests, good) of a class over the last `span_s` seconds (6 h at most: the fine ring)."""
        return self._fine[cls].sum(self.clock(), span_s)

    def burn_rate(self, c: PriorityClass, span_s: float) -> float:
        total, good = self.window(c.name, span_s)
        if total == 0:
            return 0.0
        return ((total - good) / total) / _allowed(c)

    def report(self, c: PriorityClass) -> ClassReport:
        total, good = self._coarse[c.name].sum(self.clock(), self.period_s)
        rates = {label: self.burn_rate(c, span) for label, span in WINDOWS.items()}
        allowed_bad = _allowed(c) * total
        remaining = 1.0 if total == 0 else 1.0 - (total - good) / allowed_bad
        return ClassReport(
            name=c.name, objective=c.objective, ttft_s=c.ttft_s, tpot_s=c.tpot_s, requests=total, good=good,
            attainment=good / total if total else None, error_budget_remaining=remaining, burn_rates=rates,
            fast_burn=_burning(rates, FAST_BURN), slow_burn=_burning(rates, SLOW_BURN))

    def reports(self) -> list[ClassReport]:
        return [self.report(c) for c in self.classes.classes]

    def to_json(self) -> dict[str, object]:
        """`GET /admin/slo` (`/slo` in open mode)."""
        return {"object": "slo", "period_s": self.period_s, "windows": list(WINDOWS),
                "classes": [r.to_json() for r in self.reports()]}


def _allowed(c: PriorityClass) -> float:
    """The allowed error rate; an objective of 1.0 allows none (any error burns 'infinitely': a
    tiny floor keeps the arithmetic finite)."""
    return max(1.0 - c.objective, 1e-9)


def _burning(rates: dict[str, float], rule: tuple[str, str, float]) -> bool:
    long_w, short_w, threshold = rule
    return rates[long_w] > threshold and rates[short_w] > threshold
