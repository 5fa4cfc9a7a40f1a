"""`Gateway`: tenants' keys, limits and budgets in front of the engine; it drives the ledger.

It owns the in-memory state every request consults without touching disk (the
key ring, rate-limit buckets, budget books) and the persistent store behind it
(`lockgate.store`), which it reaches only through the async writer. Reserving,
settling, checkpointing and recovering usage is the ledger's (ledger.py); the
gateway calls it at the right moments. Modes:
- open (no admin key, no tenants): no keys needed, nothing metered; the
  keyless browser protections of the guard middleware apply;
- keyed (an admin key is set or tenants exist): every route but the allowlist
  needs a key; tenants' requests are limited, budgeted and metered.
A server that started open on its own data directory stays open until it is restarted, even
when the CLI creates tenants there meanwhile (it warns once): switching itself to keys would
refuse every client it serves, and with no admin key the admin API too. A shared store
(PostgreSQL) turns keys on as soon as tenants appear, as every instance on it must agree.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from lockgate.errors import APIError
from lockgate.gateway.accounting import Meter
from lockgate.gateway.auth import KeyRing, Principal
from lockgate.gateway.budget import BudgetBook, key_book, period_start
from lockgate.gateway.lease import Lease
from lockgate.gateway.ledger import CHECKPOINT_INTERVAL_S, Ledger
from lockgate.gateway.limits import LimitState, RateLimiter
from lockgate.gateway.shared import SharedState
from lockgate.gateway.tenants import hash_key
from lockgate.store.models import ApiKey, Price, RefusalCount, Tenant

log = logging.getLogger("lockgate.gateway")

DB_NAME = "lockgate.db"
REFRESH_INTERVAL_S = 2.0  # changes made by another process (the CLI) are picked up this fast
SHARED_REFRESH_INTERVAL_S = 0.5  # on a shared store: a change made through any instance, within 2 s
MISS_CHECK_S = 0.05  # an unknown key asks the store whether keys changed at most this often
REFUSAL_BUCKET_S = 3600.0  # refused requests are counted per hour (store/schema.py: refusals)


@dataclass(slots=True)
class GatewayConfig:
    data_dir: str = "./lockgate-data"
    admin_key: str | None = None
    store_url: str | None = None  # PostgreSQL (store/postgres.py); None: SQLite in data_dir
    api_workers: int = 1  # API processes of this server sharing the store (--api-workers)

    @property
    def shared(self) -> bool:
        """Several processes write the store: limits and budgets are decided in it (gateway/shared.py),
        not in this process's memory."""
        return self.store_url is not None or self.api_workers > 1


class Gateway:
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.ring = KeyRing(config.admin_key)
        self.limiter = RateLimiter()
        self.budgets = BudgetBook()
        self.store = None  # SQLiteStore, opened at start when there is anything to keep
        self.astore = None  # AsyncStore over it
        self.ledger = Ledger(self.budgets, self.count_refusal)
        self.shared_state = SharedState(self.limiter, self.count_refusal) if config.shared else None
        self._reload_lock = asyncio.Lock()
        self._tenants: dict[str, Tenant] = {}  # the latest of each tenant (budget, prices, limits), by id
        self._keys: dict[str, ApiKey] = {}  # the latest of each key (budget, limits), by id
        # Refusals counted since the last flush: (tenant, key, status, code, hour) -> count.
        self._refusals: dict[tuple[str, str, int, str, float], int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._admin_version = -1  # the store's admin version the ring was built from
        self._miss_check: asyncio.Future[bool] | None = None  # refresh_on_miss: the check in flight
        self._miss_checked = 0.0
        self._held_open = False  # started open on a local data dir: stays open until restarted
        self._warned_tenants = False

    @property
    def shared(self) -> bool:
        return self.config.shared

    @property
    def keyed(self) -> bool:
        return self.ring.keyed and not self._held_open

    @property
    def db_path(self) -> Path:
        return Path(self.config.data_dir) / DB_NAME

    # ---- life cycle ---------------------------------------------------------------------
    async def start(self) -> None:
        if self.config.admin_key or self.config.store_url or self.db_path.exists():
            await asyncio.to_thread(self._open)
            await self._take_over()
            await self._record_admin_key()
            await self.reload()
        self._held_open = not self.ring.keyed and self.config.store_url is None
        self._tasks = [asyncio.create_task(self._checkpoint_loop(), name="ledger-checkpoints"),
                       asyncio.create_task(self._refresh_loop(), name="gateway-refresh")]
        if self.shared_state is not None:
            self._tasks.append(asyncio.create_task(self._lease_loop(), name="gateway-lease"))

    def _open(self) -> None:
        from lockgate.store.writer import AsyncStore

        if self.config.store_url:
            from lockgate.store.postgres import PostgresStore

            store = PostgresStore(self.config.store_url)
            # Per-request limit and budget statements run concurrently on the pool's connections.
            astore = AsyncStore(store, checkpoint_interval_s=None, hot_threads=store.pool_size)
        else:
            from lockgate.store.sqlite import open_store

            # The directory 0700 and the files 0600, or UnsafeDataDir if open to others (store/files.py).
            store = open_store(self.config.data_dir)
            store.shared = self.config.shared  # several API processes on this file (--api-workers)
            astore = AsyncStore(store)
        self.store, self.astore = store, astore
        self.ledger.attach(self.store, self.astore)
        if self.shared_state is not None:
            self.shared_state.attach(self.store, self.astore)

    async def _take_over(self) -> None:
        """Settle what killed processes left. Alone on the store: every open reservation is theirs.
        Shared: only those of instances whose lease went stale (the others are live requests)."""
        if self.shared_state is None:
            await self.astore.call(self.store.reset_shared_state)
            await self.ledger.recover()
            return
        await self.shared_state.register()
        await self.shared_state.sweep(self._all_tenants)

    async def _all_tenants(self) -> list[Tenant]:
        return await self.astore.call(self.store.list_tenants)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        await self.ledger.drain()
        await self._flush_refusals()
        if self.shared_state is not None:
            await self.shared_state.unregister()
        if self.astore is not None:
            self.ledger.detach()
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
        # The admin version first: a key created between reading the lists and reading the version
        # would otherwise be missing under a version that says it is there (and an unknown-key
        # check would never reload it until the next admin change).
        version, tenants, keys = await self.astore.call(
            lambda: (store.admin_version(), store.list_tenants(), store.list_keys()))
        now = time.time()
        loads = []
        for t in tenants:
            if self.shared_state is not None:
                break  # budgets are decided in the store
            if self.budgets.current(t, now):
                continue  # in memory, spend is ahead of the ledger (settlements still queued)
            start = period_start(t.budget_period, now)
            # Settlements made so far reach the ledger before it is read; later ones are added by `mark`.
            mark = self.budgets.mark(t.id)
            await self.ledger.drain()
            loads.append((t.id, t.budget_period, start, await self.astore.call(store.spent_usd, t.id, start), mark))
        for k in keys:
            # A key's own budget: its book read from the ledger (keys without one only hold: `roll`).
            if (self.shared_state is not None or k.budget_usd is None or k.tenant_id is None or k.revoked_at
                    or self.budgets.covers(key_book(k.id), k.budget_period, now)):
                continue
            start = period_start(k.budget_period, now)
            mark = self.budgets.mark(key_book(k.id))
            await self.ledger.drain()
            spent = await self.astore.call(store.key_spent_usd, k.id, start)
            loads.append((key_book(k.id), k.budget_period, start, spent, mark))
        # Books, tenants and keys change together (no await): admission never sees a new budget with
        # an old period's spend, or the reverse.
        for book_id, period, start, spent, mark in loads:
            self.budgets.load(book_id, period, start, spent, mark)
        self._tenants = {t.id: t for t in tenants}
        self._keys = {k.id: k for k in keys}
        self.ring.load(tenants, keys)
        self._admin_version = version

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

    # ---- per request ----------------------------------------------------------------------
    def authenticate(self, authorization: bytes | None) -> Principal:
        return self.ring.authenticate(authorization)

    async def refresh_on_miss(self) -> bool:
        """An unknown key on a shared store: reload now if the admin version moved (a key created
        through another instance works at once, not after the next poll). One check at a time and at
        most one per `MISS_CHECK_S`, whatever keys arrive; True when the ring was reloaded."""
        if self.shared_state is None or self.astore is None:
            return False
        if self._miss_check is None:
            if time.monotonic() - self._miss_checked < MISS_CHECK_S:
                return False
            self._miss_check = asyncio.ensure_future(self._check_admin_version())
        check = self._miss_check
        try:
            return await asyncio.shield(check)
        except Exception:  # noqa: BLE001 - the store may be down: the key stays unknown
            return False

    async def _check_admin_version(self) -> bool:
        try:
            if await self.astore.hot(self.store.admin_version) == self._admin_version:
                return False
            await self.reload()
            return True
        finally:
            self._miss_checked = time.monotonic()
            self._miss_check = None

    def open_meter(self, lease: Lease, principal: Principal, request_id: str) -> Meter | None:
        """Start metering a tenant's inference request; it settles when the lease is released."""
        if principal.tenant is None or self.astore is None:
            return None
        meter = Meter(request_id, principal)
        self.ledger.open(meter)
        lease.hold(lambda outcome: self.ledger.settle(meter, lease.status, outcome, lease.code))
        return meter

    def latest(self, tenant: Tenant) -> Tenant:
        """The tenant as last reloaded: a request authenticated before an admin change is admitted by
        the budget, prices and limits in force when it is admitted."""
        return self._tenants.get(tenant.id, tenant)

    def latest_key(self, key: ApiKey | None) -> ApiKey | None:
        """The key as last reloaded (its budget and limits in force when a request is admitted)."""
        return None if key is None else self._keys.get(key.id, key)

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

    async def charge_shared(self, principal: Principal | None) -> None:
        """`charge_request` on a shared store: the rpm of every instance together (429, or 503)."""
        if principal is None or principal.tenant is None or self.shared_state is None:
            return
        await self.shared_state.charge(principal, self.latest(principal.tenant))

    def reserve(self, lease: Lease, meter: Meter, prompt_tokens: int, worst_completion_tokens: int,
                price: Price | None = None) -> None:
        """Reserve a request's limits and budget: tokens per minute, concurrency and the worst-case
        cost (in the ledger), all taken or none (429); each given back on release. (The request unit
        of rpm was charged on arrival: `charge_request`.) On a shared store the store decides, and
        `meter.reservation` fails with the 429 (or 503) when it refuses. `price`: reserve at these
        prices instead of the model's (a request with fallbacks holds its dearest model's)."""
        assert meter.principal.tenant is not None
        tenant = self.latest(meter.principal.tenant)
        now = time.time()
        if self.shared_state is not None:
            price = price or tenant.price_for(meter.model)
            meter.prompt_tokens, meter.price = prompt_tokens, price
            meter.reserved_usd = price.cost(prompt_tokens, worst_completion_tokens)
            self.shared_state.start_admit(meter, tenant, now, self.latest_key(meter.principal.key))
            return
        states = self.limit_states(meter.principal, now)
        self.limiter.check(states, prompt_tokens, now)
        self.ledger.reserve(meter, tenant, prompt_tokens, worst_completion_tokens, now,
                            self.latest_key(meter.principal.key), price)  # raises: nothing taken
        self.limiter.take(states, prompt_tokens)
        meter.limit_states = states
        lease.hold(lambda _outcome: self.limiter.release(states))

    def on_tokens(self, meter: Meter, n: int, cached: int) -> None:
        meter.on_tokens(n, cached)
        if n and meter.limit_states:  # shared: the store's checkpoints take them off
            self.limiter.consume_tokens(meter.limit_states, n)

    def rate_headers(self, principal: Principal | None) -> dict[str, str]:
        if principal is None or principal.tenant is None:
            return {}
        now = time.time()
        return self.limiter.headers(self.limit_states(principal, now), now)

    # ---- background -------------------------------------------------------------------------
    async def _checkpoint_loop(self) -> None:
        while True:
            await asyncio.sleep(CHECKPOINT_INTERVAL_S)
            if self.astore is None:
                continue
            await self._flush_refusals()
            await self.ledger.checkpoint()

    async def _refresh_loop(self) -> None:
        """Pick up changes made by another process (the CLI, another instance): the store's admin
        version moved."""
        interval = SHARED_REFRESH_INTERVAL_S if self.shared_state is not None else REFRESH_INTERVAL_S
        while True:
            await asyncio.sleep(interval)
            try:
                if self._held_open:
                    await self._warn_if_tenants()
                    continue
                if self.astore is None:
                    continue
                if await self.astore.call(self.store.admin_version) != self._admin_version:
                    await self.reload()
            except Exception as e:  # noqa: BLE001 - keep serving with what we have
                log.warning("refreshing tenants and keys failed: %r", e)

    async def _warn_if_tenants(self) -> None:
        """Open, held open: say once that tenants now exist and what a restart will change."""
        if self._warned_tenants or not self.db_path.exists():
            return
        if self.astore is not None:
            count = len(await self.astore.call(self.store.list_tenants))
        else:
            count = await asyncio.to_thread(_count_tenants, self.db_path)
        if count:
            self._warned_tenants = True
            log.warning("%d tenant(s) now exist in %s, but this server started open and stays open (no keys "
                        "needed) until it is restarted; restart it to require keys, with --admin-key to keep "
                        "the admin API (docs/SECURITY.md)", count, self.config.data_dir)

    async def _lease_loop(self) -> None:
        """Shared store: renew this instance's lease; settle the requests of instances that died."""
        assert self.shared_state is not None
        while True:
            await asyncio.sleep(self.shared_state.renew_every_s)
            if self.astore is None:  # open mode: no store yet (the refresh loop opens it when one appears)
                continue
            try:
                await self.shared_state.renew()
                await self.shared_state.sweep(self._all_tenants)
            except Exception as e:  # noqa: BLE001 - the store may be down: next round
                log.warning("lease renewal or sweep failed: %r", e)



def _count_tenants(db: Path) -> int:
    """Tenants in a data dir's database, read-only (an open server never opens its store)."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            return int(conn.execute("SELECT count(*) FROM tenants").fetchone()[0])
    except sqlite3.Error:
        return 0


__all__ = ["Gateway", "GatewayConfig"]
