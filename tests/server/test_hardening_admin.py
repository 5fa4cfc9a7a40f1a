"""Hardening round two, admin side, over real HTTP: a tenant's admin key attacks every /admin route
(its own tenant's forbidden changes are 403, anything of another tenant the 404 of a missing id),
global keys, bad admin input refused with nothing changed, and the bootstrap key's audit record."""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.server.conftest import ServerProcess, start_server, wait_for

ADMIN = "hardening-root-key"
MISSING_TENANT, MISSING_KEY = "ten_00000000000000000000", "key_00000000000000000000"


@dataclass
class World:
    srv: ServerProcess
    root: httpx.Client  # the bootstrap --admin-key
    a: dict[str, Any]  # tenant A, whose admin attacks
    b: dict[str, Any]  # tenant B, the victim
    a_admin: httpx.Client
    a_admin_id: str
    a_inf: str
    b_inf_id: str
    b_admin_id: str
    glob: httpx.Client  # an admin key with no tenant
    glob_id: str
    model: str

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.srv.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def _ok(r: httpx.Response, status: int = 200) -> Any:
    assert r.status_code == status, r.text
    return r.json()


def _err(r: httpx.Response, status: int, code: str, *needles: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"], err
    for n in needles:
        assert n in err["message"], err
    return err


@pytest.fixture(scope="module")
def w(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("hardening-admin")
    srv = start_server(tmp, "--admin-key", ADMIN, "--data-dir", str(tmp / "data"), "--load-format", "fake",
                       "--fake-step-delay", "0.01", "--no-slo-admission")
    root = httpx.Client(base_url=srv.base_url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
    try:
        a = _ok(root.post("/admin/tenants", json={
            "name": "alpha", "rpm": 100, "tpm": 100_000, "max_concurrency": 4, "max_tokens": 64, "budget_usd": 5,
            "weight": 1, "prices": {"*": {"prompt": 1, "completion": 1}}}), 201)
        b = _ok(root.post("/admin/tenants", json={"name": "beta"}), 201)
        a_admin = _ok(root.post(f"/admin/tenants/{a['id']}/keys", json={"name": "a-ops", "scopes": ["admin"]}), 201)
        a_inf = _ok(root.post(f"/admin/tenants/{a['id']}/keys", json={"name": "a-app"}), 201)
        b_inf = _ok(root.post(f"/admin/tenants/{b['id']}/keys", json={"name": "b-app"}), 201)
        b_admin = _ok(root.post(f"/admin/tenants/{b['id']}/keys", json={"name": "b-ops", "scopes": ["admin"]}), 201)
        glob = _ok(root.post("/admin/keys", json={"name": "ops"}), 201)
        model = _ok(root.get("/v1/models", headers={"Authorization": f"Bearer {a_inf['key']}"}))["data"][0]["id"]
        world = World(srv, root, a, b, None, a_admin["id"], a_inf["key"], b_inf["id"], b_admin["id"],  # type: ignore[arg-type]
                      None, glob["id"], model)  # type: ignore[arg-type]
        world.a_admin = world.client(a_admin["key"])
        world.glob = world.client(glob["key"])
        for key in (a_inf["key"], b_inf["key"]):  # a usage row for each tenant
            _ok(world.client(key).post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2}))
        assert wait_for(lambda: len(_ok(root.get("/admin/usage"))["data"]) >= 2, 20)
        yield world
    finally:
        srv.stop()


def _snapshot(w: World) -> tuple[Any, Any, int]:
    """What an attack must leave as it was: tenants, keys, the audit log's length."""
    return (_ok(w.root.get("/admin/tenants")), _ok(w.root.get("/admin/keys")),
            len(_ok(w.root.get("/admin/audit"))["data"]))


def _same_as_missing(other: httpx.Response, missing: httpx.Response, other_id: str, missing_id: str) -> None:
    """Another tenant's object answers exactly as an id that does not exist: nothing to probe."""
    assert other.status_code == missing.status_code == 404, (other.text, missing.text)
    assert other.json() == json.loads(missing.text.replace(missing_id, other_id)), (other.text, missing.text)


# ---- reads -----------------------------------------------------------------------------------------

def test_tenant_admin_reads_only_its_own_tenant(w: World) -> None:
    c, a, b = w.a_admin, w.a["id"], w.b["id"]
    assert [t["id"] for t in _ok(c.get("/admin/tenants"))["data"]] == [a]
    assert _ok(c.get(f"/admin/tenants/{a}"))["name"] == "alpha"
    _same_as_missing(c.get(f"/admin/tenants/{b}"), c.get(f"/admin/tenants/{MISSING_TENANT}"), b, MISSING_TENANT)
    own = _ok(c.get(f"/admin/tenants/{a}/keys"))["data"]
    assert own and {k["tenant_id"] for k in own} == {a}
    _same_as_missing(c.get(f"/admin/tenants/{b}/keys"), c.get(f"/admin/tenants/{MISSING_TENANT}/keys"), b,
                     MISSING_TENANT)
    assert {k["tenant_id"] for k in _ok(c.get("/admin/keys"))["data"]} == {a}
    _same_as_missing(c.get("/admin/keys", params={"tenant_id": b}),
                     c.get("/admin/keys", params={"tenant_id": MISSING_TENANT}), b, MISSING_TENANT)
    for params in ({}, {"tenant_id": a}, {"group_by": "model"}, {"group_by": "day"}, {"format": "csv"}):
        r = c.get("/admin/usage", params=params)
        assert r.status_code == 200, r.text
        if params.get("format") == "csv":
            assert b not in r.text and a in r.text
        elif "group_by" not in params:
            assert {row["tenant_id"] for row in r.json()["data"]} == {a}
    # the global view has both tenants' rows; a tenant admin's totals are its own tenant's
    assert {row["tenant_id"] for row in _ok(w.root.get("/admin/usage"))["data"]} == {a, b}
    for group in ("model", "day"):
        assert _ok(c.get("/admin/usage", params={"group_by": group})) == \
            _ok(w.root.get("/admin/usage", params={"group_by": group, "tenant_id": a}))
    _same_as_missing(c.get("/admin/usage", params={"tenant_id": b}),
                     c.get("/admin/usage", params={"tenant_id": MISSING_TENANT}), b, MISSING_TENANT)
    inf = w.client(w.a_inf)  # /v1/usage: a tenant's own key reads its own tenant's usage, as before
    assert {row["tenant_id"] for row in _ok(inf.get("/v1/usage"))["data"]} == {a}
    _same_as_missing(inf.get("/v1/usage", params={"tenant_id": b}),
                     inf.get("/v1/usage", params={"tenant_id": MISSING_TENANT}), b, MISSING_TENANT)


# ---- changes to its own tenant ----------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("rpm", None), ("rpm", 1_000_000), ("tpm", None), ("max_concurrency", 1000), ("max_tokens", None),
    ("budget_usd", None), ("budget_usd", 1e9), ("budget_period", "total"), ("priority", "interactive"),
    ("weight", 100), ("weight", 1), ("prices", {}), ("prices", {"*": {"prompt": 0, "completion": 0}}),
    ("models", ["*"]), ("name", "alpha"),
])
def test_tenant_admin_cannot_change_its_own_entitlements(w: World, field: str, value: Any) -> None:
    before = _snapshot(w)
    _err(w.a_admin.patch(f"/admin/tenants/{w.a['id']}", json={field: value}), 403, "insufficient_scope",
         field, "global admin")
    _err(w.a_admin.patch(f"/admin/tenants/{w.a['id']}", json={"name": "alpha2", field: value}), 403,
         "insufficient_scope")
    assert _snapshot(w) == before


def test_tenant_admin_cannot_rename_its_tenant_nor_probe_names(w: World) -> None:
    """A rename is the operator's; refused before the name is compared, so no 409 tells which names
    other tenants use."""
    before = _snapshot(w)
    for name in ("alpha-renamed", "BETA", "beta", "alpha"):
        _err(w.a_admin.patch(f"/admin/tenants/{w.a['id']}", json={"name": name}), 403, "insufficient_scope",
             "name", "global admin")
    assert _snapshot(w) == before
    _ok(w.a_admin.patch(f"/admin/tenants/{w.a['id']}", json={}))  # nothing asked, nothing changed
    assert _snapshot(w) == before


def test_tenant_admin_cannot_create_or_delete_tenants(w: World) -> None:
    before = _snapshot(w)
    _err(w.a_admin.post("/admin/tenants", json={"name": "mine"}), 403, "insufficient_scope", "global admin")
    _err(w.a_admin.delete(f"/admin/tenants/{w.a['id']}"), 403, "insufficient_scope", "global admin")
    assert _snapshot(w) == before


# ---- another tenant's objects --------------------------------------------------------------------------

def test_another_tenants_objects_answer_as_missing_ones(w: World) -> None:
    c, b = w.a_admin, w.b["id"]
    before = _snapshot(w)
    for body in ({"name": "x"}, {"rpm": 1}, {"budget_usd": 0}, {"weight": 0.01}):
        _same_as_missing(c.patch(f"/admin/tenants/{b}", json=body),
                         c.patch(f"/admin/tenants/{MISSING_TENANT}", json=body), b, MISSING_TENANT)
    _same_as_missing(c.delete(f"/admin/tenants/{b}"), c.delete(f"/admin/tenants/{MISSING_TENANT}"), b,
                     MISSING_TENANT)
    for body in ({}, {"scopes": ["inference"]}, {"scopes": ["admin"]}):
        _same_as_missing(c.post(f"/admin/tenants/{b}/keys", json=body),
                         c.post(f"/admin/tenants/{MISSING_TENANT}/keys", json=body), b, MISSING_TENANT)
    for victim in (w.b_inf_id, w.b_admin_id, w.glob_id):
        _same_as_missing(c.delete(f"/admin/keys/{victim}"), c.delete(f"/admin/keys/{MISSING_KEY}"), victim,
                         MISSING_KEY)
    assert _snapshot(w) == before


# ---- keys ---------------------------------------------------------------------------------------------

def test_tenant_admin_mints_only_inference_keys_within_its_limits(w: World) -> None:
    c, a = w.a_admin, w.a["id"]
    before = _snapshot(w)
    for scopes in (["admin"], ["metrics"], ["inference", "admin"], ["inference", "metrics"]):
        _err(c.post(f"/admin/tenants/{a}/keys", json={"scopes": scopes}), 403, "insufficient_scope", "scopes")
    for field, above in (("rpm", 101), ("tpm", 100_001), ("max_concurrency", 5), ("max_tokens", 65)):
        _err(c.post(f"/admin/tenants/{a}/keys", json={field: above}), 403, "insufficient_scope", field,
             "above the tenant's own limit")
    _err(c.post("/admin/keys", json={"name": "me-too"}), 403, "insufficient_scope", "global admin")
    _err(c.post("/admin/keys", json={"scopes": ["metrics"]}), 403, "insufficient_scope")
    assert _snapshot(w) == before
    k = _ok(c.post(f"/admin/tenants/{a}/keys", json={"name": "new-app", "rpm": 100, "max_tokens": 64}), 201)
    assert k["scopes"] == ["inference"] and k["tenant_id"] == a
    ok = w.client(k["key"]).post("/v1/completions", json={"model": w.model, "prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200, ok.text
    last = _ok(w.root.get("/admin/audit"))["data"][-1]
    assert (last["actor"], last["action"], last["target"]) == (w.a_admin_id, "key.create", k["id"])
    assert _ok(c.delete(f"/admin/keys/{k['id']}"))["revoked"] is True
    _err(w.client(k["key"]).post("/v1/completions", json={"model": w.model, "prompt": "hi"}), 401,
         "invalid_api_key")


def test_tenant_admin_cannot_revoke_admin_keys_even_its_own(w: World) -> None:
    before = _snapshot(w)
    _err(w.a_admin.delete(f"/admin/keys/{w.a_admin_id}"), 403, "insufficient_scope", "inference keys")
    assert _snapshot(w) == before


# ---- global-only routes --------------------------------------------------------------------------------

def _global_only_calls(w: World) -> list[tuple[str, str, Any]]:
    m = w.model
    return [("GET", "/admin/audit", None), ("GET", "/admin/audit/verify", None), ("GET", "/admin/slo", None),
            ("GET", "/slo", None), ("GET", "/admin/models", None), ("GET", f"/admin/models/{m}", None),
            ("GET", f"/admin/models/{m}/compare", None),
            ("POST", "/admin/models", {"name": m, "version": "evil", "path": "default"}),
            ("PATCH", f"/admin/models/{m}", {"traffic": {"v1": 100}}),
            ("DELETE", f"/admin/models/{m}/versions/v1", None),
            ("GET", "/admin/models/nothing-here", None)]


def test_model_audit_and_slo_routes_are_global_only(w: World) -> None:
    before = _snapshot(w)
    for method, path, body in _global_only_calls(w):
        _err(w.a_admin.request(method, path, json=body), 403, "insufficient_scope", "global admin")
    assert _snapshot(w) == before
    for method, path, _ in _global_only_calls(w)[:7]:  # the reads, with a global key of each kind
        for c in (w.root, w.glob):
            assert c.request(method, path).status_code == 200, (method, path)


def test_every_admin_route_is_covered(w: World) -> None:
    """A new /admin route must be decided for tenant admins: extend the lists above when this fails."""
    doc = _ok(w.root.get("/openapi.json"))
    seen = {(m.upper(), p) for p, item in doc["paths"].items() if p.startswith("/admin") for m in item}
    assert seen == {
        ("POST", "/admin/tenants"), ("GET", "/admin/tenants"), ("GET", "/admin/tenants/{tenant_id}"),
        ("PATCH", "/admin/tenants/{tenant_id}"), ("DELETE", "/admin/tenants/{tenant_id}"),
        ("POST", "/admin/tenants/{tenant_id}/keys"), ("GET", "/admin/tenants/{tenant_id}/keys"),
        ("POST", "/admin/keys"), ("GET", "/admin/keys"), ("DELETE", "/admin/keys/{key_id}"),
        ("GET", "/admin/usage"), ("GET", "/admin/usage/compare"), ("GET", "/admin/alerts"),
        ("GET", "/admin/anomalies"), ("PATCH", "/admin/keys/{key_id}"), ("GET", "/admin/audit"), ("GET", "/admin/audit/verify"), ("GET", "/admin/slo"),
        ("POST", "/admin/models"), ("GET", "/admin/models"), ("GET", "/admin/models/{name}/compare"),
        ("DELETE", "/admin/models/{name}/versions/{version}"), ("GET", "/admin/models/{name}"),
        ("PATCH", "/admin/models/{name}"),
        ("POST", "/admin/schemas"), ("GET", "/admin/schemas"), ("GET", "/admin/schemas/{name}"),
        ("GET", "/admin/schemas/{name}/versions/{version}"),
    }, seen


# ---- global keys ---------------------------------------------------------------------------------------

def test_a_global_key_manages_everything_but_cannot_infer(w: World) -> None:
    g = w.glob
    ids = {t["id"] for t in _ok(g.get("/admin/tenants"))["data"]}
    assert {w.a["id"], w.b["id"]} <= ids
    t = _ok(g.post("/admin/tenants", json={"name": "made-by-global"}), 201)
    k = _ok(g.post(f"/admin/tenants/{t['id']}/keys", json={"scopes": ["inference", "admin"]}), 201)
    m = _ok(g.post("/admin/keys", json={"name": "scraper", "scopes": ["metrics"]}), 201)
    assert m["tenant_id"] is None
    assert any(x["id"] == w.glob_id and x["tenant_id"] is None for x in _ok(g.get("/admin/keys"))["data"])
    _ok(g.patch(f"/admin/tenants/{t['id']}", json={"weight": 2, "budget_usd": 3}))
    records = _ok(g.get("/admin/audit"))["data"]
    assert {r["actor"] for r in records if r["target"] in (t["id"], k["id"], m["id"])} == {w.glob_id}
    assert _ok(g.get("/admin/audit/verify"))["ok"] is True
    _err(g.post("/v1/completions", json={"model": w.model, "prompt": "hi"}), 403, "insufficient_scope")
    _err(w.client(m["key"]).get("/admin/tenants"), 403, "insufficient_scope")  # metrics only
    _ok(g.delete(f"/admin/keys/{m['id']}"))
    _ok(g.delete(f"/admin/tenants/{t['id']}"))
    _err(g.post("/admin/keys", json={"scopes": ["inference"]}), 400, "invalid_value", "inference scope")


# ---- bad admin input -----------------------------------------------------------------------------------

BAD_TENANT_BODIES: list[tuple[Any, int, str, str | None, str]] = [
    ({"name": "evil\u202etxt.exe"}, 400, "invalid_value", "name", "U+202E"),
    ({"name": "ad\u200bmin"}, 400, "invalid_value", "name", "U+200B"),
    ({"name": "beta\u0085"}, 400, "invalid_value", "name", "U+0085"),
    ({"name": "\ufeffbeta"}, 400, "invalid_value", "name", "U+FEFF"),
    ({"name": "a\u2066b\u2069"}, 400, "invalid_value", "name", "U+2066"),
    ({"name": "beta"}, 409, "conflict", "name", "exists already"),
    ({"name": "BETA"}, 409, "conflict", "name", "exists already"),
    ({"name": "ｂｅｔａ"}, 409, "conflict", "name", "exists already"),
    ({"name": "w", "weight": 1e-300}, 400, "invalid_value", "weight", "0.01"),
    ({"name": "w", "weight": 0}, 400, "invalid_value", "weight", "0.01"),
    ({"name": "w", "weight": -1}, 400, "invalid_value", "weight", "0.01"),
    ({"name": "w", "weight": 1e300}, 400, "invalid_value", "weight", "100"),
    ({"name": "w", "weight": "NaN"}, 400, "invalid_value", "weight", "number"),
    ({"name": "w", "weight": "Infinity"}, 400, "invalid_value", "weight", "number"),
    (b'{"name": "w", "weight": NaN}', 400, "invalid_value", "weight", "finite"),
    (b'{"name": "w", "weight": -Infinity}', 400, "invalid_value", "weight", "finite"),
    ({"name": "x" * 5000}, 400, "invalid_value", "name", "at most 128"),
    ({"name": "x" * 10_000_000}, 413, "request_too_large", None, ""),
    ({"name": "w", "rpm": 2**70}, 400, "invalid_value", "rpm", "2147483647"),
    ({"name": "w", "max_tokens": 2**70}, 400, "invalid_value", "max_tokens", "2147483647"),
    ({"name": "w", "models": ["m\u202e"]}, 400, "invalid_value", "models.0", "U+202E"),
]


@pytest.mark.parametrize("body,status,code,param,needle", BAD_TENANT_BODIES)
def test_bad_admin_input_is_refused_and_changes_nothing(w: World, body: Any, status: int, code: str,
                                                        param: str | None, needle: str) -> None:
    before = _snapshot(w)
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    for method, path in (("POST", "/admin/tenants"), ("PATCH", f"/admin/tenants/{w.a['id']}")):
        err = _err(w.root.request(method, path, content=content, headers=headers), status, code, needle)
        assert err["param"] == param, err
    if isinstance(body, dict) and "name" in body and status == 400 and param == "name":
        for path in (f"/admin/tenants/{w.a['id']}/keys", "/admin/keys"):
            err = _err(w.root.post(path, json={"name": body["name"]}), 400, "invalid_value", needle)
            assert err["param"] == "name"
    assert _snapshot(w) == before
    t = _ok(w.root.post("/admin/tenants", json={"name": f"fine-{abs(hash(content)) % 10**9}"}), 201)
    _ok(w.root.delete(f"/admin/tenants/{t['id']}"))


# ---- the bootstrap key's audit record ----------------------------------------------------------------------

def test_bootstrap_record_reveals_no_plain_hash_of_the_admin_key(w: World) -> None:
    records = _ok(w.root.get("/admin/audit"))["data"]
    boot = records[0]
    assert (boot["action"], boot["actor"]) == ("bootstrap", "system")
    assert set(boot["details"]) == {"admin_key_hmac"} and len(boot["details"]["admin_key_hmac"]) == 32
    digest = hashlib.sha256(ADMIN.encode()).hexdigest()
    text = json.dumps(records)
    assert ADMIN not in text and all(digest[i:i + 8] not in text for i in range(0, 57, 8))
    assert _ok(w.root.get("/admin/audit/verify"))["ok"] is True
