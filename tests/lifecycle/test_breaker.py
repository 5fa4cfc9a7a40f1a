"""The circuit breaker's state machine (lifecycle/breaker.py), on a fake clock."""
from __future__ import annotations

import pytest

from lockgate.lifecycle.breaker import CLOSED, HALF_OPEN, OPEN, BreakerBody, BreakerConfig, CircuitBreaker
from lockgate.lifecycle.fallback import chain


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _breaker(**kw: object) -> tuple[CircuitBreaker, Clock, list[tuple[str, str]]]:
    clock, moves = Clock(), []
    b = CircuitBreaker("m@v1", BreakerConfig(**kw), lambda _n, old, new, _why: moves.append((old, new)), clock)
    return b, clock, moves


def test_opens_on_consecutive_failures_skips_then_half_opens_and_closes() -> None:
    b, clock, moves = _breaker(consecutive_failures=3, open_s=5)
    for ok in (False, False, True, False, False):  # a success in between resets the run
        b.record(ok)
    assert b.state == CLOSED
    b.record(False)
    assert b.state == OPEN and not b.allows()
    clock.t += 4.9
    assert not b.allows() and b.acquire() is False  # forced through before the cooldown: no probe
    assert b.state == OPEN
    clock.t += 0.2
    assert b.allows()
    assert b.acquire() is True and b.state == HALF_OPEN
    assert not b.allows()  # one probe at a time
    b.record(True, probe=True)
    assert b.state == CLOSED and b.allows()
    assert moves == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]


def test_a_failed_probe_reopens_and_a_released_probe_frees_its_slot() -> None:
    b, clock, _ = _breaker(consecutive_failures=1, open_s=1, half_open_probes=2)
    b.record(False)
    clock.t += 1.0
    assert b.acquire() and b.acquire() and not b.allows()
    b.release()  # that client left: it said nothing
    assert b.allows()
    b.record(True, probe=True)
    assert b.state == HALF_OPEN  # two successes needed
    b.record(False, probe=True)
    assert b.state == OPEN and not b.allows()


def test_error_rate_over_the_window() -> None:
    b, clock, _ = _breaker(consecutive_failures=100, failure_rate=0.5, min_requests=10, window_s=10)
    for i in range(9):
        b.record(i % 2 == 0)  # 4 of 9 failed
    assert b.state == CLOSED
    clock.t += 11  # all of them leave the window
    for i in range(9):
        b.record(i % 3 == 0)  # 6 of 9 failed, under min_requests
    assert b.state == CLOSED
    b.record(False)
    assert b.state == OPEN and "7/10 failed" in b.last_reason


def test_reset_and_disabled() -> None:
    b, _, _ = _breaker(consecutive_failures=1)
    b.record(False)
    b.reset("restarted")
    assert b.state == CLOSED and b.allows()
    off, _, moves = _breaker(enabled=False, consecutive_failures=1)
    for _ in range(5):
        off.record(False)
    assert off.state == CLOSED and off.allows() and moves == []


@pytest.mark.parametrize("body,err", [({"failure_rate": 0}, "failure_rate"), ({"open_s": -1}, "open_s"),
                                      ({"consecutive_failures": 2**70}, "consecutive_failures"),
                                      ({"colour": 1}, "colour")])
def test_config_bounds(body: dict, err: str) -> None:
    with pytest.raises(Exception, match=err):
        BreakerBody.model_validate(body)


def test_fallback_chain_depth_first_once_each() -> None:
    graph = {"a": ["b", "c"], "b": ["d", "a"], "c": ["d"], "d": []}
    assert chain("a", lambda n: graph[n]) == ["b", "d", "c"]
