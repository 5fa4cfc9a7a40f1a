"""The scheduler's waiting queues: who is admitted next.

- `FcfsQueue`: arrival order; preempted requests go back to the front.
- `PriorityQueue`: one FIFO queue per (priority, tenant). The next request is the
  head of the queue with the best effective priority (priority value minus one
  per `priority_aging_s` waited, so a low class is never starved); among the
  tenants at that priority, the one with the least virtual token counter goes
  first (fair share, `TenantCounters`). Picking looks at queue heads only, so it
  costs O(number of queues), not O(waiting requests).

Both keep a request's place when it is skipped for a step (`push_front`).
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterator

from lockgate.engine.core.request import Request

# VTC charges (Sheng et al., "Fairness in Serving Large Language Models", OSDI 2024): an output
# token costs about twice an input token to serve, so it is charged twice.
PROMPT_WEIGHT = 1.0
OUTPUT_WEIGHT = 2.0


def effective_priority(req: Request, now: float, aging_s: float) -> int:
    """Priority value minus one per `aging_s` seconds since the request entered the scheduler."""
    if aging_s <= 0:
        return req.priority
    return req.priority - math.floor(max(0.0, now - req.enqueue_time) / aging_s)


class TenantCounters:
    """Weighted virtual token counters: the service each tenant got, divided by its weight.

    A tenant that becomes active (no waiting or running request before) is lifted to
    the least counter among active tenants, so idle time is not banked as credit;
    a tenant that used more than its share keeps its debt.
    """

    __slots__ = ("counters", "active")

    def __init__(self) -> None:
        self.counters: dict[str, float] = {}
        self.active: dict[str, int] = {}  # tenant -> its waiting + running requests

    def counter(self, tenant: str) -> float:
        return self.counters.get(tenant, 0.0)

    def activate(self, tenant: str) -> None:
        """A request of `tenant` entered the scheduler."""
        n = self.active.get(tenant, 0)
        if n == 0:
            others = [self.counters.get(t, 0.0) for t in self.active]
            if others:
                self.counters[tenant] = max(self.counter(tenant), min(others))
        self.active[tenant] = n + 1

    def deactivate(self, tenant: str) -> None:
        """A request of `tenant` left the scheduler (finished or aborted)."""
        n = self.active[tenant] - 1
        if n:
            self.active[tenant] = n
        else:
            del self.active[tenant]

    def charge_prompt(self, req: Request, num_tokens: int) -> None:
        self.counters[req.tenant] = self.counter(req.tenant) + PROMPT_WEIGHT * num_tokens / req.tenant_weight

    def charge_output(self, req: Request, num_tokens: int = 1) -> None:
        self.counters[req.tenant] = self.counter(req.tenant) + OUTPUT_WEIGHT * num_tokens / req.tenant_weight


class FcfsQueue:
    """Arrival order; no priority, no fair share."""

    __slots__ = ("_q",)

    def __init__(self) -> None:
        self._q: deque[Request] = deque()

    def push(self, req: Request) -> None:
        self._q.append(req)

    def push_front(self, req: Request) -> None:
        self._q.appendleft(req)

    def peek(self, now: float) -> Request | None:
        return self._q[0] if self._q else None

    def pop(self, req: Request) -> None:
        """Take `req` out (normally the head `peek` returned)."""
        if self._q and self._q[0] is req:
            self._q.popleft()
        else:
            self._q.remove(req)

    remove = pop

    def __len__(self) -> int:
        return len(self._q)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._q)

    def __getitem__(self, i: int) -> Request:
        return self._q[i]


class PriorityQueue:
    """Effective priority first (with aging), then the least-served tenant, FIFO within a tenant."""

    __slots__ = ("_queues", "_len", "aging_s", "counters")

    def __init__(self, aging_s: float, counters: TenantCounters) -> None:
        self._queues: dict[tuple[int, str], deque[Request]] = {}
        self._len = 0
        self.aging_s = aging_s
        self.counters = counters

    def _queue(self, req: Request) -> deque[Request]:
        key = (req.priority, req.tenant)
        q = self._queues.get(key)
        if q is None:
            q = self._queues[key] = deque()
        return q

    def push(self, req: Request) -> None:
        self._queue(req).append(req)
        self._len += 1

    def push_front(self, req: Request) -> None:
        self._queue(req).appendleft(req)
        self._len += 1

    def peek(self, now: float) -> Request | None:
        # A queue's place is its head's: heads are its oldest requests (FIFO; preempted ones,
        # back at the front, keep their original entry time).
        best: Request | None = None
        best_key: tuple[int, float, float, int] | None = None
        for q in self._queues.values():
            head = q[0]
            key = (effective_priority(head, now, self.aging_s), self.counters.counter(head.tenant),
                   head.enqueue_time, head.seq)
            if best_key is None or key < best_key:
                best, best_key = head, key
        return best

    def pop(self, req: Request) -> None:
        key = (req.priority, req.tenant)
        q = self._queues[key]
        if q[0] is req:
            q.popleft()
        else:
            q.remove(req)
        self._len -= 1
        if not q:
            del self._queues[key]

    remove = pop

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Request]:
        """Every waiting request: queues by (priority, tenant counter), FIFO inside (for stats)."""
        order = sorted(self._queues.items(), key=lambda kv: (kv[0][0], self.counters.counter(kv[0][1])))
        for _, q in order:
            yield from q

    def __getitem__(self, i: int) -> Request:
        return list(self)[i]
