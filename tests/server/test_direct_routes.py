"""The hot routes called straight from the guard (server/direct.py) answer exactly as FastAPI's stack would."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from fastapi import APIRouter, FastAPI
from fastapi.testclient import TestClient
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from lockgate.errors import APIError
from lockgate.server.config import ServerConfig
from lockgate.server.direct import DirectRoutes
from lockgate.server.errors import install_error_handlers
from lockgate.server.middleware import GuardMiddleware
from lockgate.server.state import LEASE_SCOPE_KEY, VERSION_SCOPE_KEY
from tests.server.test_guard import gateway_with
from tests.server.test_units import _Metrics

JSON = {"Content-Type": "application/json"}
BEHAVIOURS = ("ok", "api_error", "http_error", "bug", "echo_scope")


def _endpoint(kind: str):  # noqa: ANN202 - an endpoint
    async def endpoint(request: Request) -> Response:
        request.scope[LEASE_SCOPE_KEY].hold(lambda _outcome: None)
        body = await request.body()
        if kind == "api_error":
            raise APIError(429, "slow down", code="rate_limit_exceeded", headers={"Retry-After": "3"})
        if kind == "http_error":
            raise HTTPException(418, "teapot")
        if kind == "bug":
            raise KeyError("a bug")
        request.scope[VERSION_SCOPE_KEY] = "v7"
        if kind == "echo_scope":
            route = request.scope["route"]
            return JSONResponse({"route": route.path, "endpoint": request.scope["endpoint"].__name__,
                                 "path_params": request.scope["path_params"],
                                 "router": type(request.scope["router"]).__name__})
        return JSONResponse({"size": len(body), "body": body.decode()})
    endpoint.__name__ = f"endpoint_{kind}"
    return endpoint


def _client(direct: bool) -> tuple[TestClient, SimpleNamespace]:
    ctx = SimpleNamespace(config=ServerConfig(allowed_hosts=["testserver"]), draining=False, inflight=0,
                          metrics=_Metrics(), gateway=gateway_with())
    router = APIRouter()
    for kind in BEHAVIOURS:
        router.add_api_route(f"/hot/{kind}", _endpoint(kind), methods=["POST"])
    app = FastAPI()
    app.state.lockgate = ctx
    install_error_handlers(app)
    app.include_router(router)
    routes = DirectRoutes(app, router.routes, paths=[f"/hot/{k}" for k in BEHAVIOURS]) if direct else None
    app.add_middleware(GuardMiddleware, state=ctx, direct=routes)
    return TestClient(app, raise_server_exceptions=False), ctx


def _comparable(r) -> tuple[int, list[tuple[str, str]], bytes]:  # noqa: ANN001 - an httpx.Response
    headers = [(k, v) for k, v in r.headers.items() if k != "server-timing"]
    return r.status_code, headers, r.content


def test_the_hot_routes_qualify() -> None:
    from lockgate.server.routes import router

    found = DirectRoutes(FastAPI(), router.routes).routes
    assert sorted(found) == ["/v1/chat/completions", "/v1/completions"]


@pytest.mark.parametrize("kind", BEHAVIOURS)
def test_direct_answers_as_the_stack_does(kind: str) -> None:
    (stack, sctx), (direct, dctx) = _client(False), _client(True)
    assert direct.app.middleware_stack is None  # built at the first call, with the direct routes
    a = stack.post(f"/hot/{kind}", content=b'{"x": 1}', headers=JSON)
    b = direct.post(f"/hot/{kind}", content=b'{"x": 1}', headers=JSON)
    assert _comparable(a) == _comparable(b)
    assert "server-timing" in b.headers
    assert sctx.metrics.errors == dctx.metrics.errors and sctx.metrics.failures == dctx.metrics.failures
    if kind == "ok":
        assert b.json() == {"size": 8, "body": '{"x": 1}'} and b.headers["x-lockgate-model-version"] == "v7"
    if kind == "bug":
        assert b.status_code == 500 and b.json()["error"]["code"] == "internal_error"


def test_other_methods_and_paths_take_the_stack() -> None:
    client, _ = _client(True)
    assert client.get("/hot/ok").status_code == 405  # the router's answer, not the endpoint
    slash = client.post("/hot/ok/", content=b"{}", headers=JSON, follow_redirects=False)
    assert slash.status_code == 307 and slash.headers["location"].endswith("/hot/ok")  # the router's redirect
    assert client.post("/nope", content=b"{}", headers=JSON).status_code == 404
