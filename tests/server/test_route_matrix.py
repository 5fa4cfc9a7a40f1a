"""Every route and method with every kind of key, as an attacker holding one of them would try.

Walks the served OpenAPI document (so a route added later is probed too) and calls each
operation with: no key, a malformed header, a revoked key, tenant A's inference key,
tenant A's admin key (bound to A), a metrics-only key and, for reads only, a global admin
key. Path parameters name tenant B's objects. Checked for every call: never a 5xx; no key
or a bad key is a 401 everywhere but the open probes; a key without the route's scope is
a 403; nothing of tenant B (its name, its key ids) ever shows in an answer to A's keys;
and afterwards B is exactly as it was, with no audit record written by A's keys.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.server.conftest import start_server

ADMIN = "matrix-admin-key"
MODEL = "SmolLM2-135M-Instruct"
OPEN = {"/health", "/ping", "/version"}
METHODS = ("get", "post", "patch", "delete", "put")
B_NAME = "tenant-b-secret-name"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("matrix")
    srv = start_server(tmp, "--admin-key", ADMIN, "--data-dir", str(tmp / "data"), "--load-format", "fake",
                       "--fake-step-delay", "0.001", "--no-slo-admission", "--max-model-len", "256")
    admin = httpx.Client(base_url=srv.base_url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)

    def post(path: str, body: dict[str, Any]) -> dict[str, Any]:
        r = admin.post(path, json=body)
        assert r.status_code == 201, r.text
        return r.json()

    a = post("/admin/tenants", {"name": "tenant-a"})
    b = post("/admin/tenants", {"name": B_NAME, "budget_usd": 5, "rpm": 1000})
    keys = {
        "inference": post(f"/admin/tenants/{a['id']}/keys", {"name": "a-inf"}),
        "tenant_admin": post(f"/admin/tenants/{a['id']}/keys", {"name": "a-adm", "scopes": ["admin"]}),
        "metrics": post("/admin/keys", {"name": "prom", "scopes": ["metrics"]}),
        "b_inference": post(f"/admin/tenants/{b['id']}/keys", {"name": "b-inf"}),
        "revoked": post(f"/admin/tenants/{a['id']}/keys", {"name": "a-old"}),
    }
    assert admin.delete(f"/admin/keys/{keys['revoked']['id']}").status_code == 200
    doc = admin.get("/openapi.json")
    assert doc.status_code == 200, doc.text
    yield {"srv": srv, "admin": admin, "a": a, "b": b, "keys": keys, "doc": doc.json()}
    admin.close()
    srv.stop()


def _operations(doc: dict[str, Any]) -> list[tuple[str, str]]:
    return [(m, p) for p, item in doc["paths"].items() for m in METHODS if m in item]


def _fill(path: str, w: dict[str, Any]) -> str:
    """Path parameters name tenant B's objects (what an attacker with A's keys would aim at)."""
    return (path.replace("{tenant_id}", w["b"]["id"]).replace("{key_id}", w["keys"]["b_inference"]["id"])
            .replace("{model}", MODEL).replace("{name}", MODEL).replace("{version}", "v1"))


def _call(w: dict[str, Any], method: str, path: str, auth: str | None) -> httpx.Response:
    headers = {"Authorization": auth} if auth is not None else {}
    body = {} if method in ("post", "patch", "put") else None
    return httpx.request(method.upper(), w["srv"].base_url + _fill(path, w), headers=headers, json=body,
                         timeout=30)


def _bearer(w: dict[str, Any], kind: str) -> str:
    return f"Bearer {w['keys'][kind]['key']}"


@pytest.mark.parametrize("auth", [None, "Bearer nope", "Basic Zm9vOmJhcg==", "Bearer " + "x" * 600, "REVOKED"])
def test_no_or_bad_key_is_401_everywhere_but_the_probes(world: dict[str, Any], auth: str | None) -> None:
    if auth == "REVOKED":
        auth = _bearer(world, "revoked")
    for method, path in _operations(world["doc"]):
        r = _call(world, method, path, auth)
        assert r.status_code < 500, (method, path, r.status_code, r.text)
        if path in OPEN:
            continue
        assert r.status_code == 401, (method, path, r.status_code, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key"


def test_an_inference_key_reaches_no_admin_route_and_not_metrics(world: dict[str, Any]) -> None:
    auth = _bearer(world, "inference")
    for method, path in _operations(world["doc"]):
        r = _call(world, method, path, auth)
        assert r.status_code < 500, (method, path, r.status_code, r.text)
        if path.startswith("/admin/") or path in ("/metrics", "/slo"):
            assert r.status_code == 403, (method, path, r.status_code, r.text)
            assert r.json()["error"]["code"] == "insufficient_scope"
        assert B_NAME not in r.text, (method, path)
        assert world["b"]["id"] not in r.text or path.startswith("/admin/"), (method, path, r.text)


def test_a_metrics_key_reads_metrics_and_nothing_else(world: dict[str, Any]) -> None:
    auth = _bearer(world, "metrics")
    for method, path in _operations(world["doc"]):
        r = _call(world, method, path, auth)
        assert r.status_code < 500, (method, path, r.status_code, r.text)
        if path == "/metrics":
            assert r.status_code == 200
        elif path not in OPEN and path not in ("/openapi.json", "/docs"):
            assert r.status_code in (403, 404), (method, path, r.status_code, r.text)
            assert B_NAME not in r.text


def test_a_tenant_admin_key_cannot_reach_another_tenant(world: dict[str, Any]) -> None:
    admin: httpx.Client = world["admin"]
    b_before = admin.get(f"/admin/tenants/{world['b']['id']}").json()
    b_keys_before = admin.get(f"/admin/tenants/{world['b']['id']}/keys").json()
    audit_before = admin.get("/admin/audit", params={"limit": 100000}).json()["data"]
    auth = _bearer(world, "tenant_admin")
    for method, path in _operations(world["doc"]):
        r = _call(world, method, path, auth)
        assert r.status_code < 500, (method, path, r.status_code, r.text)
        text = r.text
        assert B_NAME not in text, (method, path, text)
        assert world["keys"]["b_inference"]["id"] not in text or r.status_code == 404, (method, path, text)
        if "{tenant_id}" in path or "{key_id}" in path:
            assert r.status_code == 404, (method, path, r.status_code, text)  # B's objects do not exist for A
        if path == "/metrics":
            assert r.status_code == 403
    # Nothing of B changed, and A's keys left no audit record.
    assert admin.get(f"/admin/tenants/{world['b']['id']}").json() == b_before
    assert admin.get(f"/admin/tenants/{world['b']['id']}/keys").json() == b_keys_before
    audit_after = admin.get("/admin/audit", params={"limit": 100000}).json()["data"]
    new = audit_after[len(audit_before):]
    assert not [rec for rec in new if rec["actor"] == world["keys"]["tenant_admin"]["id"]], new
    # And B's own key still works.
    r = httpx.post(f"{world['srv'].base_url}/v1/completions", headers={"Authorization": _bearer(world, "b_inference")},
                   json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, timeout=30)
    assert r.status_code == 200, r.text


def test_the_global_admin_reads_everything_without_a_server_error(world: dict[str, Any]) -> None:
    for method, path in _operations(world["doc"]):
        if method != "get":
            continue  # reads only: the other tests rely on B existing
        r = _call(world, method, path, f"Bearer {ADMIN}")
        assert r.status_code < 500, (method, path, r.status_code, r.text)
        assert r.status_code != 401 and r.status_code != 403 or path.startswith("/v1/") or path in (
            "/tokenize", "/detokenize", "/slo"), (method, path, r.status_code, r.text)
