"""`spend` on tenant and key objects: spent this period, held, budget and what is left.

The sums come from the store in one grouped query per list (store/object_spend.py,
exact integer nano-USD); this module picks each object's period and words it:
`{"period", "period_start", "spent_usd", "reserved_usd", "budget_usd", "remaining_usd"}`.
A key shows its own budget's period; a key without a budget shows its spend in
its tenant's period. `remaining_usd` is budget - spent - reserved (null without
a budget; below zero when a budget was lowered under what is already spent).
"""
from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from lockgate.store.models import ApiKey, Tenant
from lockgate.store.money import nano, usd
from lockgate.store.object_spend import SpendSums
from lockgate.store.periods import period_start


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def spend_json(sums: SpendSums | None, budget_usd: float | None, period: str, now: float) -> dict[str, Any]:
    sums = sums or SpendSums()
    spent = sums.spent_nusd.get(period if period in ("day", "month") else "total", 0)
    held = sums.reserved_nusd
    return {"period": period, "period_start": _iso(period_start(period, now)), "spent_usd": usd(spent),
            "reserved_usd": usd(held), "budget_usd": budget_usd,
            "remaining_usd": None if budget_usd is None else usd(nano(budget_usd) - spent - held)}


def tenants_spend(store: Any, tenants: Iterable[Tenant], now: float) -> dict[str, dict[str, Any]]:
    """Each tenant's `spend` (one query for the whole list)."""
    tenants = list(tenants)
    sums = store.spend_sums("tenant_id", [t.id for t in tenants], now) if tenants else {}
    return {t.id: spend_json(sums.get(t.id), t.budget_usd, t.budget_period, now) for t in tenants}


def key_period(key: ApiKey, tenant: Tenant | None) -> str:
    """The period a key's spend is shown in: its budget's, else its tenant's."""
    if key.budget_usd is not None or tenant is None:
        return key.budget_period
    return tenant.budget_period


def keys_spend(store: Any, keys: Iterable[ApiKey], tenants: dict[str, Tenant], now: float) -> dict[str, Any]:
    """Each tenant key's `spend` (one query for the whole list); None for a key bound to no tenant."""
    keys = list(keys)
    billed = [k for k in keys if k.tenant_id is not None]
    sums = store.spend_sums("key_id", [k.id for k in billed], now) if billed else {}
    out: dict[str, Any] = {k.id: None for k in keys}
    for k in billed:
        out[k.id] = spend_json(sums.get(k.id), k.budget_usd, key_period(k, tenants.get(k.tenant_id or "")), now)
    return out
