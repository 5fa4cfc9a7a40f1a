"""Settled spend per tenant or key in the current day, month and all time, for the budget-alert
scan (gateway/alerts.py): one grouped query per scope, exact integer nano-USD (`cost_nusd`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_OWNER = {"tenant": "tenant_id", "key": "key_id"}
_CHUNK = 500  # ids per statement


@dataclass(slots=True)
class PeriodSpend:
    day: int = 0  # nano-USD settled since the day's start
    month: int = 0
    total: int = 0  # all time (0 unless asked for)

    def for_period(self, period: str) -> int:
        return self.day if period == "day" else self.month if period == "month" else self.total


class SpendOps:
    """Mixed into `SqlStore` (the same `_q`)."""

    def _q(self, sql: str, args: tuple | list = ()) -> Any:
        raise NotImplementedError

    def period_spend(self, scope: str, ids: list[str], day: float, month: float,
                     all_time: bool = False) -> dict[str, PeriodSpend]:
        """`scope` 'tenant' or 'key': each id's settled nano-USD since `day` and `month` (and all time
        when `all_time`; otherwise only rows since the earlier of the two are read)."""
        col = _OWNER[scope]
        out: dict[str, PeriodSpend] = {}
        lower = min(day, month)
        for i in range(0, len(ids), _CHUNK):
            chunk = ids[i:i + _CHUNK]
            cond = f"{col} IN ({','.join('?' * len(chunk))})"
            args: list[Any] = [day, month, *chunk]
            if not all_time:
                cond += " AND created_at >= ?"
                args.append(lower)
            rows = self._q(
                f"SELECT {col}, coalesce(sum(CASE WHEN created_at >= ? THEN cost_nusd ELSE 0 END), 0), "
                "coalesce(sum(CASE WHEN created_at >= ? THEN cost_nusd ELSE 0 END), 0), coalesce(sum(cost_nusd), 0) "
                f"FROM usage WHERE {cond} GROUP BY {col}", args).fetchall()
            for oid, d, m, t in rows:
                out[oid] = PeriodSpend(int(d), int(m), int(t) if all_time else 0)
        return out
