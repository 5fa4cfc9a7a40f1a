"""Budgets: reserve the worst case before admission, settle the real cost after.

Per tenant, and per key, in memory: what was spent in the current period (loaded
from the ledger at start) and what live requests have reserved. A request is
admitted only if spent + reserved + its worst case (prompt + max_tokens at the
tenant's prices) fits its tenant's budget and its key's budget (the stricter
wins); both are checked and both held with no await in between, so 20
concurrent requests against a budget that covers 4 admit exactly 4 and can never
spend more than either budget. Periods are calendar days or months in UTC
(store/periods.py); a key's period is its own.

Every tenant's and key's book holds its live reservations, budget or not, and a
new book (a period rolled over or changed) carries them: a budget, period or
price set while requests are in flight counts what they may still spend, and
each request releases exactly what it reserved (at the prices it was admitted
with, which it is also billed at), so no settlement can free another request's hold.
"""
from __future__ import annotations

from dataclasses import dataclass

from lockgate.errors import APIError
from lockgate.store.models import ApiKey, Tenant
from lockgate.store.periods import period_end, period_start

__all__ = ["BudgetBook", "TenantBudget", "budget_exceeded", "key_book", "period_end", "period_start"]


def key_book(key_id: str) -> str:
    """A key's book id (tenant ids never start with `k:`); the same id as the shared store's book row."""
    return f"k:{key_id}"


def budget_exceeded(amount: float, left: float, period: str, budget: float, key_id: str | None = None) -> APIError:
    """The 429 for a budget that cannot hold a request's worst case: the tenant's, or its key's."""
    whose = f"the {period} budget" if key_id is None else f"the key's {period} budget"
    which = "" if key_id is None else f" (key {key_id})"
    return APIError(
        429, f"budget exceeded: this request may cost up to ${amount:.6f} but ${max(0.0, left):.6f} of "
             f"{whose} of ${budget:g} is left{which} (reduce max_tokens, or wait for requests in flight to finish)",
        code="budget_exceeded", type_="insufficient_quota")


@dataclass(slots=True)
class TenantBudget:
    """One book: a tenant's, or a key's (`key_book`)."""

    period: str
    start: float | None
    end: float
    spent: float = 0.0  # settled in this period
    reserved: float = 0.0  # held by live requests (whatever their period)
    settled: float = 0.0  # every cost ever settled into this book (see `mark`)
    loaded: bool = True  # its spend was read from the ledger (False: made by `roll` from nothing)


class BudgetBook:
    def __init__(self) -> None:
        self._books: dict[str, TenantBudget] = {}

    def load(self, book_id: str, period: str, start: float | None, spent: float,
             mark: float | None = None) -> None:
        """Set a book's spend for the period starting at `start` (from the ledger), keeping live holds.

        `mark`: what `mark()` said before the ledger was read. Costs settled since then are added, as
        they may have missed the read (one that did not is counted twice: the safe side)."""
        self._set(book_id, period, start, spent, mark, loaded=True)

    def _set(self, book_id: str, period: str, start: float | None, spent: float, mark: float | None,
             loaded: bool) -> None:
        old = self._books.get(book_id)
        reserved = old.reserved if old is not None else 0.0
        settled = old.settled if old is not None else 0.0
        if mark is not None:
            spent += max(0.0, settled - mark)
        self._books[book_id] = TenantBudget(period, start, period_end(period, start), spent, reserved, settled,
                                            loaded)

    def mark(self, book_id: str) -> float:
        """The book's settled total now (taken before reading its spend from the ledger)."""
        book = self._books.get(book_id)
        return book.settled if book is not None else 0.0

    def roll(self, book_id: str, period: str, now: float) -> None:
        """A book that covers `now`: created empty (not `loaded`: the next reload reads its spend), or a
        new period of the same kind started empty, live holds kept. A book whose kind of period
        changed is left to the ledger reload (`Gateway.reload`), which knows what the new period
        already spent."""
        book = self._books.get(book_id)
        if book is None:
            self._set(book_id, period, period_start(period, now), 0.0, None, loaded=False)
        elif now >= book.end:
            self._set(book_id, book.period, period_start(book.period, now), 0.0, None, loaded=book.loaded)

    def has(self, book_id: str) -> bool:
        return book_id in self._books

    def current(self, tenant: Tenant, now: float) -> bool:
        """Whether the tenant's book covers `now` in its configured period, with its spend read."""
        return self.covers(tenant.id, tenant.budget_period, now)

    def covers(self, book_id: str, period: str, now: float) -> bool:
        book = self._books.get(book_id)
        return book is not None and book.loaded and book.period == period and now < book.end

    def reserve(self, tenant: Tenant, amount: float, key: ApiKey | None = None) -> None:
        """Hold `amount` USD in the tenant's book and the key's, or refuse with 429 budget_exceeded
        (insufficient_quota) naming the budget that cannot hold it (the one with less left when both
        cannot), nothing held. Held with no budget too: a budget set later counts it (the books must
        exist: `roll`)."""
        book = self._books[tenant.id]
        kbook = self._books[key_book(key.id)] if key is not None else None
        refusals = []
        if tenant.budget_usd is not None and book.spent + book.reserved + amount > tenant.budget_usd + 1e-12:
            left = tenant.budget_usd - book.spent - book.reserved
            refusals.append((left, budget_exceeded(amount, left, tenant.budget_period, tenant.budget_usd)))
        if (key is not None and kbook is not None and key.budget_usd is not None
                and kbook.spent + kbook.reserved + amount > key.budget_usd + 1e-12):
            left = key.budget_usd - kbook.spent - kbook.reserved
            refusals.append((left, budget_exceeded(amount, left, key.budget_period, key.budget_usd, key.id)))
        if refusals:
            raise min(refusals, key=lambda r: r[0])[1]
        book.reserved += amount
        if kbook is not None:
            kbook.reserved += amount

    def settle(self, tenant_id: str, reserved: float, cost: float, at: float, key_id: str | None = None) -> None:
        """Release a hold and book the real cost (in the period it was spent in), in the tenant's book
        and the key's."""
        for book_id in (tenant_id, key_book(key_id) if key_id else None):
            book = self._books.get(book_id) if book_id is not None else None
            if book is None:
                continue
            book.reserved = max(0.0, book.reserved - reserved)
            book.settled += cost
            if book.start is None or book.start <= at < book.end:
                book.spent += cost

    def reserved(self, book_id: str) -> float:
        """What live requests hold (0 when none: nothing leaked)."""
        book = self._books.get(book_id)
        return book.reserved if book is not None else 0.0

    def remaining(self, tenant: Tenant) -> float | None:
        if tenant.budget_usd is None or tenant.id not in self._books:
            return None
        book = self._books[tenant.id]
        return tenant.budget_usd - book.spent - book.reserved

    def remaining_key(self, key: ApiKey) -> float | None:
        book = self._books.get(key_book(key.id))
        if key.budget_usd is None or book is None:
            return None
        return key.budget_usd - book.spent - book.reserved
