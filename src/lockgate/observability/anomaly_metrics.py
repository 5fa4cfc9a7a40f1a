"""`lockgate:spend_anomalies{tenant,direction}`: the cost anomalies of the last complete hour.

Set from each scan (gateway/anomaly.py; the alert loop calls `update` with what
`scan` found) and read at scrape time. A tenant once seen keeps its series at 0
after its anomalies clear, so a rule sees the fall, not a vanished series.
Tenant labels are bounded as every per-tenant metric's (labels.py).
"""
from __future__ import annotations

import threading
from collections.abc import Iterable

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lockgate.gateway.anomaly import Anomaly
from lockgate.observability.labels import TenantLabels

NAME = "lockgate:spend_anomalies"
DIRECTIONS = ("spike", "drop")


class AnomalyMetrics(Collector):
    """Register on the server's registry (`ServerMetrics.registry.register(...)`): a scrape-time
    collector, merged across API workers like the others."""

    def __init__(self, tenants: TenantLabels | None = None) -> None:
        self.tenants = tenants if tenants is not None else TenantLabels()
        self._counts: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()  # scans and scrapes run on different threads

    def update(self, anomalies: Iterable[Anomaly]) -> None:
        """Replace the counts with those of one scan (anomalies of one hour)."""
        counts: dict[tuple[str, str], int] = {}
        for a in anomalies:
            key = (self.tenants.label(a.tenant_id), a.direction)
            counts[key] = counts.get(key, 0) + 1
        with self._lock:
            self._counts = {k: 0 for k in self._counts} | counts

    def collect(self) -> Iterable[Metric]:
        g = GaugeMetricFamily(NAME, "Cost anomalies (spend or tokens per hour against the tenant's own baseline, "
                              "per tenant, key and model) in the last complete hour scanned.",
                              labels=["tenant", "direction"])
        with self._lock:
            items = sorted(self._counts.items())
        for (tenant, direction), n in items:
            g.add_metric([tenant, direction], n)
        yield g
