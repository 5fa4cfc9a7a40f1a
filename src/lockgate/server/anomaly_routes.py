"""`GET /admin/anomalies`: cost anomalies (spikes and drops of spend or tokens per hour, with their
size and likely cause) found in every complete hour of a range; gateway/anomaly.py decides them.

Query: `since` (ISO-8601 or Unix seconds; default the last 24 hours, at most 7 days back) and
`tenant` (a tenant's admin key sees its own tenant only; another tenant's id is a 404).
"""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from lockgate.gateway.anomaly import list_anomalies
from lockgate.server.errors import APIError, json_response
from lockgate.server.openapi import GUARDED, operation
from lockgate.server.state import PRINCIPAL_SCOPE_KEY

anomaly_router = APIRouter()


def _doc() -> dict[str, Any]:
    op = operation(errors=(*GUARDED, 400, 404),
                   ok_description="`{object: list, since, until, data: [anomaly]}`, newest hour first; each "
                                  "anomaly has its scope (tenant, key or model), metric (cost_usd or tokens), "
                                  "hour, direction (spike or drop), observed, baseline, ratio, z and cause")
    op["openapi_extra"]["parameters"] = [
        {"name": "since", "in": "query", "required": False, "schema": {"type": "string"},
         "description": "ISO-8601 time or Unix seconds; default 24 hours ago, at most 7 days ago"},
        {"name": "tenant", "in": "query", "required": False, "schema": {"type": "string"},
         "description": "One tenant's id (a tenant admin key: its own only)"},
    ]
    return op


@anomaly_router.get("/admin/anomalies", **_doc())
async def admin_anomalies(request: Request) -> Response:
    principal = request.scope.get(PRINCIPAL_SCOPE_KEY)
    if principal is None:  # open mode: the guard refuses /admin/ already; never a 500 here
        raise APIError(403, "the admin API needs the server to run with --admin-key", code="admin_disabled")
    gw = request.app.state.lockgate.gateway
    if gw.astore is None or gw.store is None:
        raise APIError(503, "the store is not open", code="store_unavailable")
    q = request.query_params
    result = await gw.astore.call(list_anomalies, gw.store, principal.admin_reach,
                                  since=q.get("since"), tenant=q.get("tenant") or None)
    return json_response(result)
