"""`Ledger`: reserve, settle, checkpoint, recover: one usage row per request, exactly once.

The life of a tenant's request in the ledger:
1. reserve: the worst-case cost is held in the tenant's budget book, and a
   reservation row is written before the request runs (the routes await it
   before the first token is sent);
2. checkpoint: while it streams, its generated and cached tokens reach the
   reservation row at least every `CHECKPOINT_INTERVAL_S`;
3. settle: once, however it ends (from the request's lease), the budget hold is
   released, the real cost spent and the usage row replaces the reservation;
4. recover: at start-up, the reservations a killed process left are settled as
   `interrupted`, billed for the checkpointed tokens.

A request refused before it reserved anything and generated nothing writes no
row: the gateway counts it (`Gateway.count_refusal`). The usage of one request
as it happens is its `Meter` (accounting.py); the store's writer thread
(store/writer.py) group-commits the rows.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from lockgate.errors import APIError
from lockgate.gateway.accounting import Meter
from lockgate.gateway.auth import Principal
from lockgate.gateway.budget import BudgetBook, key_book
from lockgate.gateway.shared import interrupted_rows
from lockgate.store.models import ApiKey, Price, Tenant, UsageRecord
from lockgate.store.store_error import StoreUnavailable

if TYPE_CHECKING:
    from lockgate.store.base import Store
    from lockgate.store.writer import AsyncStore

log = logging.getLogger("lockgate.gateway")

CHECKPOINT_INTERVAL_S = 1.0  # streamed tokens reach the on-disk reservation at least this often

RefusalCounter = Callable[[Principal, int, "str | None", float], None]


class Ledger:
    def __init__(self, budgets: BudgetBook, count_refusal: RefusalCounter) -> None:
        self.budgets = budgets
        self.count_refusal = count_refusal  # a request that settles with nothing reserved or generated
        self.store: Store | None = None
        self.astore: AsyncStore | None = None
        self._meters: dict[str, Meter] = {}  # in flight, by request id: what checkpoints write
        self._pending: set[asyncio.Future[None]] = set()  # usage rows queued, not yet written

    def attach(self, store: Store, astore: AsyncStore) -> None:
        """Write to this store from now on (the gateway opened it)."""
        self.store, self.astore = store, astore

    @property
    def shared(self) -> bool:
        return bool(getattr(self.store, "shared", False))

    def detach(self) -> None:
        self.store = self.astore = None

    # ---- per request ------------------------------------------------------------------------
    def open(self, meter: Meter) -> None:
        """Track a metered request (checkpoints) until it settles."""
        self._meters[meter.request_id] = meter

    def reserve(self, meter: Meter, tenant: Tenant, prompt_tokens: int, worst_completion_tokens: int,
                now: float, key: ApiKey | None = None, price: Price | None = None) -> None:
        """Hold the worst-case cost in the tenant's budget and the key's (`APIError` 429 when it does not
        fit either, nothing taken) at the prices in force now, and write the reservation row."""
        price = price or tenant.price_for(meter.model)
        cost = price.cost(prompt_tokens, worst_completion_tokens)
        self.budgets.roll(tenant.id, tenant.budget_period, now)
        if key is not None:
            self.budgets.roll(key_book(key.id), key.budget_period, now)
        self.budgets.reserve(tenant, cost, key)  # raises when it does not fit: nothing taken yet
        meter.prompt_tokens = prompt_tokens
        meter.reserved_usd = cost
        meter.price = price  # settled at the prices it was reserved at
        # On disk before the first token is sent (the routes await it before answering).
        assert self.astore is not None
        meter.reservation = asyncio.ensure_future(self.astore.add_reservations([meter.reservation_row()]))

    def settle(self, meter: Meter, status: int, outcome: str, code: str | None = None) -> None:
        """Exactly once per request: release the budget hold, queue the usage row. A request refused
        before it reserved anything (nothing generated either) is counted instead."""
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
            key = meter.principal.key
            self.budgets.settle(meter.principal.tenant.id, meter.reserved_usd, row.cost_usd, time.time(),
                                key.id if key is not None else None)
        if self.astore is None:
            return
        fut = asyncio.ensure_future(self._write_settle(meter, row))
        self._pending.add(fut)
        fut.add_done_callback(self._pending.discard)

    async def _write_settle(self, meter: Meter, row: UsageRecord) -> None:
        if meter.reservation is not None:  # the row replaces the reservation: it must be there first
            try:
                await meter.reservation
            except Exception as e:  # noqa: BLE001 - never reserved (refused, or the store was down)
                if self.shared and meter.completion_tokens == 0:  # nothing ran: a refusal, not a row
                    status, code = (e.status, e.code) if isinstance(e, APIError) else (503, "store_unavailable")
                    self.count_refusal(meter.principal, status, code, meter.created_at)
                    return
        delay = 0.25
        while True:
            if self.astore is None:
                return
            try:
                await self.astore.settle([row])
                return
            except StoreUnavailable as e:  # the row waits here, and is written when the store is back
                log.warning("usage row of %s waits for the store: %s", row.request_id, e)
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)
            except Exception:  # noqa: BLE001 - the reservation stays: settled as interrupted later
                log.exception("could not write the usage row of %s", row.request_id)
                return

    async def drain(self) -> None:
        """Wait until the usage rows queued so far are written (or failed)."""
        if self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)

    # ---- background and start-up ------------------------------------------------------------
    async def checkpoint(self) -> None:
        """Write the tokens streamed since the last checkpoint into the in-flight reservations."""
        if self.astore is None:
            return
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

    async def recover(self) -> None:
        """Settle what a killed process left: each reservation becomes an `interrupted` usage row
        (alone on the store; a shared store sweeps by lease: gateway/shared.py)."""
        assert self.astore is not None and self.store is not None
        store = self.store
        left = await self.astore.call(store.list_reservations)
        if not left:
            return
        tenants = {t.id: t for t in await self.astore.call(store.list_tenants)}
        rows = interrupted_rows(left, tenants)
        await self.astore.settle(rows)
        log.warning("settled %d request(s) interrupted by the previous shutdown", len(rows))
