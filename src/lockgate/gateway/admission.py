"""Admission: may this request enter the engine now? Decided from the engine's live state.

Today: the bounded waiting queue (requests and prompt tokens with no output yet);
a full queue answers 429 with `Retry-After` at once, never after a wait. An
empty queue always admits, so one oversized request cannot be refused forever.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from lockgate.engine.client import EngineState
from lockgate.server.errors import APIError


@dataclass(slots=True)
class QueueBounds:
    max_requests: int
    max_tokens: int


class Admission:
    def __init__(self, bounds: QueueBounds, state: Callable[[], EngineState],
                 on_reject: Callable[[str], None], retry_hint_s: Callable[[], float]) -> None:
        self.bounds = bounds
        self.state = state
        self.on_reject = on_reject
        self.retry_hint_s = retry_hint_s

    def check(self, num_requests: int, num_tokens: int) -> None:
        """Raise 429 when the waiting queue cannot take `num_requests` more (`num_tokens` prompt tokens)."""
        s = self.state()
        if s.num_queued_requests == 0:
            return
        b = self.bounds
        if s.num_queued_requests + num_requests > b.max_requests or s.num_queued_tokens + num_tokens > b.max_tokens:
            self.on_reject("queue_full")
            retry = max(1, min(60, math.ceil(self.retry_hint_s())))
            raise APIError(
                429,
                f"the server is overloaded: {s.num_queued_requests} requests "
                f"({s.num_queued_tokens} prompt tokens) are waiting; retry after {retry} s",
                code="queue_full", headers={"Retry-After": str(retry)})
