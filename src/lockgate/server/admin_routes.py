"""Admin REST API (admin scope; the guard middleware checks it): tenants, keys, usage, audit.

How far a key reaches is decided in gateway/admin_scope.py, not here: a global
admin manages everything, a tenant's admin key its own tenant (404 for anything
of another tenant, 403 for what it may not change of its own).

Also `GET /v1/usage`: the caller's own tenant's usage (another tenant's id is a
404, as if it did not exist). Every call runs on the store's writer thread (the
event loop never waits on disk); every change is audited with the caller as
actor, and the key ring is rebuilt before the answer, so a revoked key is
refused from the next request on.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from lockgate.gateway.admin_scope import AdminReach
from lockgate.gateway.auth import Principal
from lockgate.gateway.tenants import AdminService, GlobalKeyCreate, KeyCreate, KeyPatch, TenantCreate, TenantPatch
from lockgate.server.state import PRINCIPAL_SCOPE_KEY, AppState
from lockgate.server.errors import APIError, bad_request, json_response
from lockgate.server.openapi import BODY_ERRORS, GUARDED, SloReport, operation

admin_router = APIRouter()
ADMIN_ERRORS = (*GUARDED, 400, 404)
TENANT_BODY_ERRORS = (*BODY_ERRORS, 409)  # 409: the name is taken


def _app(request: Request) -> AppState:
    return request.app.state.lockgate


def _principal(request: Request) -> Principal:
    principal = request.scope.get(PRINCIPAL_SCOPE_KEY)
    if principal is None:  # open mode: no keys, so no tenant to report on
        raise APIError(403, "usage is reported per tenant: the server runs without keys (start it with "
                            "--admin-key and use a tenant's key)", code="insufficient_scope")
    return principal


async def _call(request: Request, fn: Callable[[AdminService], Any], *, changes: bool = False,
                reach: AdminReach | None = None) -> Any:
    """Run `fn(service)` on the store's writer thread; after a change, rebuild the key ring.
    `reach`: the caller's admin reach unless given (`/v1/usage`: its own tenant)."""
    gw = _app(request).gateway
    if gw.astore is None or gw.store is None:
        raise APIError(503, "the store is not open", code="store_unavailable")
    reach = reach or _principal(request).admin_reach
    service = AdminService(gw.store, class_names=_app(request).config.classes.names, reach=reach)
    result = await gw.astore.call(fn, service)
    if changes:
        await gw.reload()
    return result


def _int(request: Request, name: str, default: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        if len(raw) > 20:
            raise ValueError
        return int(raw)
    except ValueError:
        raise bad_request(f"{name}: expected an integer", param=name) from None


@admin_router.post("/admin/tenants", status_code=201, **operation(body=TenantCreate, errors=TENANT_BODY_ERRORS))
async def create_tenant(request: Request) -> Response:
    body, actor = await request.body(), _principal(request).actor
    return json_response(await _call(request, lambda s: s.create_tenant(body, actor=actor), changes=True), 201)


@admin_router.get("/admin/tenants", **operation(errors=GUARDED))
async def list_tenants(request: Request) -> Response:
    return json_response(await _call(request, lambda s: s.list_tenants()))


@admin_router.get("/admin/tenants/{tenant_id}", **operation(errors=ADMIN_ERRORS))
async def get_tenant(tenant_id: str, request: Request) -> Response:
    return json_response(await _call(request, lambda s: s.get_tenant(tenant_id)))


@admin_router.patch("/admin/tenants/{tenant_id}", **operation(body=TenantPatch, errors=TENANT_BODY_ERRORS))
async def update_tenant(tenant_id: str, request: Request) -> Response:
    body, actor = await request.body(), _principal(request).actor
    return json_response(await _call(request, lambda s: s.update_tenant(tenant_id, body, actor=actor),
                                     changes=True))


@admin_router.delete("/admin/tenants/{tenant_id}", **operation(errors=ADMIN_ERRORS))
async def delete_tenant(tenant_id: str, request: Request) -> Response:
    actor = _principal(request).actor
    return json_response(await _call(request, lambda s: s.delete_tenant(tenant_id, actor=actor), changes=True))


@admin_router.post("/admin/tenants/{tenant_id}/keys", status_code=201,
                   **operation(body=KeyCreate, errors=BODY_ERRORS))
async def create_key(tenant_id: str, request: Request) -> Response:
    body, actor = await request.body(), _principal(request).actor
    return json_response(await _call(request, lambda s: s.create_key(tenant_id, body, actor=actor),
                                     changes=True), 201)


@admin_router.get("/admin/tenants/{tenant_id}/keys", **operation(errors=ADMIN_ERRORS))
async def list_keys(tenant_id: str, request: Request) -> Response:
    return json_response(await _call(request, lambda s: s.list_keys(tenant_id)))


@admin_router.post("/admin/keys", status_code=201, **operation(body=GlobalKeyCreate, errors=BODY_ERRORS))
async def create_global_key(request: Request) -> Response:
    body, actor = await request.body(), _principal(request).actor
    return json_response(await _call(request, lambda s: s.create_global_key(body, actor=actor), changes=True),
                         201)


@admin_router.get("/admin/keys", **operation(errors=ADMIN_ERRORS))
async def list_all_keys(request: Request) -> Response:
    tenant_id = request.query_params.get("tenant_id") or None
    return json_response(await _call(request, lambda s: s.list_keys(tenant_id)))


@admin_router.patch("/admin/keys/{key_id}", **operation(body=KeyPatch, errors=(*BODY_ERRORS, 409)))
async def update_key(key_id: str, request: Request) -> Response:
    body, actor = await request.body(), _principal(request).actor
    return json_response(await _call(request, lambda s: s.update_key(key_id, body, actor=actor), changes=True))


@admin_router.delete("/admin/keys/{key_id}", **operation(errors=ADMIN_ERRORS))
async def revoke_key(key_id: str, request: Request) -> Response:
    actor = _principal(request).actor
    return json_response(await _call(request, lambda s: s.revoke_key(key_id, actor=actor), changes=True))


def _usage_response(result: dict[str, Any] | str) -> Response:
    if isinstance(result, str):
        return Response(result, media_type="text/csv; charset=utf-8")
    return json_response(result)


USAGE_PARAMS = ("tenant_id", "key_id", "model", "version", "user", "outcome", "since", "until", "group_by",
                "format")
COMPARE_PARAMS = ("tenant_id", "key_id", "model", "since", "until", "a_since", "a_until", "b_since", "b_until",
                  "a_version", "b_version")


def _usage_args(request: Request) -> dict[str, Any]:
    """The query's usage parameters as given (AdminService checks them: 400 naming the bad one)."""
    q = request.query_params
    return {**{name: q.get(name) for name in USAGE_PARAMS}, "limit": q.get("limit", 1000)}


@admin_router.get("/admin/usage", **operation(errors=ADMIN_ERRORS))  # 404: another tenant, to its admin
async def admin_usage(request: Request) -> Response:
    args = _usage_args(request)
    return _usage_response(await _call(request, lambda s: s.usage(**args)))


@admin_router.get("/admin/usage/compare", **operation(errors=ADMIN_ERRORS))
async def admin_usage_compare(request: Request) -> Response:
    """Two time windows or two model versions side by side: tokens, cost per 1k tokens, TTFT/TPOT
    percentiles, error rate, and the change B vs A."""
    args = {name: request.query_params.get(name) for name in COMPARE_PARAMS}
    return json_response(await _call(request, lambda s: s.usage_compare(**args)))


@admin_router.get("/v1/usage", **operation(errors=(*GUARDED, 400, 404)))
async def own_usage(request: Request) -> Response:
    principal = _principal(request)
    args = _usage_args(request)
    own = principal.tenant_id
    if own is None:
        raise APIError(403, "usage is reported per tenant: use a tenant's key", code="insufficient_scope")
    if args["tenant_id"] not in (None, "", own):
        raise APIError(404, f"tenant {args['tenant_id']!r} not found", param="tenant_id", code="not_found")
    args["tenant_id"] = own

    def usage_and_spend(s: AdminService) -> dict[str, Any] | str:
        result = s.usage(**args)
        if isinstance(result, dict):  # JSON: the tenant's spend this period too (CSV stays rows only)
            result["spend"] = s.tenant_spend(own)
        return result

    return _usage_response(await _call(request, usage_and_spend, reach=AdminReach(own)))


@admin_router.get("/admin/audit", **operation(errors=(*GUARDED, 400)))
async def audit_list(request: Request) -> Response:
    since, limit = _int(request, "since_id", 0), _int(request, "limit", 1000)
    return json_response(await _call(request, lambda s: s.audit_list(since, limit)))


@admin_router.get("/admin/audit/verify", **operation(errors=GUARDED))
async def audit_verify(request: Request) -> Response:
    return json_response(await _call(request, lambda s: s.audit_verify()))


@admin_router.get("/admin/slo", **operation(ok=SloReport, errors=GUARDED))
async def admin_slo(request: Request) -> Response:
    _principal(request).admin_reach.require_global("the SLO report")
    return json_response(_app(request).observer.slo.to_json())
