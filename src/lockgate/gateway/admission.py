"""Admission: may this request enter the engine now? Decided from the engine's live state, at once.

Three checks, all in memory (a rejection never waits on the engine):
1. the bounded waiting queue, overall and per class (429 `queue_full`);
2. the SLO: the request's wait is predicted from what is queued ahead of it
   (its class and better under the priority policy, everything under FCFS) and
   the queue's measured drain rate, less what higher classes keep taking (their
   recent arrival rate: they will be served first); when that exceeds its
   class's TTFT target the answer is 429 `slo_unattainable` with `Retry-After`;
3. shedding order: while a class is being shed, every lower class is shed too,
   so `batch` goes before `standard` before `interactive`.
A request with nothing ahead of it and no higher class competing is always admitted, so one
oversized request cannot be refused forever.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from lockgate.engine.frontend.queue_view import DrainRate, QueueView
from lockgate.gateway.classes import ClassTable, PriorityClass
from lockgate.errors import APIError

# After a class sheds a request, lower classes are shed for this long.
SHED_HOLD_S = 1.0
# A prediction is a mean and the target a p95: admit only what is predicted well inside it.
TARGET_HEADROOM = 0.6
# Higher classes arrive in bursts: count their recent demand this much above its mean.
HIGHER_DEMAND_MARGIN = 1.25


@dataclass(slots=True)
class QueueBounds:
    max_requests: int
    max_tokens: int


@dataclass(slots=True)
class AdmissionPolicy:
    classes: ClassTable
    slo: bool = True  # predict the wait and shed what cannot meet its class's TTFT target
    fcfs: bool = False  # the engine serves in arrival order: everything queued is ahead
    aging_s: float = 0.0  # the engine's priority aging: lower requests waiting this long per level count too


class Admission:
    def __init__(self, bounds: QueueBounds, queue: QueueView, policy: AdmissionPolicy, on_reject: Callable[[str, str], None],
                 retry_hint_s: Callable[[], float], clock: Callable[[], float] = time.monotonic) -> None:
        self.bounds = bounds
        self.queue = queue
        self.policy = policy
        self.on_reject = on_reject
        self.retry_hint_s = retry_hint_s
        self.clock = clock
        self._shed_until: dict[int, float] = {}  # class rank -> shedding lower classes until
        # Requests that asked, and those refused (cumulative): demand the queue cannot show once shed
        # (the autoscaler's signal).
        self.num_asked = 0
        self.num_refused = 0

    def check(self, num_requests: int, num_tokens: int, cls: PriorityClass | None = None,
              priority: int | None = None) -> None:
        """Raise 429 when `num_requests` more (`num_tokens` prompt tokens) of class `cls`, engine
        priority `priority`, cannot be admitted now."""
        cls = cls or self.policy.classes.default
        priority = cls.rank if priority is None else priority
        self.num_asked += num_requests
        try:
            self._check(num_requests, num_tokens, cls, priority)
        except APIError:
            self.num_refused += num_requests
            self.queue.note_demand(priority, num_requests, num_tokens)  # admitted ones are noted by add()
            raise

    def _check(self, num_requests: int, num_tokens: int, cls: PriorityClass, priority: int) -> None:
        q = self.queue
        if q.num_requests > 0:
            self._check_bounds(num_requests, num_tokens, cls)
        if not self.policy.slo:
            return
        now = self.clock()
        classes = self.policy.classes
        for rank in range(cls.rank):
            if self._shed_until.get(rank, 0.0) > now:
                above = classes.classes[rank].name
                self._reject("slo_unattainable", cls, 1,
                             f"the server is shedding {cls.name!r} requests while {above!r} requests miss their "
                             "latency target; retry after 1 s", shed=False)
        predicted = self._predict(num_requests, num_tokens, cls, priority)
        if predicted is None:
            return  # nothing measured yet (no basis to refuse), or alone: never refused forever
        wait, ahead_req = predicted
        if wait > cls.ttft_s * TARGET_HEADROOM:
            retry = self._retry(wait - cls.ttft_s * TARGET_HEADROOM)
            shown = "more than an hour" if wait > 3600 else f"{wait:.2f} s"
            self._reject("slo_unattainable", cls, retry,
                         f"the server cannot start this {cls.name!r} request within its {cls.ttft_s:g} s target "
                         f"({ahead_req} requests ahead, expected wait {shown}); retry after {retry} s")

    def _predict(self, num_requests: int, num_tokens: int, cls: PriorityClass, priority: int
                 ) -> tuple[float, int] | None:
        """(predicted wait, requests ahead) of `num_requests` more of class `cls` arriving now; None when
        there is no basis (no drain rate measured yet) or nothing is ahead and no higher class competes."""
        q = self.queue
        rate = q.drain_rate()
        if rate is None:
            return None
        ahead_req, ahead_tok = q.ahead(None if self.policy.fcfs else priority, self.policy.aging_s, cls.ttft_s)
        contended = False
        if not self.policy.fcfs:
            # Higher classes that keep arriving are served first: only what they leave drains this queue.
            hi = q.arrival_rate(priority)
            contended = hi.requests_per_s > 0
            m = HIGHER_DEMAND_MARGIN
            rate = DrainRate(max(0.0, rate.requests_per_s - m * hi.requests_per_s),
                             max(0.0, rate.tokens_per_s - m * hi.tokens_per_s))
        if ahead_req == 0 and not contended:
            return None
        return rate.wait_s(ahead_req + num_requests, ahead_tok + num_tokens), ahead_req

    def _check_bounds(self, num_requests: int, num_tokens: int, cls: PriorityClass) -> None:
        q, b = self.queue, self.bounds
        if q.num_requests + num_requests > b.max_requests or q.num_tokens + num_tokens > b.max_tokens:
            retry = self._retry(self.retry_hint_s())
            self._reject("queue_full", cls, retry,
                         f"the server is overloaded: {q.num_requests} requests ({q.num_tokens} prompt tokens) "
                         f"are waiting; retry after {retry} s")
        classes = self.policy.classes
        queued = q.queued(lambda p: classes.of_priority(p) is cls)
        if queued + num_requests > cls.max_queued:
            retry = self._retry(self.retry_hint_s())
            self._reject("queue_full", cls, retry,
                         f"the {cls.name!r} queue is full ({queued} requests waiting); retry after {retry} s")

    @staticmethod
    def _retry(seconds: float) -> int:
        if not math.isfinite(seconds):
            return 60
        return max(1, min(60, math.ceil(seconds)))

    def _reject(self, reason: str, cls: PriorityClass, retry_s: int, message: str, shed: bool = True) -> None:
        if reason == "slo_unattainable" and shed:
            self._shed_until[cls.rank] = self.clock() + SHED_HOLD_S
        self.on_reject(reason, cls.name)
        raise APIError(429, message, code=reason, headers={"Retry-After": str(retry_s)})
