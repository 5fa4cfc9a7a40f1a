"""Versioned output schemas over REST (admin scope; gateway/schemas.py decides everything):

- `POST /admin/schemas` `{"name", "schema", "force"?, "namespace"?}`: the next version (201), or 409
  with every breaking difference unless `force`;
- `GET /admin/schemas` (names with their newest version), `GET /admin/schemas/{name}` (its versions;
  `{name}@{version}`: that version), `GET /admin/schemas/{name}/versions/{version}`.
`?namespace=global|<tenant id>` picks a namespace for reads (default: the caller's own, then global).
Keyed mode only: without keys the guard answers 403 `admin_disabled` for every /admin route.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from lockgate.gateway.auth import Principal
from lockgate.gateway.schemas import SchemaCreate, SchemaService
from lockgate.server.errors import APIError, bad_request, json_response
from lockgate.server.openapi import BODY_ERRORS, GUARDED, operation
from lockgate.server.state import PRINCIPAL_SCOPE_KEY, AppState

schema_router = APIRouter()
READ_ERRORS = (*GUARDED, 400, 404)


def _principal(request: Request) -> Principal:
    principal = request.scope.get(PRINCIPAL_SCOPE_KEY)
    if principal is None:
        raise APIError(403, "schemas are registered per tenant or globally: start the server with --admin-key",
                       code="admin_disabled")
    return principal


def _namespace(request: Request) -> str | None:
    raw = request.query_params.get("namespace")
    if raw is not None and (not raw or len(raw) > 64 or not raw.isprintable()):
        raise bad_request("namespace: expected 'global' or a tenant id", param="namespace")
    return raw


async def _call(request: Request, fn: Callable[[SchemaService], Any]) -> Any:
    state: AppState = request.app.state.lockgate
    gw = state.gateway
    if gw.astore is None or gw.store is None:
        raise APIError(503, "the store is not open", code="store_unavailable")
    service = SchemaService(gw.store, reach=_principal(request).admin_reach)
    return await gw.astore.call(fn, service)


@schema_router.post("/admin/schemas", status_code=201, **operation(body=SchemaCreate, errors=(*BODY_ERRORS, 403, 409)))
async def register_schema(request: Request) -> Response:
    principal = _principal(request)
    body = await request.body()
    reg = await asyncio.to_thread(SchemaService.prepare, body)  # the compile check: CPU, off the event loop
    return json_response(await _call(request, lambda s: s.register(reg, actor=principal.actor)), 201)


@schema_router.get("/admin/schemas", **operation(errors=READ_ERRORS))
async def list_schemas(request: Request) -> Response:
    namespace = _namespace(request)
    return json_response(await _call(request, lambda s: s.list(namespace)))


@schema_router.get("/admin/schemas/{name}", **operation(errors=READ_ERRORS))
async def schema_versions(request: Request, name: str) -> Response:
    namespace = _namespace(request)
    return json_response(await _call(request, lambda s: s.versions(name, namespace)))


@schema_router.get("/admin/schemas/{name}/versions/{version}", **operation(errors=READ_ERRORS))
async def schema_version(request: Request, name: str, version: str) -> Response:
    namespace = _namespace(request)
    if "@" in name:
        raise bad_request("name: give the version once (NAME@VERSION or /versions/VERSION)", param="name")
    return json_response(await _call(request, lambda s: s.show(f"{name}@{version}", namespace)))
