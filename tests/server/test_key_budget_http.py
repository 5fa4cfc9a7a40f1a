"""Key budgets, alert fields and spend over HTTP (fake engine, SQLite): PATCH /admin/keys, the
400s with their messages, spend on tenant and key objects and /v1/usage after requests (exact,
from the ledger's integer nano-USD), the key's 429, and the audit records."""
from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from tests.server.conftest import ServerProcess, start_server, wait_for

ADMIN = "root-admin-key"
FAKE = ["--load-format", "fake", "--fake-step-delay", "0.005"]
NANO_PER_TOKEN = 1_000_000  # completion at $1000 per 1M tokens: $0.001 a token


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("kb")
    s = start_server(tmp, *FAKE, "--admin-key", ADMIN, "--data-dir", str(tmp / "data"), "--max-model-len", "1024",
                     "--no-slo-admission")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def admin(srv: ServerProcess) -> httpx.Client:
    return httpx.Client(base_url=srv.base_url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)


@pytest.fixture(scope="module")
def tenant(admin: httpx.Client) -> dict:
    r = admin.post("/admin/tenants", json={"name": "acme", "budget_usd": 1.0, "budget_period": "month",
                                           "prices": {"*": {"prompt": 0.0, "completion": 1000.0}},
                                           "alert_thresholds": [80, 50.5, 100],
                                           "alert_webhook": "https://hooks.example.com/lockgate?x=1"})
    assert r.status_code == 201, r.text
    return r.json()


def _key(admin: httpx.Client, tenant_id: str, **body) -> dict:
    r = admin.post(f"/admin/tenants/{tenant_id}/keys", json={"name": "k", **body})
    assert r.status_code == 201, r.text
    return r.json()


def _complete(srv: ServerProcess, key: str, max_tokens: int) -> httpx.Response:
    return httpx.post(f"{srv.base_url}/v1/completions", headers={"Authorization": f"Bearer {key}"},
                      json={"model": "SmolLM2-135M-Instruct", "prompt": "Hello", "max_tokens": max_tokens},
                      timeout=60)


def _err(r: httpx.Response, status: int, param: str | None) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    if param is not None:
        assert err["param"] == param or err["param"].startswith(param + "."), err  # full field paths
    return err["message"]


def test_alert_fields_are_saved_sorted_and_shown(tenant: dict) -> None:
    assert tenant["alert_thresholds"] == [50.5, 80.0, 100.0]
    assert tenant["alert_webhook"] == "https://hooks.example.com/lockgate?x=1"
    assert tenant["spend"] == {"period": "month", "period_start": tenant["spend"]["period_start"], "spent_usd": 0.0,
                               "reserved_usd": 0.0, "budget_usd": 1.0, "remaining_usd": 1.0}
    assert tenant["spend"]["period_start"].endswith("-01T00:00:00Z")


@pytest.mark.parametrize("body,param,words", [
    ({"alert_thresholds": [0]}, "alert_thresholds", "greater than 0"),
    ({"alert_thresholds": [100.5]}, "alert_thresholds", "less than or equal to 100"),
    ({"alert_thresholds": [50, 50]}, "alert_thresholds", "repeat"),
    ({"alert_thresholds": list(range(1, 12))}, "alert_thresholds", "at most 10"),
    ({"alert_thresholds": [2**70]}, "alert_thresholds", "less than or equal to 100"),
    ({"alert_thresholds": "50"}, "alert_thresholds", ""),
    ({"alert_webhook": "ftp://example.com/x"}, "alert_webhook", "http or https"),
    ({"alert_webhook": "https://user:pw@example.com/"}, "alert_webhook", "credentials"),
    ({"alert_webhook": "https://example.com/" + "a" * 3000}, "alert_webhook", "2048"),
    ({"alert_webhook": "https:///nohost"}, "alert_webhook", "host"),
    ({"alert_webhook": "http://example.com:99999/"}, "alert_webhook", "URL"),
    ({"alert_webhook": 5}, "alert_webhook", ""),
])
def test_bad_tenant_alert_fields_are_400s(admin: httpx.Client, tenant: dict, body: dict, param: str,
                                          words: str) -> None:
    msg = _err(admin.patch(f"/admin/tenants/{tenant['id']}", json=body), 400, param)
    assert words in msg
    msg = _err(admin.post("/admin/tenants", json={"name": "x", **body}), 400, param)
    assert words in msg


@pytest.mark.parametrize("raw,param,words", [
    ('{"budget_usd": 1.5}', "budget_usd", "above its tenant's month budget of $1"),
    ('{"budget_usd": 2, "budget_period": "day"}', "budget_usd", "(which contains a day)"),
    ('{"budget_usd": -1}', "budget_usd", "greater than or equal to 0"),
    ('{"budget_usd": NaN}', None, ""),
    ('{"budget_usd": 1e999}', None, ""),
    ('{"budget_usd": 1180591620717411303424}', "budget_usd", "less than or equal to"),
    ('{"budget_usd": "0.5"}', "budget_usd", ""),
    ('{"budget_period": "week"}', "budget_period", "day"),
    ('{"alert_thresholds": [101]}', "alert_thresholds", "100"),
    ('{"name": null}', "name", "null"),
    ('{"budgett_usd": 1}', "budgett_usd", ""),
    ('{"expires_at": "2001-01-01"}', "expires_at", "past"),
    ('{"rpm": 0}', "rpm", ""),
])
def test_bad_key_patches_are_400s(admin: httpx.Client, tenant: dict, raw: str, param: str | None,
                                  words: str) -> None:
    k = _key(admin, tenant["id"])
    r = admin.patch(f"/admin/keys/{k['id']}", content=raw, headers={"Content-Type": "application/json"})
    msg = _err(r, 400, param)
    assert words in msg
    # The key is unchanged.
    keys = admin.get(f"/admin/tenants/{tenant['id']}/keys").json()["data"]
    assert next(x for x in keys if x["id"] == k["id"])["budget_usd"] is None


def test_unknown_and_revoked_keys(admin: httpx.Client, tenant: dict) -> None:
    _err(admin.patch("/admin/keys/key_nope", json={"budget_usd": 0.1}), 404, "key_id")
    k = _key(admin, tenant["id"])
    assert admin.delete(f"/admin/keys/{k['id']}").status_code == 200
    _err(admin.patch(f"/admin/keys/{k['id']}", json={"budget_usd": 0.1}), 409, "key_id")


def test_patch_key_budget_enforces_it_and_spend_is_exact(srv: ServerProcess, admin: httpx.Client,
                                                          tenant: dict) -> None:
    k = _key(admin, tenant["id"], budget_usd=0.5, alert_thresholds=[90, 10])
    assert (k["budget_usd"], k["budget_period"], k["alert_thresholds"]) == (0.5, "month", [10.0, 90.0])
    r = admin.patch(f"/admin/keys/{k['id']}", json={"budget_usd": 0.02, "budget_period": "day", "rpm": 100,
                                                     "name": "ci-bot"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["budget_usd"], body["budget_period"], body["rpm"], body["name"]) == (0.02, "day", 100, "ci-bot")
    assert "key" not in body and body["spend"]["period"] == "day"
    # Three requests of 3 tokens: $0.009 of the key's $0.02 a day.
    for _ in range(3):
        assert _complete(srv, k["key"], 3).status_code == 200
    # A worst case of 15 tokens ($0.015) no longer fits the key's day budget: the key's 429.
    r = _complete(srv, k["key"], 15)
    msg = _err(r, 429, None)
    assert r.json()["error"]["code"] == "budget_exceeded" and r.json()["error"]["type"] == "insufficient_quota"
    assert "the key's day budget of $0.02" in msg and k["id"] in msg

    def rows() -> list[dict]:
        return admin.get("/admin/usage", params={"key_id": k["id"], "limit": 100}).json()["data"]

    assert wait_for(lambda: len(rows()) == 3, 10)
    spent_nusd = sum(r["completion_tokens"] for r in rows()) * NANO_PER_TOKEN
    assert spent_nusd == 9 * NANO_PER_TOKEN

    def key_spend() -> dict:
        keys = admin.get(f"/admin/tenants/{tenant['id']}/keys").json()["data"]
        return next(x for x in keys if x["id"] == k["id"])["spend"]

    assert wait_for(lambda: key_spend()["reserved_usd"] == 0.0, 10)
    spend = key_spend()
    assert spend["spent_usd"] == spent_nusd / 1e9 and spend["budget_usd"] == 0.02
    assert spend["remaining_usd"] == (20_000_000 - spent_nusd) / 1e9 and spend["period_start"].endswith("T00:00:00Z")
    assert next(x for x in admin.get("/admin/keys").json()["data"] if x["id"] == k["id"])["spend"] == spend
    # The tenant shows at least this key's spend (other tests' keys spend in the same tenant).
    t = admin.get(f"/admin/tenants/{tenant['id']}").json()
    listed = next(x for x in admin.get("/admin/tenants").json()["data"] if x["id"] == tenant["id"])
    assert t["spend"] == listed["spend"] and t["spend"]["spent_usd"] >= spent_nusd / 1e9
    all_rows = admin.get("/admin/usage", params={"tenant_id": tenant["id"], "limit": 1000}).json()["data"]
    tenant_nusd = sum(r["completion_tokens"] for r in all_rows) * NANO_PER_TOKEN
    assert t["spend"]["spent_usd"] == tenant_nusd / 1e9
    assert t["spend"]["remaining_usd"] == (1_000_000_000 - tenant_nusd) / 1e9
    # /v1/usage: the tenant's own spend, the rows as before.
    own = httpx.get(f"{srv.base_url}/v1/usage", headers={"Authorization": f"Bearer {k['key']}"}).json()
    assert own["spend"] == t["spend"] and {r["tenant_id"] for r in own["data"]} == {tenant["id"]}
    # Audit: key.update with the changes, never the key.
    recs = admin.get("/admin/audit", params={"limit": 100000}).json()["data"]
    upd = [r for r in recs if r["action"] == "key.update" and r["target"] == k["id"]]
    assert len(upd) == 1
    assert upd[0]["details"]["changes"] == {"budget_usd": 0.02, "budget_period": "day", "rpm": 100,
                                            "name": "ci-bot"}
    assert k["key"] not in json.dumps(recs)
    # Lifting the key's budget (null) admits the request it refused, at once.
    assert admin.patch(f"/admin/keys/{k['id']}", json={"budget_usd": None}).json()["budget_usd"] is None
    assert _complete(srv, k["key"], 15).status_code == 200


def test_a_tenant_admin_patches_its_inference_keys_only(srv: ServerProcess, admin: httpx.Client) -> None:
    t = admin.post("/admin/tenants", json={"name": "beta", "rpm": 50}).json()
    other = admin.post("/admin/tenants", json={"name": "gamma"}).json()
    ta = httpx.Client(base_url=srv.base_url, timeout=30,
                      headers={"Authorization": f"Bearer {_key(admin, t['id'], scopes=['admin'])['key']}"})
    inf = _key(admin, t["id"])
    assert ta.patch(f"/admin/keys/{inf['id']}", json={"budget_usd": 0.3, "rpm": 10}).status_code == 200
    _err(ta.patch(f"/admin/keys/{inf['id']}", json={"rpm": 51}), 403, "rpm")
    adm = _key(admin, t["id"], scopes=["admin"])
    _err(ta.patch(f"/admin/keys/{adm['id']}", json={"name": "x"}), 403, "key_id")
    _err(ta.patch(f"/admin/keys/{_key(admin, other['id'])['id']}", json={"name": "x"}), 404, "key_id")
