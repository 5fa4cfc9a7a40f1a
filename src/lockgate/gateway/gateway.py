"""`Gateway`: tenants' keys, limits, budgets and the usage ledger, in front of the engine.

It owns the in-memory state every request consults without touching disk (the
key ring, rate-limit buckets, budget books, live meters) and the persistent
store behind it (`lockgate.store`), which it reaches only through the async
writer. Modes:
- open (no admin key, no tenants): no keys needed, nothing metered; the
  keyless browser protections of the guard middleware apply;
- keyed (an admin key is set or tenants exist): every route but the allowlist
  needs a key; tenants' requests are limited, budgeted and metered.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from lockgate.gateway.accounting import Meter
from lockgate.gateway.auth import KeyRing, Principal
from lockgate.gateway.tenants import hash_key
from lockgate.gateway.budget import BudgetBook, period_start
from lockgate.gateway.lease import Lease
from lockgate.gateway.limits import LimitState, RateLimiter
from lockgate.errors import APIError
from lockgate.store.models import RefusalCount, Tenant, UsageRecord

log = logging.getLogger("lockgate.gateway")

DB_NAME = "lockgate.db"
CHECKPOINT_INTERVAL_S = 1.0  # streamed tokens reach the on-disk reservation at least this often
REFRESH_INTERVAL_S = 2.0  # changes made by another process (the CLI) are picked up this fast
REFUSAL_BUCKET_S = 3600.0  # refused requests are counted per hour (store/schema.py: refusals)


@dataclass(slots=True)
class GatewayConfig:
    data_dir: str = "./lockgate-data"
    admin_key: str | None = None


class Gateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.ring = KeyRing(config.admin_key)
        self.limiter = RateLimiter()
        self.budgets = BudgetBook()
        self.store = None  # SQLiteStore, opened at start when there is anything to keep
        self.astore = None  # AsyncStore over it
        self._meters: dict[str, Meter] = {}
        self._reload_lock = asyncio.Lock()
        self._tenants: dict[str, Tenant] = {}  # the latest of each tenant (budget, prices, limits), by id
        # Refusals counted since the last flush: (tenant, key, status, code, hour) -> count.
        self._refusals: dict[tuple[str, str, int, str, float], int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._pending: set[asyncio.Future[None]] = set()
        self._admin_version = -1  # the store's admin version the ring was built from

    @property
    def keyed(self) -> bool:
        return self.ring.keyed

    @property
    def db_path(self) -> Path:
        return Path(self.config.data_dir) / DB_NAME

    # ---- life cycle ---------------------------------------------------------------------
    async def start(self) -> None:
        if self.config.admin_key or self.db_path.exists():
            await asyncio.to_thread(self._open)
            await self._recover()
            await self._record_admin_key()
            await self.reload()
        self._tasks = [asyncio.create_task(self._checkpoint_loop(), name="ledger-checkpoints"),
                       asyncio.create_task(self._refresh_loop(), name="gateway-refresh")]

    def _open(self) -> None:
        from lockgate.store.sqlite import open_store
        from lockgate.store.writer import AsyncStore

        # The directory 0700 and the files 0600, or UnsafeDataDir if open to others (store/files.py).
        self.store = open_store(self.config.data_dir)
        self.astore = AsyncStore(self.store)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        await self._flush_refusals()
        if self.astore is not None:
            await self.astore.aclose()
            self.astore = None
        if self.store is not None:
            self.store.close()
            self.store = None

    async def reload(self) -> None:
        """Rebuild the key ring and budget books from the store (one reload at a time: a slow one
        must not apply what it read over a newer one's)."""
        async with self._reload_lock:
            await self._reload()

    async def _reload(self) -> None:
        if self.astore is None:
            return
        store = self.store
        tenants, keys = await self.astore.call(lambda: (store.list_tenants(), store.list_keys()))
        now = time.time()
        loads = []
        for t in tenants:
            if self.budgets.current(t, now):
                continue  # in memory, spend is ahead of the ledger (settlements still queued)
            start = period_start(t.budget_period, now)
            # Settlements made so far reach the ledger before it is read; later ones are added by `mark`.
            mark = self.budgets.mark(t.id)
            if self._pending:
                await asyncio.gather(*list(self._pending), return_exceptions=True)
            loads.append((t, start, await self.astore.call(store.spent_usd, t.id, start), mark))
        # Books, tenants and keys change together (no await): admission never sees a new budget with
        # an old period's spend, or the reverse.
        for t, start, spent, mark in loads:
            self.budgets.load(t.id, t.budget_period, start, spent, mark)
        self._tenants = {t.id: t for t in tenants}
        self.ring.load(tenants, keys)
        self._admin_version = await self.astore.call(store.admin_version)

    async def _record_admin_key(self) -> None:
        """Audit the bootstrap admin key the first time it is used, and every time it changes.

        The record holds an HMAC-SHA256 of the key under a random per-database secret (the store's
        meta table; no API shows it): an audit reader cannot test guesses of a weak key offline.
        Records written before held a prefix of the key's plain SHA-256 (`admin_key_sha256`): the
        first start on such a database compares the key with it once and records the new form as
        `admin_key.fingerprint` (same key) or `admin_key.change` (another key); later starts compare
        HMACs only. The old records stay in the chain (removing them would break it)."""
        import hashlib
        import hmac

        if not self.config.admin_key or self.astore is None:
            return
        store = self.store
        secret = await self.astore.call(store.meta_secret, "admin_key_fingerprint")
        raw = self.config.admin_key.encode("utf-8", "surrogateescape")
        fingerprint = hmac.new(secret, raw, hashlib.sha256).hexdigest()[:32]
        last, since = None, 0
        while batch := await self.astore.call(store.list_audit, since, 10_000):  # paged: the log can be long
            last = next((r for r in reversed(batch) if r.action in
                         ("bootstrap", "admin_key.change", "admin_key.fingerprint")), last)
            since = batch[-1].id
        detail = {"admin_key_hmac": fingerprint}
        if last is None:
            action = "bootstrap"
        elif "admin_key_hmac" in last.details:
            action = None if hmac.compare_digest(str(last.details["admin_key_hmac"]), fingerprint) \
                else "admin_key.change"
        elif last.details.get("admin_key_sha256") == hash_key(self.config.admin_key)[:16]:
            action = "admin_key.fingerprint"  # the same key: only the fingerprint's form changes
        else:
            action = "admin_key.change"
        if action is not None:
            await self.astore.call(store.append_audit, "system", action, None, detail)

    async def _recover(self) -> None:
        """Settle what a killed process left: each reservation becomes an `interrupted` usage row."""
        assert self.astore is not None and self.store is not None
        store = self.store
        left = await self.astore.call(store.list_reservations)
        if not left:
            return
        tenants = {t.id: t for t in await self.astore.call(store.list_tenants)}
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
        await self.astore.settle(rows)
        log.warning("settled %d request(s) interrupted by the previous shutdown", len(rows))

    # ---- per request ----------------------------------------------------------------------
    def authenticate(self, authorization: bytes | None) -> Principal:
        return self.ring.authenticate(authorization)

    def open_meter(self, lease: Lease, principal: Principal, request_id: str) -> Meter | None:
        """Start metering a tenant's inference request; it settles when the lease is released."""
        if principal.tenant is None or self.astore is None:
            return None
        meter = Meter(request_id, principal)
        self._meters[request_id] = meter
        lease.hold(lambda outcome: self._settle(meter, lease.status, outcome, lease.code))
        return meter

    def latest(self, tenant: Tenant) -> Tenant:
        """The tenant as last reloaded: a request authenticated before an admin change is admitted by
        the budget, prices and limits in force when it is admitted."""
        return self._tenants.get(tenant.id, tenant)

    def charge_request(self, principal: Principal | None) -> None:
        """One request unit of the tenant's and key's rpm for a call on an inference route, refused or
        not (the guard middleware charges it once the key is known), or 429 rate_limit_exceeded."""
        if principal is None or principal.tenant is None:
            return
        now = time.time()
        try:
            self.limiter.charge(self.limit_states(principal, now), now)
        except APIError as err:
            self.count_refusal(principal, err.status, err.code, now)
            raise

    def count_refusal(self, principal: Principal, status: int, code: str | None, at: float) -> None:
        """A tenant's request refused before admission: counted (store: refusals), never a ledger row."""
        if principal.tenant is None or self.astore is None:
            return
        key_id = principal.key.id if principal.key is not None else ""
        bucket = math.floor(at / REFUSAL_BUCKET_S) * REFUSAL_BUCKET_S
        slot = (principal.tenant.id, key_id, int(status), code or "", bucket)
        self._refusals[slot] = self._refusals.get(slot, 0) + 1

    async def _flush_refusals(self) -> None:
        if not self._refusals or self.astore is None:
            return
        counts, self._refusals = self._refusals, {}
        rows = [RefusalCount(t, k, status, code, bucket, n) for (t, k, status, code, bucket), n in counts.items()]
        try:
            await self.astore.call(self.store.add_refusals, rows)
        except Exception:  # noqa: BLE001 - kept for the next flush
            for (t, k, status, code, bucket), n in counts.items():
                slot = (t, k, status, code, bucket)
                self._refusals[slot] = self._refusals.get(slot, 0) + n
            log.exception("could not write refusal counts")

    def limit_states(self, principal: Principal, now: float) -> list[LimitState]:
        states = []
        if principal.tenant is not None:
            tenant = self.latest(principal.tenant)
            states.append(self.limiter.state(f"t:{tenant.id}", tenant.limits, "tenant", now))
        if principal.key is not None:
            states.append(self.limiter.state(f"k:{principal.key.id}", principal.key.limits, "key", now))
        return states

    def max_tokens_cap(self, principal: Principal) -> int | None:
        caps = [x.limits.max_tokens for x in (principal.tenant, principal.key)
                if x is not None and x.limits.max_tokens is not None]
        return min(caps) if caps else None

    def admit(self, lease: Lease, meter: Meter, prompt_tokens: int, worst_completion_tokens: int) -> None:
        """Tokens per minute, concurrency and budget: all taken or none (429); each given back on
        release. (The request unit of rpm was charged on arrival: `charge_request`.)"""
        assert meter.principal.tenant is not None
        tenant = self.latest(meter.principal.tenant)
        now = time.time()
        states = self.limit_states(meter.principal, now)
        self.limiter.check(states, prompt_tokens, now)
        price = tenant.price_for(meter.model)
        cost = price.cost(prompt_tokens, worst_completion_tokens)
        self.budgets.roll(tenant.id, tenant.budget_period, now)
        self.budgets.reserve(tenant, cost)  # raises when it does not fit: nothing taken yet
        self.limiter.take(states, prompt_tokens)
        meter.prompt_tokens = prompt_tokens
        meter.reserved_usd = cost
        meter.price = price  # settled at the prices it was reserved at
        meter.limit_states = states
        lease.hold(lambda _outcome: self.limiter.release(states))
        # On disk before the first token is sent (the routes await it before answering).
        assert self.astore is not None
        meter.reservation = asyncio.ensure_future(self.astore.add_reservations([meter.reservation_row()]))

    def on_tokens(self, meter: Meter, n: int, cached: int) -> None:
        meter.on_tokens(n, cached)
        if n:
            self.limiter.consume_tokens(meter.limit_states, n)

    def rate_headers(self, principal: Principal | None) -> dict[str, str]:
        if principal is None or principal.tenant is None:
            return {}
        now = time.time()
        return self.limiter.headers(self.limit_states(principal, now), now)

    def _settle(self, meter: Meter, status: int, outcome: str, code: str | None = None) -> None:
        """Exactly once per request: release the budget hold, queue the usage row. A request refused
        before admission (nothing reserved, nothing generated) is counted instead (`count_refusal`)."""
        if meter.settled:
            return
        meter.settled = True
        self._meters.pop(meter.request_id, None)
        if meter.skip:
            return
        if meter.reservation is None and meter.completion_tokens == 0:
            self.count_refusal(meter.principal, status, code, meter.created_at)
            return
        row = meter.usage_row(status, outcome)
        if meter.principal.tenant is not None:
            self.budgets.settle(meter.principal.tenant.id, meter.reserved_usd, row.cost_usd, time.time())
        if self.astore is None:
            return
        fut = asyncio.ensure_future(self._write_settle(meter, row))
        self._pending.add(fut)
        fut.add_done_callback(self._pending.discard)

    async def _write_settle(self, meter: Meter, row: UsageRecord) -> None:
        if meter.reservation is not None:  # the row replaces the reservation: it must be there first
            with contextlib.suppress(Exception):
                await meter.reservation
        assert self.astore is not None
        try:
            await self.astore.settle([row])
        except Exception:  # noqa: BLE001 - the reservation stays on disk: settled as interrupted at restart
            log.exception("could not write the usage row of %s", row.request_id)

    # ---- background -------------------------------------------------------------------------
    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(CHECKPOINT_INTERVAL_S)
            if self.astore is None:
                continue
            await self._flush_refusals()
            updates = []
            for m in list(self._meters.values()):
                if (m.reservation is not None and m.reservation.done() and not m.settled
                        and m.completion_tokens != m.checkpointed):
                    updates.append((m.request_id, m.completion_tokens, m.cached_tokens))
                    m.checkpointed = m.completion_tokens
            if updates:
                try:
                    await self.astore.checkpoint_reservations(updates)
                except Exception:  # noqa: BLE001 - retried next second
                    log.exception("checkpointing streamed tokens failed")

    async def _refresh_loop(self) -> None:
        """Pick up changes made by another process (the CLI): the store's admin version moved."""
        while True:
            await asyncio.sleep(REFRESH_INTERVAL_S)
            try:
                if self.astore is None:
                    if self.db_path.exists():
                        await asyncio.to_thread(self._open)
                        await self.reload()
                    continue
                if await self.astore.call(self.store.admin_version) != self._admin_version:
                    await self.reload()
            except Exception:  # noqa: BLE001 - keep serving with what we have
                log.exception("refreshing tenants and keys failed")



__all__ = ["Gateway", "GatewayConfig"]
