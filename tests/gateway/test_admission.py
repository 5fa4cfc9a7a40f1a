"""Admission: queue bounds, per-class caps, SLO prediction and shedding order (fake clock, no engine)."""
from __future__ import annotations

import pytest

from lockgate.engine.frontend.queue_view import QueueView
from lockgate.gateway.admission import SHED_HOLD_S, Admission, AdmissionPolicy, QueueBounds
from lockgate.gateway.classes import ClassTable, PriorityClass
from lockgate.server.errors import APIError

CLASSES = ClassTable((
    PriorityClass("interactive", 0, ttft_s=1.0, tpot_s=0.1, max_queued=3),
    PriorityClass("standard", 1, ttft_s=4.0, tpot_s=0.2, max_queued=100),
    PriorityClass("batch", 2, ttft_s=30.0, tpot_s=1.0, max_queued=100),
))
I, S, B = CLASSES.classes


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def make(fcfs: bool = False, slo: bool = True, bounds: QueueBounds | None = None):  # noqa: ANN201
    clock = Clock()
    q = QueueView(clock=clock)
    rejected: list[tuple[str, str]] = []
    adm = Admission(bounds or QueueBounds(1000, 10**9), q, AdmissionPolicy(CLASSES, slo=slo, fcfs=fcfs),
                    lambda reason, cls: rejected.append((reason, cls)), lambda: 2.0, clock=clock)
    return adm, q, clock, rejected


def warm(q: QueueView, clock: Clock, rate_per_s: float, priority: int = 1) -> None:
    """Measure a drain rate of `rate_per_s` requests (100 tokens each) per second, then empty the queue."""
    keys = [f"warm{_next()}" for _ in range(5)]
    for k in keys:
        q.add(k, priority, 1, 100)
    for k in keys:
        clock.t += 1 / rate_per_s
        q.leave(k, served=True)


_counter = [0]


def _next() -> int:
    _counter[0] += 1
    return _counter[0]


def add(q: QueueView, priority: int, tokens: int = 100) -> str:
    k = f"r{_next()}"
    q.add(k, priority, 1, tokens)
    return k


def reject(adm: Admission, *args: object) -> APIError:
    with pytest.raises(APIError) as e:
        adm.check(*args)  # type: ignore[arg-type]
    return e.value


def test_empty_queue_always_admits_even_a_huge_request() -> None:
    adm, q, clock, rejected = make()
    warm(q, clock, 1.0)
    adm.check(1, 10**6, I, 0)
    assert rejected == []


def test_no_measured_rate_admits() -> None:
    adm, q, _clock, rejected = make()
    for _ in range(50):
        add(q, 0, 100)
    adm.check(1, 100, S, 1)  # nothing ever left the queue: no basis to refuse
    assert rejected == []


def test_slo_unattainable_with_retry_after_and_counted_by_class() -> None:
    adm, q, clock, rejected = make()
    warm(q, clock, 2.0)  # 2 requests/s, 200 tokens/s
    std = [add(q, 1, 100) for _ in range(10)]  # 10 standard requests ahead: a new one waits about 5.5 s > 4 s
    e = reject(adm, 1, 100, S, 1)
    assert e.status == 429 and e.code == "slo_unattainable"
    assert "'standard'" in e.message and "4 s target" in e.message and "10 requests ahead" in e.message
    assert e.headers["Retry-After"] == "4"  # ceil(5.5 - 0.6 * 4): admitted only well inside the target
    assert rejected == [("slo_unattainable", "standard")]
    # Only its class and better are ahead under the priority policy: interactive is admitted.
    adm.check(1, 100, I, 0)
    # A batch request has a 30 s target, but standard is being shed: batch goes first (shedding order).
    e = reject(adm, 1, 100, B, 2)
    assert e.code == "slo_unattainable" and "shedding 'batch'" in e.message
    assert rejected[-1] == ("slo_unattainable", "batch")
    clock.t += SHED_HOLD_S + 0.01
    for k in std:  # the standard backlog drains at 2/s
        clock.t += 0.5
        q.leave(k, served=True)
    clock.t += 10  # standard stopped arriving: no longer takes batch's share
    add(q, 2, 100)
    adm.check(1, 100, B, 2)  # the hold is over and batch's 30 s target is within reach


def test_higher_classes_arriving_take_their_share_first() -> None:
    adm, q, clock, _ = make()
    warm(q, clock, 4.0, priority=2)  # the engine drains 4 requests/s
    for _ in range(3):
        add(q, 2, 100)  # three batch requests wait
    adm.check(1, 100, S, 1)  # standard would wait ~1 s: fine
    e_free = None
    try:
        adm.check(1, 100, B, 2)  # batch: 4 ahead at 4/s, 1 s < 30 s
    except Exception as exc:  # noqa: BLE001
        e_free = exc
    assert e_free is None
    # Interactive requests now arrive at 3.6/s (and are served at once): batch keeps only 0.4/s.
    for _ in range(36):
        clock.t += 1 / 3.6
        q.leave(add(q, 0, 100), served=True)
    e = reject(adm, 1, 100, B, 2)
    assert e.code == "slo_unattainable" and "'batch'" in e.message
    adm.check(1, 100, I, 0)  # nothing of a higher class takes interactive's share


def test_fcfs_counts_every_class_ahead() -> None:
    adm, q, clock, _ = make(fcfs=True)
    warm(q, clock, 2.0)
    for _ in range(10):
        add(q, 2, 100)  # batch requests queued first are served first under FCFS
    e = reject(adm, 1, 100, I, 0)
    assert e.code == "slo_unattainable" and "'interactive'" in e.message
    adm2, q2, clock2, _ = make(fcfs=False)
    warm(q2, clock2, 2.0)
    for _ in range(10):
        add(q2, 2, 100)
    adm2.check(1, 100, I, 0)  # the priority policy serves interactive before the batch backlog


def test_slo_admission_off_only_bounds_the_queue() -> None:
    adm, q, clock, rejected = make(slo=False, bounds=QueueBounds(5, 10**9))
    warm(q, clock, 0.1)
    for _ in range(4):
        add(q, 1, 100)
    adm.check(1, 100, S, 1)  # a 50 s wait, but no SLO admission
    add(q, 1, 100)
    e = reject(adm, 1, 100, S, 1)
    assert e.code == "queue_full" and e.headers["Retry-After"] == "2" and "5 requests" in e.message
    assert rejected == [("queue_full", "standard")]


def test_per_class_queue_cap() -> None:
    adm, q, clock, rejected = make(slo=False)
    for _ in range(3):
        add(q, 0, 10)
    e = reject(adm, 1, 10, I, 0)
    assert e.code == "queue_full" and "'interactive' queue is full" in e.message
    adm.check(1, 10, S, 1)  # other classes have their own caps
    assert rejected == [("queue_full", "interactive")]


def test_a_stalled_queue_refuses_everything_that_must_wait() -> None:
    adm, q, clock, _ = make()
    warm(q, clock, 10.0)
    add(q, 0, 100)
    clock.t += 60  # nothing has left for a minute: the live rate is near zero
    add(q, 0, 100)
    clock.t += 60
    e = reject(adm, 1, 100, I, 0)
    assert e.code == "slo_unattainable" and 1 <= int(e.headers["Retry-After"]) <= 60


def test_lone_requests_are_no_basis_to_refuse() -> None:
    """A server's first requests (a warm-up, one at a time) measure latency, not throughput: a
    regression where a 1-token warm-up made the next real prompt look unservable."""
    adm, q, clock, rejected = make()
    for i in range(3):  # one at a time, each alone in the queue
        k = add(q, 0, 1)
        clock.t += 0.5
        q.leave(k, served=True)
    assert q.drain_rate() is None
    add(q, 1, 30)
    add(q, 1, 30)
    adm.check(1, 30, S, 1)
    adm.check(1, 3000, B, 2)
    assert rejected == []


def test_refusals_are_counted_for_the_autoscaler() -> None:
    adm, q, clock, _ = make()
    warm(q, clock, rate_per_s=2.0)
    for _ in range(3):
        add(q, 1)
    asked, refused = adm.num_asked, adm.num_refused
    adm.check(1, 100, S)  # 4 ahead at 2 requests/s: 2 s < 0.6 x 4 s, admitted
    for _ in range(5):
        add(q, 1)
    with pytest.raises(APIError):
        adm.check(2, 200, S)
    assert (adm.num_asked - asked, adm.num_refused - refused) == (3, 2)
