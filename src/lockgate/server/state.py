"""`AppState`: the server's state every route reads, one per server process.

What serves a given request is not here: the model registry (`models`) answers
that per request with a `Target` (lifecycle/target.py), which the request
pipeline (pipeline.py) carries from routing to settlement.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from lockgate.gateway.gateway import Gateway
from lockgate.gateway.response_cache import ResponseCache
from lockgate.lifecycle.registry import ModelRegistry
from lockgate.observability.metrics import ServerMetrics
from lockgate.observability.observer import Observer
from lockgate.server.config import ServerConfig

LEASE_SCOPE_KEY = "lockgate.lease"  # where the guard middleware puts each request's Lease
PRINCIPAL_SCOPE_KEY = "lockgate.principal"  # and the authenticated caller (keyed mode)
VERSION_SCOPE_KEY = "lockgate.model_version"  # the model version serving the request (a response header)
MODEL_SCOPE_KEY = "lockgate.model"  # the served name of the model serving it (x-lockgate-model)
REPLICA_SCOPE_KEY = "lockgate.replica"  # () -> the replica(s) serving it, as they stand when the answer starts
IGNORED_FIELDS_SCOPE_KEY = "lockgate.ignored_fields"  # the body's unknown fields (a response header)


@dataclass(slots=True)
class AppState:
    config: ServerConfig
    metrics: ServerMetrics
    gateway: Gateway  # keys, tenants, limits, budgets, the ledger
    observer: Observer  # request records: logs, SLOs, traces
    models: ModelRegistry  # every served model and version; routes a request to its target
    created: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False
    inflight: int = 0  # HTTP requests (past the guard middleware) not yet fully answered
    response_cache: ResponseCache | None = None  # --response-cache (this process's own; None: off)
