"""`Meter`: one inference request's usage as it happens, settled into the ledger exactly once.

A meter is opened when an authenticated tenant's request arrives and is put on
the request's lease, so it settles however the request ends: completed
(`stop`/`length`), refused after admission (`rejected`), failed (`error`) or
cut off by the client (`abort`). Tokens actually generated are billed in every
case; a process kill leaves the on-disk reservation, settled as `interrupted`
with the checkpointed token count at the next start. A request refused before
admission (nothing reserved, nothing generated) writes no ledger row: the
gateway counts it per tenant, key, status, code and hour (`Gateway.count_refusal`).
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

from lockgate.gateway.auth import Principal
from lockgate.gateway.limits import LimitState
from lockgate.store.models import Price, Reservation, UsageRecord
from lockgate.store.money import nano, usd


def finish_reason_of(reasons: list[str | None] | None, error: str | None) -> str:
    """The ledger's finish reason from how generation ended (the request's metrics record)."""
    if error is None:
        return "length" if reasons and "length" in reasons else "stop"
    if error == "client_disconnected":
        return "abort"
    if error == "rejected":
        return "rejected"
    return "error"


def finish_reason_from_status(status: int, outcome: str) -> str:
    """For a request that never generated: what its HTTP answer says."""
    if outcome == "internal" or status >= 500:
        return "error"
    if 400 <= status < 500 and status != 499:
        return "rejected"
    return "abort"


@dataclass(slots=True)
class Meter:
    request_id: str
    principal: Principal
    model: str = ""
    model_version: str | None = None  # the version of `model` that serves it (lifecycle/)
    replica: str | None = None  # the replica(s) that served it (lifecycle/fleet.py), known at the end
    arrival: float = field(default_factory=time.monotonic)
    created_at: float = field(default_factory=time.time)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    first_token_at: float | None = None
    finish_reason: str | None = None  # set when known; derived from the outcome otherwise
    reserved_usd: float = 0.0
    price: Price | None = None  # the prices it was admitted (reserved) at, and is billed at
    limit_states: list[LimitState] = field(default_factory=list)
    reservation: asyncio.Future[None] | None = None  # resolves once the reservation is on disk
    checkpointed: int = 0  # completion tokens last written to the reservation
    settled: bool = False
    skip: bool = False  # an idempotent replay: already billed by the original request
    queue_time_s: float | None = None  # the engine's queue wait (entry in the core to first scheduled)
    cost_usd: float | None = None  # set when settled
    user: str | None = None  # the request's OpenAI `user` (the tenant's end user), for spend by user
    priority_class: str | None = None  # the class it runs in
    router: str | None = None  # ROUTER/RULE: the router model that chose `model` (gateway/model_router.py)
    attempts: list[dict] | None = None  # models a fallback left before the one that served (lifecycle/fallback.py)
    hedged: bool = False  # a hedge copy was sent (lifecycle/hedge.py); only the winner is billed
    cache: str | None = None  # 'hit': answered from the response cache, billed at its price's `cache_hit`
    spec_draft_tokens: int = 0  # speculative decoding: tokens proposed for it, over its engine requests
    spec_accepted_tokens: int = 0  # and of those, accepted (both 0: it did not speculate)

    @property
    def tenant_id(self) -> str:
        assert self.principal.tenant is not None
        return self.principal.tenant.id

    def on_tokens(self, n: int, cached: int) -> None:
        if n and self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.completion_tokens += n
        self.cached_tokens = max(self.cached_tokens, cached)

    def finish(self, reasons: list[str | None] | None, error: str | None) -> None:
        """From the request's metrics record: how generation ended."""
        if self.finish_reason is not None:
            return
        self.finish_reason = finish_reason_of(reasons, error)

    def reservation_row(self) -> Reservation:
        now = time.time()
        return Reservation(request_id=self.request_id, tenant_id=self.tenant_id,
                           key_id=self.principal.key.id if self.principal.key else None, model=self.model,
                           reserved_usd=self.reserved_usd, prompt_tokens=self.prompt_tokens,
                           completion_tokens=self.completion_tokens, cached_tokens=self.cached_tokens,
                           created_at=self.created_at, updated_at=now, model_version=self.model_version)

    def usage_row(self, status: int, outcome: str) -> UsageRecord:
        reason = self.finish_reason or finish_reason_from_status(status, outcome)
        tenant = self.principal.tenant
        assert tenant is not None
        price = self.price if self.price is not None else tenant.price_for(self.model)
        if self.cache == "hit":  # nothing ran: the tenant's per-request cache price, whatever the tokens
            cost = usd(nano(price.cache_hit))
        else:
            cost = usd(price.cost_nano(self.prompt_tokens, self.completion_tokens, self.cached_tokens))
        self.cost_usd = cost
        end = time.monotonic()
        return UsageRecord(
            request_id=self.request_id, tenant_id=tenant.id,
            key_id=self.principal.key.id if self.principal.key else None, model=self.model,
            prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
            cached_tokens=self.cached_tokens, queue_time_s=self.queue_time_s,
            ttft_s=None if self.first_token_at is None else self.first_token_at - self.arrival,
            e2e_s=end - self.arrival, finish_reason=reason, status=status, cost_usd=cost,
            created_at=self.created_at, model_version=self.model_version, replica=self.replica, user=self.user,
            priority_class=self.priority_class, cache=self.cache,
            attempts=json.dumps(self.attempts, separators=(",", ":")) if self.attempts else None, hedged=self.hedged,
            router=self.router, spec_draft_tokens=self.spec_draft_tokens,
            spec_accepted_tokens=self.spec_accepted_tokens)
