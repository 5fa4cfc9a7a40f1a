"""Budget and alert metrics: each tenant's budget, spend and remaining budget in its current
period (from the alert scan's latest view of the store), alerts raised and webhook deliveries.

The budget gauges are computed at scrape time from what the last scan read (no query per
scrape). They describe the store, the same from any API worker, so with `--api-workers` the
merged page shows the primary's (worker 0 runs the scan; observability/worker_metrics.py).
Tenant labels are bounded as the request metrics' are (labels.py): the first `cap` budgeted
tenants (by creation) have a series; the rest have none (a sum under `other` would be no one's
budget). The counters are per process, summed across workers.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lockgate.store.money import usd


class _BudgetCollector(Collector):
    def __init__(self, statuses: Callable[[], list[Any]], cap: int) -> None:
        self.statuses = statuses
        self.cap = cap

    def collect(self) -> Iterable[Metric]:
        labels = ["tenant", "period"]
        budget = GaugeMetricFamily("lockgate:tenant_budget_usd", "A tenant's budget for its current period (USD).",
                                   labels=labels)
        spend = GaugeMetricFamily("lockgate:tenant_spend_usd", "A tenant's settled spend in its current budget "
                                  "period (USD, the usage ledger's exact sum).", labels=labels)
        remaining = GaugeMetricFamily("lockgate:tenant_budget_remaining_usd", "Budget minus settled spend in the "
                                      "current period (USD; negative when a budget was lowered below spend).",
                                      labels=labels)
        tenants = [s for s in self.statuses() if s.scope == "tenant"]
        tenants.sort(key=lambda s: (s.tenant.created_at, s.tenant.id))
        for s in tenants[:self.cap]:
            values = [s.tenant.id, s.period]
            budget.add_metric(values, usd(s.budget_nusd))
            spend.add_metric(values, usd(s.spent_nusd))
            remaining.add_metric(values, usd(s.remaining_nusd))
        yield from (budget, spend, remaining)


class BudgetMetrics:
    def __init__(self, registry: CollectorRegistry, statuses: Callable[[], list[Any]], cap: int = 100) -> None:
        self.alerts_raised = Counter("lockgate:alerts_raised", "Alerts raised by this server (budget thresholds, "
                                     "anomalies); each alert once however many instances see it.", ["kind"],
                                     registry=registry)
        self.deliveries = Counter("lockgate:alert_deliveries", "Alert webhook attempts by result: delivered, "
                                  "failed (retried later), gave_up, refused (address not allowed).", ["result"],
                                  registry=registry)
        for kind in ("budget", "anomaly"):
            self.alerts_raised.labels(kind)
        for result in ("delivered", "failed", "gave_up", "refused"):
            self.deliveries.labels(result)
        registry.register(_BudgetCollector(statuses, cap))

    def raised(self, kind: str) -> None:
        self.alerts_raised.labels(kind if kind in ("budget", "anomaly") else "other").inc()

    def delivery(self, result: str) -> None:
        self.deliveries.labels(result).inc()
