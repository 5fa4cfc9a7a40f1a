"""The server's alert machinery from its config: the budget scan and webhook sender
(gateway/alerts.py, webhooks.py) on the gateway's store, and their metrics."""
from __future__ import annotations

import lockgate
from lockgate.gateway.alerts import AlertService, AlertSettings
from lockgate.gateway.gateway import Gateway
from lockgate.gateway.webhooks import SenderSettings
from lockgate.observability.anomaly_metrics import AnomalyMetrics
from lockgate.observability.budget_metrics import BudgetMetrics
from lockgate.observability.labels import TenantLabels
from lockgate.observability.metrics import ServerMetrics
from lockgate.server.config import ServerConfig


def build_alerts(cfg: ServerConfig, gateway: Gateway, metrics: ServerMetrics) -> AlertService | None:
    """The alert service to start once the gateway has opened its store (None: this process does not
    scan: an API worker other than 0). The budget metrics are registered either way."""
    service: AlertService | None = None

    def statuses() -> list:
        return service.scanner.statuses if service is not None else []

    budget = BudgetMetrics(metrics.registry, statuses, cfg.metrics_max_tenants)
    anomalies = AnomalyMetrics(TenantLabels(cfg.metrics_max_tenants))
    metrics.registry.register(anomalies)
    if not cfg.alert_scan:
        return None
    service = AlertService(
        AlertSettings(list(cfg.alert_webhooks), cfg.alert_interval_s, cfg.anomaly_interval_s),
        SenderSettings(allow_private=cfg.alert_allow_private), lambda: gateway.store,
        on_raised=budget.raised, on_delivery=budget.delivery, on_anomalies=anomalies.update)
    service.user_agent = f"lockgate/{lockgate.__version__}"
    return service
