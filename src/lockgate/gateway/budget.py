"""Budgets: reserve the worst case before admission, settle the real cost after.

Per tenant, in memory: what was spent in the current period (loaded from the
ledger at start) and what live requests have reserved. A request is admitted
only if spent + reserved + its worst case (prompt + max_tokens at the tenant's
prices) fits the budget; check and reserve happen with no await in between, so
20 concurrent requests against a budget that covers 4 admit exactly 4 and can
never spend more than the budget. Periods are calendar days or months in UTC.

Every tenant's book holds its live reservations, budget or not, and a new book
(a period rolled over or changed) carries them: a budget, period or price set
while requests are in flight counts what they may still spend, and each request
releases exactly what it reserved (at the prices it was admitted with, which it
is also billed at), so no settlement can free another request's hold.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime

from lockgate.errors import APIError
from lockgate.store.models import Tenant


def period_start(period: str, now: float) -> float | None:
    """Start of the budget period containing `now` (None: all time)."""
    if period == "total":
        return None
    t = datetime.fromtimestamp(now, UTC)
    start = t.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "month":
        start = start.replace(day=1)
    return start.timestamp()


def period_end(period: str, start: float | None) -> float:
    if start is None:
        return math.inf
    t = datetime.fromtimestamp(start, UTC)
    if period == "day":
        return start + 86400.0
    nxt = t.replace(year=t.year + 1, month=1) if t.month == 12 else t.replace(month=t.month + 1)
    return nxt.timestamp()


@dataclass(slots=True)
class TenantBudget:
    period: str
    start: float | None
    end: float
    spent: float = 0.0  # settled in this period
    reserved: float = 0.0  # held by live requests (whatever their period)
    settled: float = 0.0  # every cost ever settled into this tenant's books (see `mark`)


class BudgetBook:
    def __init__(self) -> None:
        self._books: dict[str, TenantBudget] = {}

    def load(self, tenant_id: str, period: str, start: float | None, spent: float,
             mark: float | None = None) -> None:
        """Set a tenant's spend for the period starting at `start` (from the ledger), keeping live holds.

        `mark`: what `mark()` said before the ledger was read. Costs settled since then are added, as
        they may have missed the read (one that did not is counted twice: the safe side)."""
        old = self._books.get(tenant_id)
        reserved = old.reserved if old is not None else 0.0
        settled = old.settled if old is not None else 0.0
        if mark is not None:
            spent += max(0.0, settled - mark)
        self._books[tenant_id] = TenantBudget(period, start, period_end(period, start), spent, reserved, settled)

    def mark(self, tenant_id: str) -> float:
        """The tenant's settled total now (taken before reading its spend from the ledger)."""
        book = self._books.get(tenant_id)
        return book.settled if book is not None else 0.0

    def roll(self, tenant_id: str, period: str, now: float) -> None:
        """A book for the tenant that covers `now`: created empty, or a new period of the same kind
        started empty, live holds kept. A book whose kind of period changed is left to the ledger
        reload (`Gateway.reload`), which knows what the new period already spent."""
        book = self._books.get(tenant_id)
        if book is None:
            self.load(tenant_id, period, period_start(period, now), 0.0)
        elif now >= book.end:
            self.load(tenant_id, book.period, period_start(book.period, now), 0.0)

    def has(self, tenant_id: str) -> bool:
        return tenant_id in self._books

    def current(self, tenant: Tenant, now: float) -> bool:
        """Whether the tenant's book covers `now` in its configured period."""
        book = self._books.get(tenant.id)
        return book is not None and book.period == tenant.budget_period and now < book.end

    def reserve(self, tenant: Tenant, amount: float) -> None:
        """Hold `amount` USD or refuse with 429 budget_exceeded (insufficient_quota). Held with no
        budget too: a budget set later counts it (the tenant's book must exist: `roll`)."""
        book = self._books[tenant.id]
        if tenant.budget_usd is not None and book.spent + book.reserved + amount > tenant.budget_usd + 1e-12:
            left = max(0.0, tenant.budget_usd - book.spent - book.reserved)
            raise APIError(
                429, f"budget exceeded: this request may cost up to ${amount:.6f} but ${left:.6f} of the "
                     f"{tenant.budget_period} budget of ${tenant.budget_usd:g} is left (reduce max_tokens, "
                     "or wait for requests in flight to finish)",
                code="budget_exceeded", type_="insufficient_quota")
        book.reserved += amount

    def settle(self, tenant_id: str, reserved: float, cost: float, at: float) -> None:
        """Release a hold and book the real cost (in the period it was spent in)."""
        book = self._books.get(tenant_id)
        if book is None:
            return
        book.reserved = max(0.0, book.reserved - reserved)
        book.settled += cost
        if book.start is None or book.start <= at < book.end:
            book.spent += cost

    def reserved(self, tenant_id: str) -> float:
        """What live requests hold (0 when none: nothing leaked)."""
        book = self._books.get(tenant_id)
        return book.reserved if book is not None else 0.0

    def remaining(self, tenant: Tenant) -> float | None:
        if tenant.budget_usd is None or tenant.id not in self._books:
            return None
        book = self._books[tenant.id]
        return tenant.budget_usd - book.spent - book.reserved
