"""Model admin REST API (admin scope, as every /admin route: the guard middleware checks it).

    POST   /admin/models                              load a version in the background (202)
    GET    /admin/models[/{name}]                     versions: state, load time, traffic share; routers
                                                      (models config `routers:`) with each rule's hits
    PATCH  /admin/models/{name}                       traffic split, shadow, rollback rules, replicas
    GET    /admin/models/{name}/compare               per-version and shadow comparison figures
    DELETE /admin/models/{name}/versions/{version}    drain, then unload (202)

The work is in lifecycle/admin.py; this file maps it to HTTP and documents it.
Every route here needs a global admin key: a tenant's admin key gets 403.
"""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from starlette.requests import Request
from starlette.responses import Response

from lockgate.lifecycle.admin import ModelAdmin
from lockgate.server.state import PRINCIPAL_SCOPE_KEY, AppState
from lockgate.server.errors import json_response
from lockgate.server.openapi import ERRORS, GUARDED, REF, ErrorResponse


def _global_only(request: Request) -> None:
    """Models serve every tenant: a tenant's admin key manages none of them (on the router, so a
    route added later cannot miss it)."""
    principal = request.scope.get(PRINCIPAL_SCOPE_KEY)
    if principal is not None:
        principal.admin_reach.require_global("model management")


model_router = APIRouter(dependencies=[Depends(_global_only)])

_MORE_ERRORS = {409: "The model's state forbids it (a version that exists, is not ready, holds traffic, ...)"}


def _doc(ok: int = 200, body: str | None = None, errors: tuple[int, ...] = (*GUARDED, 404)) -> dict[str, Any]:
    """openapi.operation's shape, with a 202 or a 409 where these routes answer them."""
    err = {"content": {"application/json": {"schema": {"$ref": REF.format(model=ErrorResponse.__name__)}}}}
    what = "Accepted: runs in the background" if ok == 202 else "Success"
    responses: dict[str, Any] = {str(ok): {"description": what,
                                           "content": {"application/json": {"schema": {"type": "object"}}}}}
    for status in sorted(set(errors)):
        responses[str(status)] = {"description": ERRORS.get(status) or _MORE_ERRORS[status], **err}
    extra: dict[str, Any] = {"responses": responses}
    if body is not None:
        extra["requestBody"] = {"required": True, "content": {"application/json": {
            "schema": {"type": "object", "description": body}}}}
    return {"openapi_extra": extra, "response_model": None, "status_code": ok}


def _admin(request: Request) -> tuple[ModelAdmin, AppState]:
    return request.app.state.model_admin, request.app.state.lockgate


def _actor(request: Request) -> str:
    principal = request.scope.get(PRINCIPAL_SCOPE_KEY)
    return principal.actor if principal is not None else "open"


_BODY = (*GUARDED, 400, 404, 409, 415)


@model_router.post("/admin/models", **_doc(202, "{name, version, path, replicas?, gate?, fail_fraction? (test "
                                                "only), ...engine options}", _BODY))
async def load_model(request: Request) -> Response:
    admin, _ = _admin(request)
    return json_response(await admin.load(await request.body(), _actor(request)), 202)


@model_router.get("/admin/models", **_doc(errors=GUARDED))
async def list_models(request: Request) -> Response:
    admin, app = _admin(request)
    return json_response({**admin.list(), "routers": app.models.routers.to_json()})  # with each rule's hits


@model_router.get("/admin/models/{name:path}/compare", **_doc())
async def compare_model(name: str, request: Request) -> Response:
    return json_response(_admin(request)[0].compare(name))


@model_router.delete("/admin/models/{name:path}/versions/{version}", **_doc(202, errors=(*GUARDED, 404, 409)))
async def unload_version(name: str, version: str, request: Request) -> Response:
    admin, app = _admin(request)
    return json_response(await admin.unload(name, version, _actor(request), app.config.drain_timeout_s), 202)


@model_router.get("/admin/models/{name:path}", **_doc())
async def get_model(name: str, request: Request) -> Response:
    admin, app = _admin(request)
    router = app.models.routers.get(name)
    return json_response(router.to_json() if router is not None else admin.get(name))


@model_router.patch("/admin/models/{name:path}", **_doc(body="{traffic?: {version: weight} summing to 100, "
                                                             "shadow?: {version, fraction} | null, rollback?: {...}, "
                                                             "replicas?: {version: N}}",
                                                        errors=_BODY))
async def patch_model(name: str, request: Request) -> Response:
    admin, app = _admin(request)
    return json_response(await admin.patch(name, await request.body(), _actor(request), app.config.drain_timeout_s))

