"""`GET /admin/alerts`: budget and anomaly alerts, newest first, with each receiver's delivery state.

A global admin sees every alert; a tenant's admin key sees its own tenant's (another tenant's
id is a 404, as if it did not exist) and only the deliveries to its tenant's own webhook: the
server's receivers are the operator's (their URLs may hold tokens).
"""
from __future__ import annotations

import math
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from lockgate.server.errors import APIError, bad_request, json_response
from lockgate.server.openapi import GUARDED, operation
from lockgate.server.state import PRINCIPAL_SCOPE_KEY, AppState

alert_router = APIRouter()
KINDS = ("budget", "anomaly")
MAX_LIMIT = 10_000


def _query(request: Request) -> tuple[str | None, str | None, float | None, int]:
    q = request.query_params
    kind = q.get("kind") or None
    if kind is not None and kind not in KINDS:
        raise bad_request(f"kind: must be one of {', '.join(KINDS)}", param="kind")
    since: float | None = None
    if q.get("since"):
        try:
            since = float(q["since"][:40])
        except ValueError:
            since = math.nan
        if not math.isfinite(since) or len(q["since"]) > 40:
            raise bad_request("since: expected Unix seconds (a finite number)", param="since")
    limit = 100
    if q.get("limit") is not None:
        raw = q["limit"]
        if len(raw) > 6 or not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
            raise bad_request(f"limit: expected an integer in [1, {MAX_LIMIT}]", param="limit")
        limit = int(raw)
    return kind, q.get("tenant_id") or None, since, limit


@alert_router.get("/admin/alerts", **operation(errors=(*GUARDED, 400, 404)))
async def list_alerts(request: Request) -> Response:
    state: AppState = request.app.state.lockgate
    principal = request.scope.get(PRINCIPAL_SCOPE_KEY)
    if principal is None:
        raise APIError(403, "alerts are kept per tenant: start the server with --admin-key", code="insufficient_scope")
    kind, requested, since, limit = _query(request)
    reach = principal.admin_reach
    tenant_id = reach.usage_tenant(requested)  # a tenant admin: its own tenant, whatever it asked
    gw = state.gateway
    if gw.astore is None or gw.store is None:
        raise APIError(503, "the store is not open", code="store_unavailable")
    store = gw.store

    def read() -> list[dict[str, Any]]:
        alerts = store.list_alerts(kind=kind, tenant_id=tenant_id, since=since, limit=limit)
        if reach.is_global:
            return alerts
        tenant = store.get_tenant(tenant_id)
        own = tenant.alert_webhook if tenant is not None else None
        for a in alerts:
            a["deliveries"] = [d for d in a["deliveries"] if own is not None and d["url"] == own]
        return alerts

    data = await gw.astore.call(read)
    return json_response({"object": "list", "data": data})
