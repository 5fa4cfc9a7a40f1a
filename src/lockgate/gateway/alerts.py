"""Budget and anomaly alerts: a background scan that raises each alert once, off the request path.

Every `interval_s` the scan reads every budgeted tenant and key, their settled spend
in the current period (store/spend_ops.py: one query for the tenants, one for the
keys, exact nano-USD) and raises an alert for each threshold crossed: each threshold
once per period, so a jump from 40 % to 100 % raises 50, 80 and 100. The alert's id
is its dedup key (`budget:t:<tenant>:<threshold>:<period start>`), so a second scan,
or another instance scanning the same store, raises nothing new (store/alert_ops.py);
a new period has a new start, so it alerts again. Every `anomaly_interval_s` it asks
the anomaly detector (gateway/anomaly.py) for anomalies and raises those the same way.

Raised alerts get one delivery row per receiver (the server's `--alert-webhook` URLs
and the tenant's own `alert_webhook`); webhooks.py sends them. The scan runs on a
thread of its own: a request never waits for it.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from lockgate.gateway.webhooks import SenderSettings, WebhookSender, load_secret
from lockgate.store.alert_ops import Alert
from lockgate.store.models import ApiKey, Tenant
from lockgate.store.money import nano, usd
from lockgate.store.periods import period_start

log = logging.getLogger("lockgate.alerts")

DEFAULT_INTERVAL_S = 5.0
DEFAULT_ANOMALY_INTERVAL_S = 300.0


@dataclass(slots=True)
class AlertSettings:
    receivers: list[str] = field(default_factory=list)  # the server's --alert-webhook URLs (every alert)
    interval_s: float = DEFAULT_INTERVAL_S  # budget thresholds are checked this often
    anomaly_interval_s: float = DEFAULT_ANOMALY_INTERVAL_S  # the anomaly detector runs this often


@dataclass(slots=True)
class BudgetStatus:
    """One budgeted tenant or key in its current period, as the latest scan saw it."""

    scope: str  # 'tenant' | 'key'
    tenant: Tenant
    key: ApiKey | None
    budget_nusd: int
    spent_nusd: int
    period: str
    start: float | None  # None: all time

    @property
    def remaining_nusd(self) -> int:
        return self.budget_nusd - self.spent_nusd

    @property
    def thresholds(self) -> list[float]:
        return valid_thresholds((self.key or self.tenant).alert_thresholds)


def valid_thresholds(values: Any) -> list[float]:
    """The thresholds (% of budget) worth checking, sorted: numbers in (0, 100], each once. Input is
    checked where it is set; this guards the scan against anything odd that reached the store."""
    out = set()
    for v in values if isinstance(values, list) else []:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and 0 < v <= 100:
            out.add(float(v))
    return sorted(out)


def crossed(spent_nusd: int, budget_nusd: int, threshold: float) -> bool:
    """spent >= threshold % of budget, exactly (integers and the threshold's decimal)."""
    return Decimal(spent_nusd) * 100 >= Decimal(repr(threshold)) * budget_nusd


def _start_label(start: float | None) -> str:
    return "total" if start is None else str(int(start))


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


def alert_id(status: BudgetStatus, threshold: float) -> str:
    who = f"t:{status.tenant.id}" if status.key is None else f"k:{status.key.id}"
    return f"budget:{who}:{threshold:g}:{_start_label(status.start)}"


def budget_alerts(status: BudgetStatus, now: float) -> list[Alert]:
    """An alert for every threshold the status has crossed (the store drops those raised before)."""
    if status.budget_nusd <= 0:  # a zero budget blocks everything: "100 % used" at no spend is noise
        return []
    out = []
    for threshold in status.thresholds:
        if not crossed(status.spent_nusd, status.budget_nusd, threshold):
            break  # sorted: no higher one is crossed either
        aid = alert_id(status, threshold)
        key = status.key
        payload = {
            "id": aid, "kind": "budget", "scope": status.scope,
            "tenant_id": status.tenant.id, "tenant_name": status.tenant.name,
            "key_id": key.id if key is not None else None, "key_name": key.name if key is not None else None,
            "threshold_pct": threshold, "budget_usd": usd(status.budget_nusd), "spent_usd": usd(status.spent_nusd),
            "remaining_usd": usd(status.remaining_nusd), "period": status.period,
            "period_start": _iso(status.start), "time": _iso(now),
        }
        out.append(Alert(aid, "budget", status.tenant.id, key.id if key is not None else None, payload, now))
    return out


def budget_statuses(store: Any, now: float) -> list[BudgetStatus]:
    """Every budgeted tenant and key (live ones) with its settled spend in its current period."""
    tenants = {t.id: t for t in store.list_tenants()}
    keys = [k for k in store.list_keys() if k.tenant_id in tenants and k.budget_usd is not None
            and k.revoked_at is None and (k.expires_at is None or k.expires_at > now)]
    budgeted = [t for t in tenants.values() if t.budget_usd is not None]
    day, month = period_start("day", now), period_start("month", now)
    assert day is not None and month is not None
    out: list[BudgetStatus] = []
    for scope, items in (("tenant", budgeted), ("key", keys)):
        if not items:
            continue
        all_time = any(x.budget_period == "total" for x in items)
        spend = store.period_spend(scope, [x.id for x in items], day, month, all_time)
        for x in items:
            tenant = x if scope == "tenant" else tenants[x.tenant_id]  # type: ignore[index]
            period = x.budget_period if x.budget_period in ("day", "month") else "total"
            got = spend.get(x.id)
            out.append(BudgetStatus(scope, tenant, None if scope == "tenant" else x, nano(x.budget_usd),
                                    got.for_period(period) if got else 0, period, period_start(period, now)))
    return out


def anomaly_alerts(store: Any, now: float, on_found: Callable[[list[Any]], None] | None = None) -> list[Alert]:
    """The anomaly detector's findings as alerts; `on_found` gets the anomalies themselves (metrics)."""
    from lockgate.gateway import anomaly

    found = anomaly.scan(store, now)
    if on_found is not None:
        on_found(found)
    out = []
    for a in found:
        payload = dict(a.payload())
        payload.setdefault("id", a.id)
        payload.setdefault("kind", "anomaly")
        payload.setdefault("time", _iso(now))
        out.append(Alert(a.id, "anomaly", a.tenant_id, a.key_id, payload, now))
    return out


class AlertScanner:
    """One scan over the store (synchronous: it runs on the alert loop's thread)."""

    def __init__(self, settings: AlertSettings, on_raised: Callable[[str], None] | None = None,
                 on_anomalies: Callable[[list[Any]], None] | None = None) -> None:
        self.settings = settings
        self.on_raised = on_raised
        self.on_anomalies = on_anomalies
        self.statuses: list[BudgetStatus] = []  # the latest budget scan (the budget gauges read it)
        self._next_anomaly = 0.0

    def receivers(self, tenant: Tenant | None) -> list[str]:
        urls = list(self.settings.receivers)
        if tenant is not None and tenant.alert_webhook:
            urls.append(tenant.alert_webhook)
        return list(dict.fromkeys(urls))

    def raise_all(self, store: Any, alerts: list[Alert], tenants: dict[str, Tenant]) -> int:
        raised = 0
        for a in alerts:
            tenant = tenants.get(a.tenant_id) if a.tenant_id else None
            if store.raise_alert(a, self.receivers(tenant)):
                raised += 1
                log.info("alert %s raised", a.id)
                if self.on_raised is not None:
                    self.on_raised(a.kind)
        return raised

    def scan(self, store: Any, now: float | None = None) -> int:
        """Budgets every call, anomalies when due; the number of alerts raised (new ones only)."""
        now = time.time() if now is None else now
        statuses = budget_statuses(store, now)
        self.statuses = statuses
        tenants = {s.tenant.id: s.tenant for s in statuses}
        raised = self.raise_all(store, [a for s in statuses for a in budget_alerts(s, now)], tenants)
        if now >= self._next_anomaly:
            self._next_anomaly = now + self.settings.anomaly_interval_s
            found = anomaly_alerts(store, now, self.on_anomalies)
            if found:
                tenants = {t.id: t for t in store.list_tenants()}
                raised += self.raise_all(store, found, tenants)
        return raised


class AlertService:
    """The budget scan and the webhook sender for as long as the server runs, each in its own asyncio
    task; their store calls run on one thread of their own (never the event loop, never the ledger's
    writer). `store()` is the gateway's open store, or None (open mode before a store exists)."""

    def __init__(self, settings: AlertSettings, sender: SenderSettings, store: Callable[[], Any],
                 on_raised: Callable[[str], None] | None = None,
                 on_delivery: Callable[[str], None] | None = None,
                 on_anomalies: Callable[[list[Any]], None] | None = None) -> None:
        self.scanner = AlertScanner(settings, on_raised, on_anomalies)
        self.sender_settings = sender
        self.store = store
        self.on_delivery = on_delivery
        self.user_agent = "lockgate"
        self.sender: WebhookSender | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="lockgate-alerts")
        self._tasks: list[asyncio.Task[None]] = []

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: fn(*args))

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._scan_loop(), name="alert-scan"),
                       asyncio.create_task(self._send_loop(), name="alert-webhooks")]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self.sender is not None:
            await self.sender.aclose()
        # A scan or delivery update under way finishes before the gateway closes the store.
        await asyncio.to_thread(self._pool.shutdown, True, cancel_futures=True)

    async def _scan_loop(self) -> None:
        while True:
            store = self.store()
            if store is not None:
                try:
                    await self._call(self.scanner.scan, store)
                except Exception as e:  # noqa: BLE001 - the store may be down: next round
                    log.warning("alert scan failed: %r", e)
            await asyncio.sleep(self.scanner.settings.interval_s)

    async def _send_loop(self) -> None:
        while self.sender is None:  # the signing secret comes from the store unless set in the environment
            store = self.store()
            if store is not None:
                try:
                    secret = await self._call(load_secret, store)
                    self.sender = WebhookSender(self.sender_settings, secret, self._call, self.on_delivery,
                                                self.user_agent)
                    break
                except Exception as e:  # noqa: BLE001
                    log.warning("cannot read the alert signing secret: %r", e)
            await asyncio.sleep(self.sender_settings.poll_s)
        await self.sender.run(self.store)
