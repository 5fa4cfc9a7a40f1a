"""`Meter`: one inference request's usage as it happens, settled into the ledger exactly once.

A meter is opened when an authenticated tenant's request arrives and is put on
the request's lease, so it settles however the request ends: completed
(`stop`/`length`), refused (`rejected`), failed (`error`) or cut off by the
client (`abort`). Tokens actually generated are billed in every case; a
process kill leaves the on-disk reservation, settled as `interrupted` with the
checkpointed token count at the next start.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from lockgate.gateway.auth import Principal
from lockgate.gateway.limits import LimitState
from lockgate.store.models import Reservation, UsageRecord


@dataclass(slots=True)
class Meter:
    request_id: str
    principal: Principal
    model: str = ""
    arrival: float = field(default_factory=time.monotonic)
    created_at: float = field(default_factory=time.time)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    first_token_at: float | None = None
    finish_reason: str | None = None  # set when known; derived from the outcome otherwise
    reserved_usd: float = 0.0
    limit_states: list[LimitState] = field(default_factory=list)
    reservation: asyncio.Future[None] | None = None  # resolves once the reservation is on disk
    checkpointed: int = 0  # completion tokens last written to the reservation
    settled: bool = False
    skip: bool = False  # an idempotent replay: already billed by the original request

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
        if error is None:
            self.finish_reason = "length" if reasons and "length" in reasons else "stop"
        elif error == "client_disconnected":
            self.finish_reason = "abort"
        elif error == "rejected":
            self.finish_reason = "rejected"
        else:
            self.finish_reason = "error"

    def reservation_row(self) -> Reservation:
        now = time.time()
        return Reservation(request_id=self.request_id, tenant_id=self.tenant_id,
                           key_id=self.principal.key.id if self.principal.key else None, model=self.model,
                           reserved_usd=self.reserved_usd, prompt_tokens=self.prompt_tokens,
                           completion_tokens=self.completion_tokens, cached_tokens=self.cached_tokens,
                           created_at=self.created_at, updated_at=now)

    def usage_row(self, status: int, outcome: str) -> UsageRecord:
        reason = self.finish_reason
        if reason is None:
            if outcome == "internal" or status >= 500:
                reason = "error"
            elif 400 <= status < 500 and status != 499:
                reason = "rejected"
            else:
                reason = "abort"
        tenant = self.principal.tenant
        assert tenant is not None
        cost = tenant.price_for(self.model).cost(self.prompt_tokens, self.completion_tokens, self.cached_tokens)
        end = time.monotonic()
        return UsageRecord(
            request_id=self.request_id, tenant_id=tenant.id,
            key_id=self.principal.key.id if self.principal.key else None, model=self.model,
            prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
            cached_tokens=self.cached_tokens, queue_time_s=None,
            ttft_s=None if self.first_token_at is None else self.first_token_at - self.arrival,
            e2e_s=end - self.arrival, finish_reason=reason, status=status, cost_usd=cost,
            created_at=self.created_at)
