"""Budget periods: calendar days and months in UTC, or all time (`total`).

In the store because the store decides budgets on a shared store (shared_ops.py)
and sums spend per period (spend_ops.py, object_spend.py); the gateway's in-memory books
(gateway/budget.py) use the same functions.
"""
from __future__ import annotations

import math
from datetime import UTC, datetime


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
