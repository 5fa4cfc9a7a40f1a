"""The API process's live view of the engine's queue: what waits, per priority, and how fast it leaves.

A request is queued from submission until its first output. The drain rate
(requests and prompt tokens leaving the queue per second) is measured only under
backlog (another request waiting behind the one that leaves), so it is the
engine's real service rate, whatever limits it (prefill compute, batch slots, KV
blocks), and never a lone request's latency. Admission predicts a new request's
wait from it; nothing here waits on the engine.
"""
from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class DrainRate:
    requests_per_s: float
    tokens_per_s: float

    def wait_s(self, requests: int, tokens: int) -> float:
        """Seconds until `requests` (`tokens` prompt tokens) have left the queue; the slower bound."""
        by_req = requests / self.requests_per_s if self.requests_per_s > 0 else math.inf
        by_tok = tokens / self.tokens_per_s if self.tokens_per_s > 0 else math.inf
        return max(by_req, by_tok) if requests > 0 else 0.0


class QueueView:
    BACKLOG = 2  # queued requests that make a backlog: a departure then shows throughput
    MIN_EVENTS = 4  # departures under backlog before the first rate is trusted
    MIN_SPAN_S = 1.0  # ... and a quarter of this much backlogged time
    PRIOR_S = 2.0  # the last rate weighs as much as this many seconds of new measurement

    def __init__(self, window_s: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.clock = clock
        self.by_priority: dict[int, list[int]] = {}  # priority -> [requests, prompt tokens]
        # priority -> {key: (entered, requests, tokens)}, in arrival order (for aging)
        self._entries: dict[int, dict[str, tuple[float, int, int]]] = {}
        self._priority_of: dict[str, int] = {}
        self.num_requests = 0
        self.num_tokens = 0
        self._busy_since: float | None = None
        self._events: deque[tuple[float, int, int]] = deque()  # departures: (time, requests, tokens)
        self._last: DrainRate | None = None
        self._departures = 0  # under backlog, ever
        self._arrivals: deque[tuple[float, int, int, int]] = deque()  # (time, priority, requests, tokens)
        self._started = clock()

    def add(self, key: str, priority: int, requests: int, tokens: int) -> None:
        now = self.clock()
        if key in self._priority_of:
            raise ValueError(f"{key!r} is already queued")
        self._priority_of[key] = priority
        self._entries.setdefault(priority, {})[key] = (now, requests, tokens)
        if self.num_requests < self.BACKLOG <= self.num_requests + requests:
            self._busy_since = now
            self._events.clear()
        slot = self.by_priority.setdefault(priority, [0, 0])
        slot[0] += requests
        slot[1] += tokens
        self.num_requests += requests
        self.num_tokens += tokens
        self.note_demand(priority, requests, tokens)

    def note_demand(self, priority: int, requests: int, tokens: int) -> None:
        """A request arrived (admitted, or refused: refused demand of a higher class is still
        demand a lower class cannot count on)."""
        now = self.clock()
        self._arrivals.append((now, priority, requests, tokens))
        while self._arrivals[0][0] < now - self.window_s:
            self._arrivals.popleft()

    def leave(self, key: str, served: bool) -> None:
        """`served`: it got its first output (a departure); otherwise aborted or failed while queued."""
        priority = self._priority_of.pop(key)
        entries = self._entries[priority]
        _t, requests, tokens = entries.pop(key)
        if not entries:
            del self._entries[priority]
        slot = self.by_priority[priority]
        slot[0] -= requests
        slot[1] -= tokens
        if slot[0] == 0:
            del self.by_priority[priority]
        backlogged = self._busy_since is not None
        self.num_requests -= requests
        self.num_tokens -= tokens
        now = self.clock()
        if served and backlogged:
            self._events.append((now, requests, tokens))
            self._departures += 1
            rate = self._measure(now)
            if rate is not None:
                self._last = rate
        if self.num_requests < self.BACKLOG:
            self._busy_since = None

    def ahead(self, priority: int | None, aging_s: float = 0.0, horizon_s: float = 0.0) -> tuple[int, int]:
        """Requests and tokens served before a new request of `priority` (None: all, FCFS): those of
        its priority or better, and lower ones that will have aged up to it within `horizon_s`."""
        if priority is None:
            return self.num_requests, self.num_tokens
        reqs = toks = 0
        now = self.clock()
        for p, (r, t) in self.by_priority.items():
            if p <= priority:
                reqs += r
                toks += t
            elif aging_s > 0:
                cutoff = now + horizon_s - aging_s * (p - priority)
                for entered, r1, t1 in self._entries[p].values():  # arrival order: stop at the first young one
                    if entered > cutoff:
                        break
                    reqs += r1
                    toks += t1
        return reqs, toks

    def queued(self, priorities: Callable[[int], bool]) -> int:
        return sum(r for p, (r, _t) in self.by_priority.items() if priorities(p))

    def arrival_rate(self, below: int) -> DrainRate:
        """Requests and tokens arriving per second (admitted or not), over the window, with priority
        value < `below`: the share of the engine that work of a higher class claims first."""
        now = self.clock()
        span = min(self.window_s, now - self._started)
        reqs = toks = 0
        for t, p, r, k in self._arrivals:
            if p < below and t >= now - self.window_s:
                reqs += r
                toks += k
        if span <= 0:
            return DrainRate(0.0, 0.0)
        return DrainRate(reqs / span, toks / span)

    def drain_rate(self) -> DrainRate | None:
        """The current rate while backlogged, else the last one measured; None before any."""
        if self._busy_since is not None:
            rate = self._measure(self.clock())
            if rate is not None:
                return rate
        return self._last

    def _measure(self, now: float) -> DrainRate | None:
        """Departures per second over the backlogged part of the window. The last rate counts as
        PRIOR_S seconds of evidence, so a busy period's first moments neither trust a lucky burst
        nor read "nothing left yet" as a dead engine; a real stall still drives the rate down."""
        if self._busy_since is None:
            return None
        start = max(self._busy_since, now - self.window_s)
        while self._events and self._events[0][0] < start:
            self._events.popleft()
        span = max(now - start, 0.0)
        reqs = sum(e[1] for e in self._events)
        toks = sum(e[2] for e in self._events)
        last = self._last
        if last is None:
            if self._departures < self.MIN_EVENTS or span < self.MIN_SPAN_S / 4:
                return None
            return DrainRate(reqs / span, toks / span)
        t = span + self.PRIOR_S
        return DrainRate((reqs + last.requests_per_s * self.PRIOR_S) / t,
                         (toks + last.tokens_per_s * self.PRIOR_S) / t)
