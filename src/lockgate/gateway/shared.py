"""`SharedState`: limits and budgets decided in the store when several processes share it.

With a PostgreSQL store (several gateway instances) or `--api-workers N`, a
tenant's rpm, tpm, concurrency and budget bound the sum over every process, so
each decision is one transaction in the store (store/shared_ops.py) instead of
this process's memory:
- on arrival, one request unit of the tenant's and key's rpm (`charge`);
- at admission, concurrency, tpm and the worst-case cost against the tenant's
  budget and the key's (the key's read from the store in the same transaction),
  with the reservation row, all or nothing (`admit`); completion tokens reach
  the tpm buckets with each checkpoint and settlement;
- a lease per process (`instances`), renewed every `LEASE_RENEW_S`; any live
  process settles, as `interrupted`, the reservations of one whose lease is
  older than `lease_timeout_s` (60 s at most: `$LOCKGATE_LEASE_TIMEOUT_S`).

The bound: exact. Every check and take is one serialised transaction, so the
sum over all instances never passes a limit (0 requests over, where the
in-memory buckets of independent processes would each admit a full limit).
While the store cannot answer, a request that needs it gets 503
`store_unavailable` and nothing runs unbilled.
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lockgate.errors import APIError, unavailable
from lockgate.gateway.auth import Principal
from lockgate.gateway.budget import budget_exceeded, period_start
from lockgate.gateway.limits import LimitState, RateLimiter, TokenBucket
from lockgate.store.models import ApiKey, Reservation, Tenant, UsageRecord
from lockgate.store.shared_ops import AdmitRequest, Charge, Refusal
from lockgate.store.store_error import StoreUnavailable

if TYPE_CHECKING:
    from lockgate.gateway.accounting import Meter
    from lockgate.store.writer import AsyncStore

log = logging.getLogger("lockgate.gateway")

LEASE_RENEW_S = 5.0
LEASE_TIMEOUT_ENV = "LOCKGATE_LEASE_TIMEOUT_S"
MAX_LEASE_TIMEOUT_S = 60.0
STORE_RETRY_AFTER_S = 2


def lease_timeout_s() -> float:
    """A lease older than this is dead (at most 60 s; tests set a few seconds)."""
    raw = os.environ.get(LEASE_TIMEOUT_ENV)
    try:
        value = float(raw) if raw else MAX_LEASE_TIMEOUT_S
    except ValueError:
        value = MAX_LEASE_TIMEOUT_S
    return min(MAX_LEASE_TIMEOUT_S, max(1.0, value))


def store_unavailable(exc: BaseException | None = None) -> APIError:
    """The 503 for a request that needs the store while it cannot answer (nothing runs unbilled)."""
    if exc is not None:
        log.warning("store unavailable: %s", exc)
    return unavailable("the usage store is unavailable; the request was not run", "store_unavailable",
                       retry_after_s=STORE_RETRY_AFTER_S)


def interrupted_rows(left: list[Reservation], tenants: dict[str, Tenant]) -> list[UsageRecord]:
    """The usage rows of reservations nobody will settle: billed for the checkpointed tokens."""
    rows = []
    for r in left:
        t = tenants.get(r.tenant_id)
        price = t.price_for(r.model) if t is not None else None
        cost = price.cost(r.prompt_tokens, r.completion_tokens, r.cached_tokens) if price else 0.0
        rows.append(UsageRecord(
            request_id=r.request_id, tenant_id=r.tenant_id, key_id=r.key_id, model=r.model,
            prompt_tokens=r.prompt_tokens, completion_tokens=r.completion_tokens,
            cached_tokens=r.cached_tokens, queue_time_s=None, ttft_s=None,
            e2e_s=max(0.0, r.updated_at - r.created_at), finish_reason="interrupted", status=0,
            cost_usd=cost, created_at=r.created_at, model_version=r.model_version))
    return rows


class SharedState:
    def __init__(self, limiter: RateLimiter, count_refusal: Callable[[Principal, int, str | None, float], None]) -> None:
        self.limiter = limiter  # mirrors the store's levels, for x-ratelimit-* headers only
        self.count_refusal = count_refusal
        self.instance_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lease_timeout_s = lease_timeout_s()
        # Renewed (and dead instances swept) several times per timeout: one late renewal is not death.
        self.renew_every_s = min(LEASE_RENEW_S, self.lease_timeout_s / 3)
        self.store: Any = None
        self.astore: AsyncStore | None = None
        self.swept = 0  # reservations of dead instances this one settled

    def attach(self, store: Any, astore: AsyncStore) -> None:
        self.store, self.astore = store, astore

    # ---- per request ------------------------------------------------------------------------
    async def charge(self, principal: Principal, tenant: Tenant) -> None:
        """One request unit of the tenant's and key's rpm, summed over every instance (429/503)."""
        scopes = [(f"t:{tenant.id}", tenant.limits.rpm)] if tenant.limits.rpm is not None else []
        key = principal.key
        if key is not None and key.limits.rpm is not None:
            scopes.append((f"k:{key.id}", key.limits.rpm))
        if not scopes or self.astore is None:
            return
        now = time.time()
        try:
            charge: Charge = await self.astore.hot(self.store.charge_requests, scopes, now)
        except StoreUnavailable as e:
            self.count_refusal(principal, 503, "store_unavailable", now)
            raise store_unavailable(e) from None
        states = self._mirror(principal, tenant, "req", charge.levels, now)
        if charge.refusal is not None:
            err = self._refused(charge.refusal, principal, tenant, states, now)
            self.count_refusal(principal, err.status, err.code, now)
            raise err

    def start_admit(self, meter: Meter, tenant: Tenant, now: float, key: ApiKey | None = None) -> None:
        """Admission in the store of the meter's reservation row (prompt tokens and worst-case cost
        set); `meter.reservation` resolves when admitted (APIError when not). `key`: the latest of the
        request's key (its budget is the store's, read at admission; this one words the 429)."""
        principal = meter.principal
        key = key if key is not None else principal.key
        tpm = [(f"t:{tenant.id}", tenant.limits.tpm)] if tenant.limits.tpm is not None else []
        if key is not None and key.limits.tpm is not None:
            tpm.append((f"k:{key.id}", key.limits.tpm))
        row = meter.reservation_row()
        row.instance_id = self.instance_id
        req = AdmitRequest(row, tenant.budget_usd, tenant.budget_period, period_start(tenant.budget_period, now),
                           tenant.limits.max_concurrency, key.limits.max_concurrency if key is not None else None, tpm)
        meter.reservation = asyncio.ensure_future(self._admit(req, principal, tenant, now, key))

    async def _admit(self, req: AdmitRequest, principal: Principal, tenant: Tenant, now: float,
                     key: ApiKey | None = None) -> None:
        assert self.astore is not None
        try:
            refusal = await self.astore.hot(self.store.admit, req, now)
        except StoreUnavailable as e:
            raise store_unavailable(e) from None
        if refusal is not None:
            states = self.limiter_states(principal, tenant, now)
            raise self._refused(refusal, principal, tenant, states, now, req.reservation.reserved_usd, key)

    def limiter_states(self, principal: Principal, tenant: Tenant, now: float) -> list[LimitState]:
        states = [self.limiter.state(f"t:{tenant.id}", tenant.limits, "tenant", now)]
        if principal.key is not None:
            states.append(self.limiter.state(f"k:{principal.key.id}", principal.key.limits, "key", now))
        return states

    def _mirror(self, principal: Principal, tenant: Tenant, kind: str, levels: dict[str, tuple[float, float]],
                now: float) -> list[LimitState]:
        """The store's bucket levels into this process's limiter (what the rate headers show)."""
        states = self.limiter_states(principal, tenant, now)
        for st, scope in zip(states, (f"t:{tenant.id}", f"k:{principal.key.id}" if principal.key else "")):
            if scope in levels:
                cap, level = levels[scope]
                bucket = st.requests if kind == "req" else st.tokens
                if bucket is None:
                    bucket = TokenBucket.full(int(cap), now)
                bucket.capacity, bucket.level, bucket.updated = cap, level, now
        return states

    @staticmethod
    def _refused(r: Refusal, principal: Principal, tenant: Tenant, states: list[LimitState], now: float,
                 amount: float = 0.0, key: ApiKey | None = None) -> APIError:
        """The same 429s, in the same words, as the in-memory limits and budget give."""
        label = "tenant" if r.scope.startswith("t:") else "key"
        key = key or principal.key
        lim = tenant.limits if label == "tenant" else (key.limits if key else tenant.limits)
        if r.kind == "budget" and label == "key":
            kid = r.scope[2:]
            period = r.period or (key.budget_period if key is not None else "month")
            budget = r.budget_usd if r.budget_usd is not None else (key.budget_usd if key is not None else 0.0)
            return budget_exceeded(amount, r.left_usd, period, budget or 0.0, kid)
        if r.kind == "budget":
            return budget_exceeded(amount, r.left_usd, tenant.budget_period, tenant.budget_usd or 0.0)
        if r.kind == "rpm":
            msg = f"{label} rate limit reached: {lim.rpm} requests per minute"
        elif r.kind == "concurrency":
            msg = f"{label} concurrency limit reached: {r.inflight} of {lim.max_concurrency} requests in flight"
        elif r.kind == "tpm_too_large":
            msg = f"the request's prompt tokens exceed the {label} limit of {lim.tpm} tokens per minute"
        else:
            msg = f"{label} rate limit reached: {lim.tpm} tokens per minute"
        wait = r.wait_s if r.kind != "concurrency" else 1.0
        retry = max(1, math.ceil(wait))
        headers = {"Retry-After": str(retry), **RateLimiter.headers(states, now)}
        return APIError(429, f"{msg}; retry after {retry} s", code="rate_limit_exceeded", headers=headers)

    # ---- leases and the sweep ---------------------------------------------------------------------
    async def register(self) -> None:
        assert self.astore is not None
        await self.astore.hot(self.store.register_instance, self.instance_id, socket.gethostname(), os.getpid())
        log.info("gateway instance %s on a shared store (lease timeout %.0f s)", self.instance_id,
                 self.lease_timeout_s)

    async def renew(self) -> None:
        assert self.astore is not None
        if not await self.astore.hot(self.store.renew_instance, self.instance_id):
            # Judged dead by another instance (a stall longer than the lease): its open reservations
            # were settled as interrupted; take a fresh lease and carry on.
            log.error("gateway instance %s lost its lease (stalled over %.0f s?); registering again",
                      self.instance_id, self.lease_timeout_s)
            await self.register()

    async def sweep(self, tenants: Callable[[], Any]) -> int:
        """Settle, as `interrupted`, the reservations of instances whose lease is stale."""
        assert self.astore is not None
        live_since = time.time() - self.lease_timeout_s
        left = await self.astore.hot(self.store.dead_reservations, live_since)
        if left:
            rows = interrupted_rows(left, {t.id: t for t in await tenants()})
            await self.astore.settle(rows)
            self.swept += len(rows)
            log.warning("settled %d request(s) of gateway instances that stopped renewing their lease",
                        len(rows))
        await self.astore.hot(self.store.forget_dead_instances, live_since)
        return len(left)

    async def unregister(self) -> None:
        if self.astore is None:
            return
        try:
            await self.astore.hot(self.store.drop_instance, self.instance_id)
        except Exception as e:  # noqa: BLE001 - the lease then expires by itself
            log.warning("could not drop this instance's lease: %r", e)
