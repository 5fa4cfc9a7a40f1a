"""The API process's live view of the engine's queue: what waits, per priority, and how fast it leaves.

A request is queued from submission until its first output. The drain rate
(requests and prompt tokens leaving the queue per second) is measured only under
backlog (another request waiting behind the one that leaves), so it is the
engine's real service rate, whatever limits it (prefill compute, batch slots, KV
blocks), and never a lone request's latency. Admission predicts a new request's
wait from it; nothing here waits on the engine.

Several API workers on shared cores (`--api-workers N`): each core tells each worker what the
others have in it (`PeerLoad`, `set_peers`); their queued requests count here as this
worker's own do, and their cumulative arrivals and first outputs become arrival and departure
events, so every worker's admission sees the whole server's queue and service rate. (Their
requests' arrival times are not known here: priority aging counts only this worker's.)
"""
from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from lockgate.engine.messages import PeerLoad


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
        self.by_priority: dict[int, list[int]] = {}  # this process's: priority -> [requests, prompt tokens]
        # priority -> {key: (entered, requests, tokens)}, in arrival order (for aging)
        self._entries: dict[int, dict[str, tuple[float, int, int]]] = {}
        self._priority_of: dict[str, int] = {}
        self._num_requests = 0
        self._num_tokens = 0
        # Other API workers' queued requests on shared cores: per reporting core, and summed.
        self._peers: dict[object, PeerLoad] = {}
        self._peer_by_priority: dict[int, list[int]] = {}
        self._peer_requests = 0
        self._peer_tokens = 0
        self._busy_since: float | None = None
        self._events: deque[tuple[float, int, int]] = deque()  # departures: (time, requests, tokens)
        self._last: DrainRate | None = None
        self._departures = 0  # under backlog, ever
        self._arrivals: deque[tuple[float, int, int, int]] = deque()  # (time, priority, requests, tokens)
        self._arrived: dict[int, list[int]] = {}  # priority -> [requests, tokens] in _arrivals (O(1) reads)
        self._started = clock()

    @property
    def num_requests(self) -> int:
        """Queued requests (n > 1 counts n): this process's and, with shared cores, the other workers'."""
        return self._num_requests + self._peer_requests

    @property
    def num_tokens(self) -> int:
        return self._num_tokens + self._peer_tokens

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
        self._num_requests += requests
        self._num_tokens += tokens
        self.note_demand(priority, requests, tokens)

    def note_demand(self, priority: int, requests: int, tokens: int) -> None:
        """A request arrived (admitted, or refused: refused demand of a higher class is still
        demand a lower class cannot count on)."""
        now = self.clock()
        self._arrive(now, priority, requests, tokens)
        self._expire_arrivals(now)

    def _arrive(self, now: float, priority: int, requests: int, tokens: int) -> None:
        self._arrivals.append((now, priority, requests, tokens))
        slot = self._arrived.get(priority)
        if slot is None:
            self._arrived[priority] = [requests, tokens]
        else:
            slot[0] += requests
            slot[1] += tokens

    def _expire_arrivals(self, now: float) -> None:
        arrivals, arrived, cutoff = self._arrivals, self._arrived, now - self.window_s
        while arrivals and arrivals[0][0] < cutoff:
            _t, p, r, k = arrivals.popleft()
            slot = arrived[p]
            slot[0] -= r
            slot[1] -= k

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
        self._num_requests -= requests
        self._num_tokens -= tokens
        now = self.clock()
        if served and backlogged:
            self._departed(now, requests, tokens, 1)
        if self.num_requests < self.BACKLOG:
            self._busy_since = None

    def _departed(self, now: float, requests: int, tokens: int, events: int) -> None:
        self._events.append((now, requests, tokens))
        self._departures += events
        rate = self._measure(now)
        if rate is not None:
            self._last = rate

    # ---- other API workers on shared cores ---------------------------------------------------
    def set_peers(self, source: object, peers: PeerLoad) -> None:
        """The other workers' load in one shared core (`source`: that core's client), as it just
        reported it: their queue replaces what it said before; the growth of their cumulative
        arrivals and first outputs since then are arrivals and departures here now (the first
        report is only a baseline)."""
        now = self.clock()
        last = self._peers.get(source)
        backlogged = self._busy_since is not None
        if last is not None:
            d_req, d_tok = peers.departed[0] - last.departed[0], peers.departed[1] - last.departed[1]
            if d_req > 0 and backlogged:
                self._departed(now, d_req, d_tok, d_req)
            for p, (r, t) in peers.arrived.items():
                r0, t0 = last.arrived.get(p, (0, 0))
                if r > r0:
                    self._arrive(now, p, r - r0, t - t0)
            self._expire_arrivals(now)
        before = self.num_requests
        self._shift_peers(last, -1)
        self._peers[source] = peers
        self._shift_peers(peers, 1)
        self._after_peer_change(before, now)

    def drop_peers(self, source: object) -> None:
        """That core is gone (died or detached): its report no longer counts."""
        last = self._peers.pop(source, None)
        if last is not None:
            before = self.num_requests
            self._shift_peers(last, -1)
            self._after_peer_change(before, self.clock())

    @property
    def peer_requests(self) -> int:
        """The other workers' queued requests (0 without shared cores)."""
        return self._peer_requests

    def _shift_peers(self, peers: PeerLoad | None, sign: int) -> None:
        if peers is None:
            return
        table = self._peer_by_priority
        for p, (r, t) in peers.queued.items():
            slot = table.setdefault(p, [0, 0])
            slot[0] += sign * r
            slot[1] += sign * t
            self._peer_requests += sign * r
            self._peer_tokens += sign * t
            if slot[0] <= 0:
                del table[p]

    def _after_peer_change(self, before: int, now: float) -> None:
        after = self.num_requests
        if before < self.BACKLOG <= after:
            self._busy_since = now
            self._events.clear()
        elif after < self.BACKLOG:
            self._busy_since = None

    def ahead(self, priority: int | None, aging_s: float = 0.0, horizon_s: float = 0.0) -> tuple[int, int]:
        """Requests and tokens served before a new request of `priority` (None: all, FCFS): those of
        its priority or better, and lower ones that will have aged up to it within `horizon_s`."""
        if priority is None:
            return self.num_requests, self.num_tokens
        reqs = toks = 0
        for p, (r, t) in self._peer_by_priority.items():  # other workers': no arrival times, no aging
            if p <= priority:
                reqs += r
                toks += t
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
        return (sum(r for p, (r, _t) in self.by_priority.items() if priorities(p))
                + sum(r for p, (r, _t) in self._peer_by_priority.items() if priorities(p)))

    def arrival_rate(self, below: int) -> DrainRate:
        """Requests and tokens arriving per second (admitted or not), over the window, with priority
        value < `below`: the share of the engine that work of a higher class claims first."""
        now = self.clock()
        span = min(self.window_s, now - self._started)
        self._expire_arrivals(now)
        reqs = toks = 0
        for p, (r, k) in self._arrived.items():  # a few priorities, however many arrivals
            if p < below:
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
