"""Lease: everything taken is given back exactly once, newest first, whatever fails."""
from __future__ import annotations

import pytest

from lockgate.gateway.lease import FAULT_POINTS, InjectedFault, Lease


def test_release_runs_each_once_newest_first_with_the_outcome() -> None:
    lease = Lease()
    calls: list[tuple[str, str]] = []
    lease.hold(lambda o: calls.append(("a", o)))
    lease.hold(lambda o: calls.append(("b", o)))
    lease.release("internal")
    lease.release("aborted")  # idempotent
    assert calls == [("b", "internal"), ("a", "internal")]
    assert lease.released and lease.outcome == "internal"


def test_a_failing_release_does_not_stop_the_others() -> None:
    lease = Lease()
    calls: list[str] = []
    lease.hold(lambda o: calls.append("first"))
    lease.hold(lambda o: (_ for _ in ()).throw(RuntimeError("boom")))
    lease.hold(lambda o: calls.append("last"))
    lease.release()
    assert calls == ["last", "first"]


def test_hold_after_release_gives_back_at_once() -> None:
    lease = Lease()
    lease.release("rejected")
    got: list[str] = []
    lease.hold(got.append)
    assert got == ["rejected"]


def test_checkpoint_raises_only_at_the_named_point() -> None:
    for point in FAULT_POINTS:
        lease = Lease(fault=point)
        for other in FAULT_POINTS:
            if other != point:
                lease.checkpoint(other)
        with pytest.raises(InjectedFault, match=point):
            lease.checkpoint(point)
    Lease().checkpoint("submit")  # no fault configured: never raises
