"""The guard middleware in process: Host/Origin checks, CORS, JSON-only bodies, one 500, leases."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient
from starlette.requests import Request

from lockgate.gateway.auth import hash_key
from lockgate.gateway.gateway import Gateway, GatewayConfig
from lockgate.server.config import ServerConfig
from lockgate.store.models import ApiKey, Tenant
from lockgate.server.state import LEASE_SCOPE_KEY
from lockgate.server.errors import install_error_handlers
from lockgate.server.middleware import GuardMiddleware
from lockgate.server.origins import OriginPolicy, is_loopback_name, split_host
from tests.server.test_units import _Metrics

JSON = {"Content-Type": "application/json"}


def gateway_with(admin_key: str | None = None, tenant_key: str | None = None) -> Gateway:
    """A gateway whose key ring knows an admin key and/or one tenant key (no store needed)."""
    gw = Gateway(GatewayConfig(admin_key=admin_key))
    if tenant_key is not None:
        key = ApiKey(id="key_1", tenant_id="ten_1", name="k", prefix=tenant_key[:6], key_hash=hash_key(tenant_key))
        gw.ring.load([Tenant(id="ten_1", name="t")], [key])
    return gw


def _app(admin_key: str | None = None, tenant_key: str | None = None,
         **cfg: object) -> tuple[TestClient, SimpleNamespace, list[str]]:
    released: list[str] = []
    ctx = SimpleNamespace(config=ServerConfig(**cfg), draining=False, inflight=0, metrics=_Metrics(),
                          gateway=gateway_with(admin_key, tenant_key))
    app = FastAPI()
    app.state.lockgate = ctx
    install_error_handlers(app)

    @app.post("/echo")
    async def echo(request: Request) -> JSONResponse:
        request.scope[LEASE_SCOPE_KEY].hold(released.append)
        return JSONResponse({"size": len(await request.body())})

    @app.post("/boom")
    async def boom(request: Request) -> JSONResponse:
        request.scope[LEASE_SCOPE_KEY].hold(released.append)
        raise KeyError("a bug")

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    app.add_middleware(GuardMiddleware, state=ctx)
    return TestClient(app, base_url="http://127.0.0.1:8000", raise_server_exceptions=False), ctx, released


def _err(r, status: int, code: str) -> None:  # noqa: ANN001
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["code"] == code, r.text


@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                   "", "application/jsonx", "text/json"])
def test_non_json_bodies_are_415(ctype: str) -> None:
    client, ctx, released = _app()
    headers = {"Content-Type": ctype} if ctype else {}
    r = client.post("/echo", content=b'{"a": 1}', headers=headers)
    _err(r, 415, "unsupported_media_type")
    assert released == [] and ctx.metrics.errors == [(415, "unsupported_media_type")]


@pytest.mark.parametrize("ctype", ["application/json", "application/json; charset=utf-8", "Application/JSON",
                                   "application/merge-patch+json"])
def test_json_bodies_pass(ctype: str) -> None:
    client, _, released = _app()
    r = client.post("/echo", content=b"{}", headers={"Content-Type": ctype})
    assert r.status_code == 200 and r.json() == {"size": 2}
    assert released == ["aborted"]  # the lease was released when the call ended


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "10.0.0.1",
                                  "localhost.evil.example"])
def test_keyless_refuses_foreign_hosts(host: str) -> None:
    client, _, _ = _app()
    _err(client.get("/health", headers={"Host": host}), 403, "host_not_allowed")
    _err(client.post("/echo", content=b"{}", headers={**JSON, "Host": host}), 403, "host_not_allowed")


@pytest.mark.parametrize("host", ["localhost", "localhost:8000", "127.0.0.1:8000", "127.1.2.3", "[::1]:8000",
                                  "app.localhost:8000"])
def test_keyless_accepts_loopback_hosts(host: str) -> None:
    client, _, _ = _app()
    assert client.post("/echo", content=b"{}", headers={**JSON, "Host": host}).status_code == 200


def test_configured_host_is_accepted() -> None:
    client, _, _ = _app(allowed_hosts=["gpu-box.internal"])
    assert client.get("/health", headers={"Host": "gpu-box.internal:8000"}).status_code == 200
    _err(client.get("/health", headers={"Host": "other.internal"}), 403, "host_not_allowed")


@pytest.mark.parametrize("origin", ["https://evil.example", "null", "http://127.0.0.1:9999", "http://localhost:8000"])
def test_keyless_refuses_cross_origin(origin: str) -> None:
    client, _, released = _app()
    r = client.post("/echo", content=b"{}", headers={**JSON, "Origin": origin})
    _err(r, 403, "origin_not_allowed")
    assert "access-control-allow-origin" not in r.headers and released == []


def test_same_origin_is_allowed_without_cors_headers() -> None:
    client, _, _ = _app()
    r = client.post("/echo", content=b"{}", headers={**JSON, "Origin": "http://127.0.0.1:8000"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_allowed_origin_gets_cors_and_preflight() -> None:
    client, _, _ = _app(allowed_origins=["https://app.example"])
    pre = client.options("/echo", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
                                           "Access-Control-Request-Headers": "content-type, authorization"})
    assert pre.status_code == 204
    assert pre.headers["access-control-allow-origin"] == "https://app.example"
    assert "POST" in pre.headers["access-control-allow-methods"]
    assert "authorization" in pre.headers["access-control-allow-headers"]
    r = client.post("/echo", content=b"{}", headers={**JSON, "Origin": "https://app.example"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    exposed = r.headers["access-control-expose-headers"]
    assert "retry-after" in exposed and "x-lockgate-replica" in exposed and "x-lockgate-ignored-fields" in exposed
    bad = client.options("/echo", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    _err(bad, 403, "origin_not_allowed")
    assert "access-control-allow-origin" not in bad.headers


def test_with_keys_the_key_is_the_defence() -> None:
    client, _, _ = _app(admin_key="root", tenant_key="lg-sekret")
    auth = {**JSON, "Authorization": "Bearer lg-sekret"}
    r = client.post("/echo", content=b"{}", headers={**auth, "Host": "gpu-box.internal", "Origin": "https://x.example"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    _err(client.post("/echo", content=b"{}", headers={**JSON, "Host": "gpu-box.internal"}), 401, "invalid_api_key")


def test_scopes() -> None:
    client, _, _ = _app(admin_key="root", tenant_key="lg-sekret")
    admin = {"Authorization": "Bearer root"}
    tenant = {"Authorization": "Bearer lg-sekret"}
    _err(client.post("/echo", content=b"{}", headers={**JSON, **admin}), 403, "insufficient_scope")
    _err(client.get("/admin/tenants", headers=tenant), 403, "insufficient_scope")
    assert client.get("/admin/tenants", headers=admin).status_code == 404  # passes the guard (no such route here)
    assert client.get("/health").status_code == 200  # the allowlist needs no key
    # /metrics names every tenant: a metrics-scope or global admin key (404: passes the guard, no route here).
    _err(client.get("/metrics"), 401, "invalid_api_key")
    _err(client.get("/metrics", headers={"Authorization": "Bearer nope"}), 401, "invalid_api_key")
    r = client.get("/metrics", headers=tenant)
    _err(r, 403, "insufficient_scope")
    assert "metrics scope" in r.json()["error"]["message"]
    assert client.get("/metrics", headers=admin).status_code == 404
    scraper = ApiKey(id="key_2", tenant_id="ten_1", name="prom", prefix="lg-pro", key_hash=hash_key("lg-prom"),
                     scopes=["metrics"])
    client.app.state.lockgate.gateway.ring.load([Tenant(id="ten_1", name="t")], [scraper])
    assert client.get("/metrics", headers={"Authorization": "Bearer lg-prom"}).status_code == 404
    _err(client.post("/echo", content=b"{}", headers={**JSON, "Authorization": "Bearer lg-prom"}), 403,
         "insufficient_scope")  # a scraper's key infers nothing
    public, _, _ = _app(admin_key="root", metrics_public=True)
    assert public.get("/metrics").status_code == 404
    assert _app()[0].get("/metrics").status_code == 404  # open mode (loopback, no keys): open as before


def test_open_mode_has_no_admin_api() -> None:
    client, _, _ = _app()
    _err(client.get("/admin/tenants"), 403, "admin_disabled")


def test_an_unhandled_error_is_one_json_500_and_releases_the_lease(caplog: pytest.LogCaptureFixture) -> None:
    client, ctx, released = _app()
    r = client.post("/boom", content=b"{}", headers=JSON)
    _err(r, 500, "internal_error")
    assert r.json()["error"]["type"] == "server_error" and "KeyError" in r.json()["error"]["message"]
    assert released == ["internal"]
    assert ctx.metrics.failures == ["internal"] and ctx.inflight == 0
    assert ctx.metrics.responses == [("/boom", 500)]
    assert sum(1 for rec in caplog.records if rec.exc_info) == 1  # logged once, with its traceback


def test_responses_are_counted_by_route_template() -> None:
    client, ctx, _ = _app()
    client.get("/health")
    client.get("/nowhere")
    assert ctx.metrics.responses == [("/health", 200), ("other", 404)]
    assert ctx.metrics.errors == [(404, "not_found")]


def test_origin_helpers() -> None:
    assert split_host("[::1]:8000") == "::1" and split_host("LocalHost:1") == "localhost"
    assert split_host("example.com") == "example.com"
    assert is_loopback_name("127.0.0.5") and is_loopback_name("a.localhost") and not is_loopback_name("10.0.0.1")
    assert OriginPolicy.build("0.0.0.0", [], None).host_allowed("anything.example")
    assert not OriginPolicy.build("127.0.0.1", [], None).host_allowed("anything.example")
    assert OriginPolicy.build("127.0.0.1", [], ["*"]).host_allowed("anything.example")
