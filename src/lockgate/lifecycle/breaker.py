"""`CircuitBreaker`: stop sending requests to a model version or replica that keeps failing.

Closed (normal) -> open when, within the last `window_s`, `consecutive_failures` requests failed
in a row, or at least `min_requests` ended and `failure_rate` of them failed. Open: routing skips
it at no cost (no request waits on it). After `open_s` it lets `half_open_probes` requests through
(half-open); if they all succeed it closes, if one fails it opens again. Only failures that say
something about the engine count (`engine_dead`, `engine_unavailable`, `internal`, a first token
that never came): a client that left or a request refused by admission says nothing.

Every transition is logged and reported through `on_change` (metrics).
"""
from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger("lockgate.lifecycle")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
STATE_VALUES = {CLOSED: 0, OPEN: 1, HALF_OPEN: 2}  # the metric's encoding


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    enabled: bool = True
    consecutive_failures: int = 5
    failure_rate: float = 0.5
    min_requests: int = 20
    window_s: float = 30.0
    open_s: float = 10.0
    half_open_probes: int = 1

    def to_json(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "consecutive_failures": self.consecutive_failures,
                "failure_rate": self.failure_rate, "min_requests": self.min_requests, "window_s": self.window_s,
                "open_s": self.open_s, "half_open_probes": self.half_open_probes}


class BreakerBody(BaseModel):
    """`breaker:` of a model in the models config (every field optional)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    enabled: bool = True
    consecutive_failures: Annotated[int, Field(ge=1, le=10_000)] = 5
    failure_rate: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] = 0.5
    min_requests: Annotated[int, Field(ge=1, le=1_000_000)] = 20
    window_s: Annotated[float, Field(gt=0, le=86_400, allow_inf_nan=False)] = 30.0
    open_s: Annotated[float, Field(gt=0, le=86_400, allow_inf_nan=False)] = 10.0
    half_open_probes: Annotated[int, Field(ge=1, le=1000)] = 1

    def config(self) -> BreakerConfig:
        return BreakerConfig(**self.model_dump())


OnChange = Callable[[str, str, str, str], None]  # (name, old state, new state, why)


class CircuitBreaker:
    __slots__ = ("name", "config", "state", "clock", "on_change", "_events", "_consecutive", "_opened_at",
                 "_probes", "_probe_ok", "transitions", "last_reason")

    def __init__(self, name: str, config: BreakerConfig, on_change: OnChange | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name  # NAME@VERSION or NAME@VERSION/INDEX, in logs and metrics
        self.config = config
        self.state = CLOSED
        self.clock = clock
        self.on_change = on_change
        self._events: deque[tuple[float, bool]] = deque()  # (when, ok) within the window
        self._consecutive = 0
        self._opened_at = 0.0
        self._probes = 0  # half-open requests let through and not yet ended
        self._probe_ok = 0
        self.transitions = 0
        self.last_reason = ""

    # ---- routing ------------------------------------------------------------------------
    def allows(self) -> bool:
        """Whether routing may pick this now (no side effect: `acquire` the one picked)."""
        if not self.config.enabled or self.state == CLOSED:
            return True
        if self.state == OPEN:
            return self.clock() - self._opened_at >= self.config.open_s
        return self._probes < self.config.half_open_probes

    def acquire(self) -> bool:
        """The request routed here: True when it is a half-open probe (its end must be recorded,
        or `release`d when it says nothing)."""
        if not self.config.enabled or self.state == CLOSED:
            return False
        if self.state == OPEN:
            if self.clock() - self._opened_at < self.config.open_s:
                return False  # routed here anyway: nowhere else to go
            self._move(HALF_OPEN, f"{self.config.open_s:g} s open: probing")
            self._probe_ok = 0
        if self._probes >= self.config.half_open_probes:
            return False  # routed here anyway: nowhere else to go
        self._probes += 1
        return True

    def release(self) -> None:
        """A probe ended without saying anything (the client left): its slot is free again."""
        if self.state == HALF_OPEN and self._probes > 0:
            self._probes -= 1

    def reset(self, why: str) -> None:
        """Closed with a clean window (a restarted engine core is not the one that failed)."""
        self._events.clear()
        self._consecutive = 0
        self._probes = 0
        if self.state != CLOSED:
            self._move(CLOSED, why)

    # ---- outcomes -----------------------------------------------------------------------
    def record(self, ok: bool, probe: bool = False) -> None:
        if not self.config.enabled:
            return
        now = self.clock()
        if self.state == HALF_OPEN:
            if probe and self._probes > 0:
                self._probes -= 1
            if not ok:
                self._open(now, "a half-open probe failed")
                return
            if probe:
                self._probe_ok += 1
                if self._probe_ok >= self.config.half_open_probes:
                    self._events.clear()
                    self._consecutive = 0
                    self._move(CLOSED, f"{self._probe_ok} probe(s) succeeded")
            return
        if self.state == OPEN:
            return  # a request routed before it opened: already judged
        self._events.append((now, ok))
        self._trim(now)
        self._consecutive = 0 if ok else self._consecutive + 1
        c = self.config
        if self._consecutive >= c.consecutive_failures:
            self._open(now, f"{self._consecutive} consecutive failures")
            return
        n = len(self._events)
        if n >= c.min_requests:
            failed = sum(1 for _, good in self._events if not good)
            if failed / n >= c.failure_rate:
                self._open(now, f"{failed}/{n} failed in the last {c.window_s:g} s")

    def _trim(self, now: float) -> None:
        horizon = now - self.config.window_s
        while self._events and self._events[0][0] < horizon:
            self._events.popleft()

    def _open(self, now: float, why: str) -> None:
        self._opened_at = now
        self._probes = 0
        self._probe_ok = 0
        self._move(OPEN, why)

    def _move(self, new: str, why: str) -> None:
        old, self.state = self.state, new
        self.transitions += 1
        self.last_reason = why
        log.warning("circuit breaker %s: %s -> %s (%s)", self.name, old, new, why)
        if self.on_change is not None:
            self.on_change(self.name, old, new, why)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"state": self.state, "transitions": self.transitions,
                               "reason": self.last_reason or None}
        if self.state == OPEN:
            out["reopens_in_s"] = round(max(0.0, self.config.open_s - (self.clock() - self._opened_at)), 3)
        return out
