"""Hedged requests' delay and budget (lifecycle/hedge.py) and the race of two copies."""
from __future__ import annotations

import asyncio

import pytest

from lockgate.lifecycle.hedge import MIN_SAMPLES, Hedger, first_of


def test_delay_is_the_class_target_until_enough_answers_then_their_p95() -> None:
    h = Hedger()
    assert h.delay_s("standard", 2.0) == 2.0
    for i in range(MIN_SAMPLES - 1):
        h.observe_ttft("standard", 0.1)
    assert h.delay_s("standard", 2.0) == 2.0
    for i in range(81):
        h.observe_ttft("standard", 0.01 * (i % 100))
    assert h.delay_s("standard", 2.0) == pytest.approx(0.76, abs=0.01)
    assert h.delay_s("batch", 30.0) == 30.0  # per class


def test_budget_caps_hedges_at_a_share_of_requests() -> None:
    h = Hedger(budget=0.05, credit=0.0)
    sent = 0
    for _ in range(1000):
        h.note_request()
        if h.take():  # every request wants one: at most 5% get it
            sent += 1
    assert sent == 50 and h.sent == 50 and h.skipped == 950
    saved = Hedger(budget=0.5, credit=0.0)
    for _ in range(1000):
        saved.note_request()
    assert sum(saved.take() for _ in range(20)) == 10  # at most 10 saved up for a burst
    assert not Hedger(budget=0.0).take()


class _Stream:
    """A stand-in with FleetStream's `peek`: its first output after `after` s, or an error."""

    def __init__(self, after: float, fail: bool = False) -> None:
        self.after, self.fail = after, fail

    async def peek(self, _timeout: float | None) -> bool:
        await asyncio.sleep(self.after)
        if self.fail:
            raise RuntimeError("engine dead")
        return True


def test_first_of_the_faster_copy_wins_and_a_failed_copy_leaves_it_to_the_other() -> None:
    slow, fast = _Stream(0.2), _Stream(0.01)
    assert asyncio.run(first_of(slow, fast)) == (fast, slow)
    dead, late = _Stream(0.0, fail=True), _Stream(0.05)
    assert asyncio.run(first_of(dead, late)) == (late, dead)
    with pytest.raises(RuntimeError, match="engine dead"):
        asyncio.run(first_of(_Stream(0.0, fail=True), _Stream(0.01, fail=True)))
