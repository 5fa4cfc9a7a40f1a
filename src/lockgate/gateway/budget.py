"""Budgets: reserve the worst case before admission, settle the real cost after.

Per tenant, in memory: what was spent in the current period (loaded from the
ledger at start) and what live requests have reserved. A request is admitted
only if spent + reserved + its worst case (prompt + max_tokens at the tenant's
prices) fits the budget; check and reserve happen with no await in between, so
20 concurrent requests against a budget that covers 4 admit exactly 4 and can
never spend more than the budget. Periods are calendar days or months in UTC.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime

from lockgate.server.errors import APIError
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
    reserved: float = 0.0  # held by live requests


class BudgetBook:
    def __init__(self) -> None:
        self._books: dict[str, TenantBudget] = {}

    def load(self, tenant_id: str, period: str, start: float | None, spent: float) -> None:
        """Set a tenant's spend for the period starting at `start` (from the ledger), keeping live holds."""
        old = self._books.get(tenant_id)
        self._books[tenant_id] = TenantBudget(period, start, period_end(period, start), spent,
                                              old.reserved if old is not None else 0.0)

    def current(self, tenant: Tenant, now: float) -> bool:
        """Whether the tenant's book covers `now` in its configured period."""
        book = self._books.get(tenant.id)
        return book is not None and book.period == tenant.budget_period and now < book.end

    def reserve(self, tenant: Tenant, amount: float) -> None:
        """Hold `amount` USD or refuse with 429 budget_exceeded (insufficient_quota)."""
        if tenant.budget_usd is None:
            return
        book = self._books[tenant.id]
        if book.spent + book.reserved + amount > tenant.budget_usd + 1e-12:
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
        if book.start is None or book.start <= at < book.end:
            book.spent += cost

    def remaining(self, tenant: Tenant) -> float | None:
        if tenant.budget_usd is None or tenant.id not in self._books:
            return None
        book = self._books[tenant.id]
        return tenant.budget_usd - book.spent - book.reserved
