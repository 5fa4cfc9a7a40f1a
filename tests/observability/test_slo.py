"""SLO arithmetic on synthetic events with a fake clock: windows, attainment, budget, burn rates."""
from __future__ import annotations

import pytest

from lockgate.gateway.classes import ClassTable, PriorityClass
from lockgate.observability.slo import SloTracker

HOUR = 3600.0


class Clock:
    def __init__(self, t: float = 1_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _table() -> ClassTable:
    return ClassTable([PriorityClass("interactive", 0, ttft_s=0.5, tpot_s=0.1, max_queued=8, objective=0.99),
                       PriorityClass("standard", 1, ttft_s=2.0, tpot_s=0.2, max_queued=8, objective=0.9)],
                      default="standard")


def _feed(slo: SloTracker, cls: str, good: int, bad: int) -> None:
    for _ in range(good):
        slo.record(cls, True)
    for _ in range(bad):
        slo.record(cls, False)


def test_burn_rate_is_error_rate_over_the_allowed_error_rate() -> None:
    clock = Clock()
    slo = SloTracker(_table(), period_s=30 * 86400, clock=clock)
    std = slo.classes.get("standard")
    assert std is not None
    _feed(slo, "standard", good=80, bad=20)  # 20 % errors against 10 % allowed: burning twice as fast
    assert slo.burn_rate(std, 300) == pytest.approx(2.0)
    rep = slo.report(std)
    assert (rep.requests, rep.good, rep.attainment) == (100, 80, pytest.approx(0.8))
    assert rep.error_budget_remaining == pytest.approx(1 - 20 / 10)  # overspent: -1
    assert rep.burn_rates == {w: pytest.approx(2.0) for w in ("5m", "30m", "1h", "6h")}
    # Nothing recorded for the other class: no burn, untouched budget, no attainment.
    inter = slo.report(slo.classes.classes[0])
    assert (inter.requests, inter.attainment, inter.error_budget_remaining) == (0, None, 1.0)
    assert set(inter.burn_rates.values()) == {0.0}


def test_windows_forget_old_events() -> None:
    clock = Clock()
    slo = SloTracker(_table(), clock=clock)
    inter = slo.classes.get("interactive")
    assert inter is not None
    _feed(slo, "interactive", good=90, bad=10)  # an incident: 10 % errors, 10x the allowed 1 %
    clock.t += 2 * HOUR  # two quiet hours, then a healthy hour
    _feed(slo, "interactive", good=100, bad=0)
    rates = slo.report(inter).burn_rates
    assert rates["5m"] == rates["30m"] == rates["1h"] == 0.0  # the incident is out of the short windows
    assert rates["6h"] == pytest.approx((10 / 200) / 0.01)  # still in the 6 h one: 5x
    clock.t += 7 * HOUR
    assert slo.report(inter).burn_rates["6h"] == 0.0
    rep = slo.report(inter)  # the 30-day period still holds everything
    assert (rep.requests, rep.good) == (200, 190)
    assert rep.error_budget_remaining == pytest.approx(1 - 10 / (0.01 * 200))  # 10 bad of 2 allowed: -4


def test_short_window_spans_whole_minutes() -> None:
    clock = Clock(600.0)  # at a minute boundary
    slo = SloTracker(_table(), clock=clock)
    std = slo.classes.get("standard")
    assert std is not None
    _feed(slo, "standard", good=0, bad=3)
    clock.t += 299  # still inside the 5 buckets of the 5m window
    assert slo.window("standard", 300) == (3, 0)
    clock.t += 1  # the first bucket leaves it
    assert slo.window("standard", 300) == (0, 0)
    assert slo.window("standard", 1800) == (3, 0)


def test_period_budget_rolls_over() -> None:
    clock = Clock()
    slo = SloTracker(_table(), period_s=86400, clock=clock)
    std = slo.classes.get("standard")
    assert std is not None
    _feed(slo, "standard", good=5, bad=5)
    assert slo.report(std).requests == 10
    clock.t += 86400 + 3600  # a day and an hour later: out of the period
    _feed(slo, "standard", good=10, bad=0)
    rep = slo.report(std)
    assert (rep.requests, rep.good, rep.attainment, rep.error_budget_remaining) == (10, 10, 1.0, 1.0)


def test_multi_window_alerts() -> None:
    clock = Clock()
    slo = SloTracker(_table(), clock=clock)
    inter = slo.classes.get("interactive")
    assert inter is not None
    # An hour at 10 % errors: burn 10 in every window; not above 14.4 (no page), above 6 (ticket).
    for _ in range(12):
        _feed(slo, "interactive", good=9, bad=1)
        clock.t += 300
    rep = slo.report(inter)
    assert not rep.fast_burn and rep.slow_burn
    # Then a hard outage in the last minutes: 5m and 1h both above 14.4.
    _feed(slo, "interactive", good=0, bad=200)
    rep = slo.report(inter)
    assert rep.burn_rates["5m"] == pytest.approx(100.0) and rep.burn_rates["1h"] > 14.4
    assert rep.fast_burn and rep.slow_burn
    j = slo.to_json()
    entry = next(c for c in j["classes"] if c["class"] == "interactive")  # type: ignore[union-attr]
    assert entry["alerts"] == {"fast_burn": True, "slow_burn": True} and entry["bad"] == 212


def test_counts_since_start_and_unknown_classes() -> None:
    slo = SloTracker(_table(), clock=Clock())
    _feed(slo, "standard", good=3, bad=1)
    slo.record("nope", False)  # not in the table: ignored
    assert slo.totals == {"interactive": [0, 0], "standard": [4, 3]}
    with pytest.raises(ValueError, match="period"):
        SloTracker(_table(), period_s=10)
