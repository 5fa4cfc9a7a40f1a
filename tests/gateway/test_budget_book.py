"""`BudgetBook` when a budget, period or price changes while requests are in flight."""
from __future__ import annotations

from datetime import UTC, datetime

import pytest

from lockgate.gateway.budget import BudgetBook, period_start
from lockgate.server.errors import APIError
from lockgate.store.models import Tenant

DAY = datetime(2026, 12, 5, 12, 0, tzinfo=UTC).timestamp()


def _tenant(budget: float | None, period: str = "total") -> Tenant:
    return Tenant(id="ten_a", name="a", budget_usd=budget, budget_period=period)


def test_holds_without_a_budget_count_once_a_budget_is_set() -> None:
    book = BudgetBook()
    book.roll("ten_a", "total", DAY)
    book.reserve(_tenant(None), 0.008)  # a stream opened with no budget: held all the same
    assert book.reserved("ten_a") == pytest.approx(0.008)
    limited = _tenant(0.01)  # an admin sets a budget of $0.01 meanwhile
    with pytest.raises(APIError) as e:
        book.reserve(limited, 0.008)  # 0.008 in flight + 0.008 would pass 0.01
    assert e.value.status == 429 and e.value.code == "budget_exceeded"
    book.reserve(limited, 0.002)
    book.settle("ten_a", 0.008, 0.007, DAY)  # the first stream releases its own hold only
    assert book.reserved("ten_a") == pytest.approx(0.002)
    with pytest.raises(APIError):
        book.reserve(limited, 0.0015)  # 0.007 spent + 0.002 held + 0.0015 > 0.01
    book.reserve(limited, 0.001)
    book.settle("ten_a", 0.002, 0.002, DAY)
    book.settle("ten_a", 0.001, 0.001, DAY)
    assert book.remaining(limited) == pytest.approx(0.0) and book.reserved("ten_a") == pytest.approx(0.0)


def test_a_new_period_keeps_live_holds() -> None:
    book = BudgetBook()
    tenant = _tenant(1.0, "day")
    book.roll("ten_a", "day", DAY)
    book.reserve(tenant, 0.6)
    book.settle("ten_a", 0.0, 0.3, DAY)  # spent earlier today
    book.roll("ten_a", "day", DAY + 86400)  # the next day starts empty ...
    assert book.remaining(tenant) == pytest.approx(0.4)  # ... but the 0.6 in flight still counts
    book.settle("ten_a", 0.6, 0.5, DAY + 86400)
    assert book.remaining(tenant) == pytest.approx(0.5) and book.reserved("ten_a") == pytest.approx(0.0)


def test_a_changed_kind_of_period_is_left_to_the_ledger_reload() -> None:
    book = BudgetBook()
    book.load("ten_a", "day", period_start("day", DAY), 0.2)
    book.roll("ten_a", "month", DAY)  # the tenant now says month: not a rollover, nothing reset
    assert not book.current(_tenant(1.0, "month"), DAY)
    assert book.remaining(_tenant(1.0, "day")) == pytest.approx(0.8)


def test_costs_settled_while_the_ledger_is_read_are_not_lost() -> None:
    book = BudgetBook()
    tenant = _tenant(1.0, "month")
    book.load("ten_a", "day", period_start("day", DAY), 0.0)
    book.reserve(tenant, 0.5)
    mark = book.mark("ten_a")  # the reload takes its mark, then reads the month's spend: 0.3
    book.settle("ten_a", 0.5, 0.4, DAY)  # a request settles while the read is in flight
    book.load("ten_a", "month", period_start("month", DAY), 0.3, mark)
    assert book.remaining(tenant) == pytest.approx(0.3)  # 1.0 - 0.3 - 0.4 (maybe counted twice: safe)
    assert book.reserved("ten_a") == pytest.approx(0.0)
