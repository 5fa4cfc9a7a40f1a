"""`Observer`: what happens when a request starts and when it ends, in one place.

`open` starts an inference request's `RequestRecord`; `end` runs once, from the
guard middleware after the request's lease is released (so the usage meter has
settled): the cost counter, the SLO verdict, the JSON log line. Tracing hooks
live on `tracer` (None unless configured: then no tracer work at all).
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Protocol

from lockgate.gateway.auth import Principal
from lockgate.gateway.classes import ClassTable
from lockgate.observability.labels import TenantLabels
from lockgate.observability.record import RequestRecord
from lockgate.observability.request_log import RequestLogger
from lockgate.observability.slo import SloTracker
from lockgate.observability.tracing import RequestTracer, build_tracer

if TYPE_CHECKING:
    from lockgate.gateway.lease import Lease
    from lockgate.observability.metrics import ServerMetrics


class ObserverConfig(Protocol):
    """The settings `Observer.from_config` reads (the server's config has them)."""

    request_log: str  # "json" or "off"
    request_log_file: str | None
    log_prompts: bool
    otel_endpoint: str | None
    slo_period_s: float
    metrics_max_tenants: int


class Observer:
    def __init__(self, metrics: ServerMetrics, slo: SloTracker, log: RequestLogger,
                 tracer: RequestTracer | None = None, tenants: TenantLabels | None = None) -> None:
        self.metrics = metrics
        self.slo = slo
        self.log = log
        self.tracer = tracer
        self.tenants = tenants if tenants is not None else TenantLabels()

    @classmethod
    def from_config(cls, config: ObserverConfig, metrics: ServerMetrics, classes: ClassTable) -> Observer:
        slo = SloTracker(classes, config.slo_period_s)
        metrics.register_slo(slo)
        log = RequestLogger(config.request_log, config.request_log_file, config.log_prompts)
        return cls(metrics, slo, log, build_tracer(config.otel_endpoint), TenantLabels(config.metrics_max_tenants))

    def open(self, request_id: str, route: str, principal: Principal | None) -> RequestRecord:
        tenant = principal.tenant if principal is not None else None
        key = principal.key if principal is not None else None
        return RequestRecord(
            request_id, route, tenant_id=tenant.id if tenant is not None else None,
            tenant_name=tenant.name if tenant is not None else None,
            tenant=self.tenants.label(tenant.id if tenant is not None else None),
            key_id=key.id if key is not None else None)

    def end(self, record: RequestRecord, lease: Lease) -> None:
        """Once per request, after everything it held was given back."""
        record.status, record.code, record.outcome = lease.status, lease.code, lease.outcome
        record.ended = time.monotonic()
        self.metrics.charge(record)
        good = record.slo_good()
        if good is not None:
            self.slo.record(record.class_name, good)
        self.log.log(record)

    def close(self) -> None:
        self.log.close()
        if self.tracer is not None:
            self.tracer.shutdown()
