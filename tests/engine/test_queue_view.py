"""The API process's queue view: per-priority counts and the drain rate measured under backlog."""
from __future__ import annotations

import math

import pytest

from lockgate.engine.frontend.queue_view import DrainRate, QueueView


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_counts_per_priority_and_ahead() -> None:
    q = QueueView(clock=Clock())
    q.add("a", 0, 1, 10)
    q.add("b", 1, 2, 40)
    q.add("c", 2, 1, 500)
    assert (q.num_requests, q.num_tokens) == (4, 550)
    assert q.ahead(0) == (1, 10)
    assert q.ahead(1) == (3, 50)
    assert q.ahead(None) == (4, 550)  # FCFS: everything is ahead
    assert q.queued(lambda p: p >= 1) == 3
    q.leave("b", served=False)
    assert q.ahead(1) == (1, 10) and 1 not in q.by_priority
    with pytest.raises(ValueError, match="already queued"):
        q.add("a", 2, 1, 1)


def test_drain_rate_is_measured_only_while_backlogged() -> None:
    clock = Clock()
    q = QueueView(window_s=10, clock=clock)
    assert q.drain_rate() is None  # nothing measured: admission has no basis to refuse
    for i in range(6):
        q.add(f"r{i}", 1, 1, 100)
    for i in range(4):  # four requests leave over 2 s, each with others behind it: 2 req/s, 200 tok/s
        clock.t += 0.5
        if i < 3:
            assert q.drain_rate() is None  # too few departures yet to trust a first rate
        q.leave(f"r{i}", served=True)
    r = q.drain_rate()
    assert r is not None
    assert r.requests_per_s == pytest.approx(2.0) and r.tokens_per_s == pytest.approx(200.0)
    # Nothing leaves for 3 more seconds while two still wait: the live rate falls (the last
    # rate, 2/s, weighs as PRIOR_S seconds of evidence).
    clock.t += 3
    prior = QueueView.PRIOR_S
    r = q.drain_rate()
    assert r is not None and r.requests_per_s == pytest.approx((4 + 2 * prior) / (5 + prior))
    q.leave("r4", served=True)
    # One request left: no backlog; the last measured rate is kept for the next busy period.
    clock.t += 1000
    last = q.drain_rate()
    assert last is not None and last.requests_per_s == pytest.approx((5 + 2 * prior) / (5 + prior))
    q.leave("r5", served=True)  # a lone request's departure is its latency, not throughput
    assert q.drain_rate() == last
    q.add("n", 0, 1, 10)
    q.add("m", 0, 1, 10)  # a new backlog: nothing measured yet, the last rate stands
    assert q.drain_rate() == last
    # A stall: nothing leaves for a minute; the rate falls to the floor PRIOR_S / (window + PRIOR_S) of it.
    clock.t += 60
    stalled = q.drain_rate()
    assert stalled is not None and stalled.requests_per_s == pytest.approx(last.requests_per_s * prior / (10 + prior))


def test_aborted_requests_are_not_departures() -> None:
    clock = Clock()
    q = QueueView(clock=clock)
    for i in range(4):
        q.add(f"r{i}", 0, 1, 10)
    clock.t += 2
    for i in range(3):
        q.leave(f"r{i}", served=False)
    assert q.drain_rate() is None  # cancelled requests say nothing about service


def test_wait_is_the_slower_bound() -> None:
    r = DrainRate(requests_per_s=2.0, tokens_per_s=100.0)
    assert r.wait_s(4, 100) == pytest.approx(2.0)  # slots bind
    assert r.wait_s(1, 1000) == pytest.approx(10.0)  # prefill binds
    assert r.wait_s(0, 0) == 0.0
    assert DrainRate(0.0, 0.0).wait_s(1, 1) == math.inf


def test_lower_requests_that_aged_count_as_ahead() -> None:
    clock = Clock()
    q = QueueView(clock=clock)
    q.add("old-batch", 2, 1, 300)
    clock.t += 25
    q.add("new-batch", 2, 1, 300)
    q.add("std", 1, 1, 50)
    assert q.ahead(1) == (1, 50)  # no aging: only its priority and better
    assert q.ahead(1, aging_s=10) == (2, 350)  # the old batch request aged one level (>= 10 s)
    assert q.ahead(0, aging_s=10) == (1, 300)  # and two levels (>= 20 s): ahead of interactive too
    assert q.ahead(0, aging_s=20) == (0, 0)


def test_arrival_rate_of_higher_classes() -> None:
    clock = Clock()
    q = QueueView(window_s=10, clock=clock)
    for i in range(20):
        clock.t += 0.5
        q.add(f"i{i}", 0, 1, 10)
        q.add(f"b{i}", 2, 1, 100)
    r = q.arrival_rate(2)  # what batch must leave to better classes: interactive's 2/s
    assert r.requests_per_s == pytest.approx(2.0, rel=0.06) and r.tokens_per_s == pytest.approx(20.0, rel=0.06)
    assert q.arrival_rate(0).requests_per_s == 0.0
