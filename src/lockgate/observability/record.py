"""`RequestRecord`: what one inference request did, from arrival to its last byte.

Opened when an inference request enters the pipeline (`Pipeline.open`, server/pipeline.py), filled as the request goes
(class, admission, tokens, the engine's timelines, the HTTP answer), and read
once when the request ends: the request log line, the SLO verdict, the cost
counter and the trace spans all come from it. Times are the API process's
monotonic clock except `engine_times` (the core's clock, see `RequestTimes`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lockgate.engine.outputs import RequestOutput, RequestTimes
from lockgate.gateway.accounting import finish_reason_of, finish_reason_from_status
from lockgate.gateway.classes import PriorityClass

if TYPE_CHECKING:
    from lockgate.gateway.accounting import Meter
    from lockgate.observability.schema_metrics import OutputCheck

# Failures that are the server's doing (tracker reasons): they burn the error budget.
SERVER_FAILURES = frozenset({"engine_dead", "engine_unavailable", "internal"})
# 429s that are capacity refusals (not a tenant's own rate limit or budget): bad for the SLO.
CAPACITY_REFUSALS = frozenset({"queue_full", "slo_unattainable"})


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    route: str
    tenant_id: str | None = None
    tenant_name: str | None = None
    tenant: str = "none"  # the bounded metrics label (labels.py)
    key_id: str | None = None
    started: float = field(default_factory=time.monotonic)
    model: str = ""
    cls: PriorityClass | None = None
    stream: bool = False
    admitted: float | None = None  # handed to the engine: the end of admission
    first_token: float | None = None
    last_token: float | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    max_choice_tokens: int = 0  # tokens of the longest choice (n > 1: choices decode side by side)
    finish_reasons: list[str | None] | None = None
    completed: bool = False  # generation ended normally (stop / length)
    error: str | None = None  # why it did not (metrics failure reason, e.g. engine_dead, client_disconnected)
    engine_times: list[RequestTimes] = field(default_factory=list)
    prompt: Any = None  # only with --log-prompts
    meter: Meter | None = None  # keyed mode: the usage meter (its settled cost)
    # A response_format schema (registered NAME@VERSION or inline): its answers checked when the request
    # ends (observability/schema_metrics.py's OutputCheck, which holds the name and version).
    output_check: OutputCheck | None = None
    # Set when the request ends (the guard middleware).
    status: int = 0
    code: str | None = None  # the error code sent, if any
    outcome: str = ""
    ended: float | None = None
    response_started: float | None = None  # first / last byte of the answer (traces only)
    response_ended: float | None = None

    def observe(self, out: RequestOutput, now: float) -> int:
        """One engine output: its new tokens (returned) and their time. The one place a request's
        token times are taken: TTFT, TPOT, the SLO verdict and the versions' stats all read them."""
        new = 0
        if self.output_check is not None:
            self.output_check.observe(out)
        for c in out.outputs:
            new += len(c.delta_token_ids)
            if len(c.token_ids) > self.max_choice_tokens:
                self.max_choice_tokens = len(c.token_ids)
        if new:
            if self.first_token is None:
                self.first_token = now
            self.last_token = now
            self.completion_tokens += new
        return new

    @property
    def class_name(self) -> str:
        return self.cls.name if self.cls is not None else "none"

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.started

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first, of the longest choice (None under 2 tokens)."""
        if self.first_token is None or self.last_token is None or self.max_choice_tokens < 2:
            return None
        return (self.last_token - self.first_token) / (self.max_choice_tokens - 1)

    @property
    def e2e_s(self) -> float | None:
        return None if self.ended is None else self.ended - self.started

    @property
    def queue_s(self) -> float | None:
        """The engine's queue wait: of its engine requests, the first to be scheduled."""
        return min((t.queue_s for t in self.engine_times), default=None)

    @property
    def cost_usd(self) -> float | None:
        m = self.meter
        return None if m is None or m.skip else m.cost_usd

    @property
    def finish_reason(self) -> str:
        """As the ledger says it: stop, length, abort, error or rejected (`replayed`: an
        Idempotency-Key retry answered from the stored response)."""
        if self.meter is not None and self.meter.skip:
            return "replayed"
        if self.completed or self.error is not None:
            return finish_reason_of(self.finish_reasons, self.error)
        return finish_reason_from_status(self.status, self.outcome)

    def slo_good(self) -> bool | None:
        """True: met its class's TTFT and TPOT targets; False: missed, failed or refused for capacity;
        None: not an SLO event (no class yet, a client error or rate limit, a client that left)."""
        if self.cls is None:
            return None
        if self.completed:
            return self.cls.met(self.ttft_s, self.tpot_s)
        if self.error == "client_disconnected" or self.status == 499:
            return None
        if self.status >= 500 or self.error in SERVER_FAILURES:
            return False
        if self.status == 429 and self.code in CAPACITY_REFUSALS:
            return False
        return None
