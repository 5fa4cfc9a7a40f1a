"""Spend per tenant or key, for the tenant and key objects' `spend` (gateway/spend.py words it).

One grouped query over the ledger for a whole list of tenants or keys (never
one per row): each owner's settled spend since the start of the current day,
month and all time, summed from the exact integer `cost_nusd` (store/money.py),
and one over the open reservations (their worst cases, held until settled).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lockgate.store.money import nano
from lockgate.store.periods import period_start

SPEND_OWNERS = ("tenant_id", "key_id")
_CHUNK = 500  # ids per statement (SQLite's variable limit is far above; a bound all the same)


@dataclass(slots=True)
class SpendSums:
    """One tenant's or key's spend now."""

    spent_nusd: dict[str, int] = field(default_factory=lambda: {"day": 0, "month": 0, "total": 0})
    reserved_nusd: int = 0  # open reservations' worst cases


class ObjectSpendOps:
    """Mixed into `SqlStore` (the same `_q`)."""

    def _q(self, sql: str, args: tuple | list = ()) -> Any:
        raise NotImplementedError

    def spend_sums(self, owner: str, ids: list[str] | None, now: float) -> dict[str, SpendSums]:
        """`owner` is `tenant_id` or `key_id`; `ids` None: every owner with spend. Owners with no
        usage and no reservation get zeros."""
        if owner not in SPEND_OWNERS:
            raise ValueError(f"owner must be one of {', '.join(SPEND_OWNERS)}")
        out: dict[str, SpendSums] = {i: SpendSums() for i in ids or []}
        day, month = period_start("day", now), period_start("month", now)
        chunks = [None] if ids is None else [ids[i:i + _CHUNK] for i in range(0, len(ids), _CHUNK)]
        for chunk in chunks:
            if chunk == []:
                continue
            cond, args = (f"{owner} IS NOT NULL", []) if chunk is None else \
                (f"{owner} IN ({','.join('?' * len(chunk))})", list(chunk))
            rows = self._q(
                f"SELECT {owner}, coalesce(sum(cost_nusd), 0), "
                "coalesce(sum(CASE WHEN created_at >= ? THEN cost_nusd ELSE 0 END), 0), "
                "coalesce(sum(CASE WHEN created_at >= ? THEN cost_nusd ELSE 0 END), 0) "
                f"FROM usage WHERE {cond} GROUP BY {owner}", (month, day, *args)).fetchall()
            for oid, total, in_month, in_day in rows:
                s = out.setdefault(oid, SpendSums())
                s.spent_nusd = {"day": int(in_day), "month": int(in_month), "total": int(total)}
            held = self._q(f"SELECT {owner}, coalesce(sum(reserved_usd), 0) FROM reservations WHERE {cond} "
                           f"GROUP BY {owner}", args).fetchall()
            for oid, amount in held:
                out.setdefault(oid, SpendSums()).reserved_nusd = nano(float(amount))
        return out

    def key_spent_usd(self, key_id: str, since: float | None) -> float:
        """A key's settled cost since `since` (None: all time), as `spent_usd` is a tenant's."""
        if since is None:
            row = self._q("SELECT coalesce(sum(cost_usd), 0) FROM usage WHERE key_id = ?", (key_id,)).fetchone()
        else:
            row = self._q("SELECT coalesce(sum(cost_usd), 0) FROM usage WHERE key_id = ? AND created_at >= ?",
                          (key_id, float(since))).fetchone()
        return float(row[0])
