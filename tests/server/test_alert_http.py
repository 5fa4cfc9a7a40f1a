"""GET /admin/alerts (a global admin sees every alert, a tenant's admin its own tenant's and only its
own receiver's deliveries), its bad input, and the start-up error for a bad --alert-webhook."""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lockgate.server.config import ServerConfig
from lockgate.store.alert_ops import Alert
from lockgate.store.sqlite import open_store
from tests.server.conftest import ServerProcess, start_server

ADMIN = "alerts-admin-key"
OPS_HOOK = "https://ops.example/hook?token=operator-secret"


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("alerts-http")
    s = start_server(tmp, "--load-format", "fake", "--admin-key", ADMIN, "--data-dir", str(tmp / "d"),
                     "--alert-webhook", OPS_HOOK)
    s.data_dir = tmp / "d"  # type: ignore[attr-defined]
    yield s
    s.stop()


def _ok(r: httpx.Response, status: int = 200) -> Any:
    assert r.status_code == status, r.text
    return r.json()


@pytest.fixture(scope="module")
def world(srv: ServerProcess) -> dict[str, Any]:
    root = httpx.Client(base_url=srv.base_url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
    a = _ok(root.post("/admin/tenants", json={"name": "a", "alert_webhook": "https://a.example/hook"}), 201)
    b = _ok(root.post("/admin/tenants", json={"name": "b"}), 201)
    a_admin = _ok(root.post(f"/admin/tenants/{a['id']}/keys", json={"name": "ops", "scopes": ["admin"]}), 201)["key"]
    a_user = _ok(root.post(f"/admin/tenants/{a['id']}/keys", json={"name": "app"}), 201)["key"]
    store = open_store(srv.data_dir)  # type: ignore[attr-defined]  # alerts as the scan raises them
    try:
        store.raise_alert(Alert("budget:t:a:50:1", "budget", a["id"], None, {"kind": "budget", "n": 1}),
                          [OPS_HOOK, "https://a.example/hook"])
        store.raise_alert(Alert("budget:t:b:80:1", "budget", b["id"], None, {"kind": "budget", "n": 2}), [OPS_HOOK])
        store.raise_alert(Alert("anomaly:a:x", "anomaly", a["id"], None, {"kind": "anomaly", "n": 3}), [OPS_HOOK])
    finally:
        store.close()
    return {"root": root, "a": a, "b": b, "a_admin": a_admin, "a_user": a_user, "url": srv.base_url}


def _get(world: dict[str, Any], key: str, **params: Any) -> httpx.Response:
    return httpx.get(f"{world['url']}/admin/alerts", params=params, headers={"Authorization": f"Bearer {key}"},
                     timeout=30)


def test_global_admin_sees_every_alert_with_deliveries(world: dict[str, Any]) -> None:
    body = _ok(_get(world, ADMIN))
    assert body["object"] == "list"
    assert {x["id"] for x in body["data"]} == {"budget:t:a:50:1", "budget:t:b:80:1", "anomaly:a:x"}
    a50 = next(x for x in body["data"] if x["id"] == "budget:t:a:50:1")
    assert {d["url"] for d in a50["deliveries"]} == {OPS_HOOK, "https://a.example/hook"}
    assert all(d["state"] in ("pending", "failed", "delivered") for d in a50["deliveries"])
    assert [x["id"] for x in _ok(_get(world, ADMIN, kind="anomaly"))["data"]] == ["anomaly:a:x"]
    assert [x["id"] for x in _ok(_get(world, ADMIN, tenant_id=world["b"]["id"]))["data"]] == ["budget:t:b:80:1"]
    assert len(_ok(_get(world, ADMIN, limit=1))["data"]) == 1


def test_tenant_admin_sees_only_its_tenant_and_its_own_receiver(world: dict[str, Any]) -> None:
    data = _ok(_get(world, world["a_admin"]))["data"]
    assert {x["id"] for x in data} == {"budget:t:a:50:1", "anomaly:a:x"}
    for x in data:  # the operator's receiver URL (it holds a token) is never shown to a tenant
        assert OPS_HOOK not in str(x)
    a50 = next(x for x in data if x["id"] == "budget:t:a:50:1")
    assert [d["url"] for d in a50["deliveries"]] == ["https://a.example/hook"]
    r = _get(world, world["a_admin"], tenant_id=world["b"]["id"])  # another tenant: as if it did not exist
    assert r.status_code == 404 and r.json()["error"]["param"] == "tenant_id"
    r = _get(world, world["a_user"])  # an inference key has no admin scope
    assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope"
    assert httpx.get(f"{world['url']}/admin/alerts", timeout=30).status_code == 401


@pytest.mark.parametrize(("params", "param"), [
    ({"kind": "other"}, "kind"), ({"kind": "x" * 60_000}, "kind"), ({"limit": "0"}, "limit"),
    ({"limit": str(2 ** 70)}, "limit"), ({"limit": "-1"}, "limit"), ({"limit": "1e3"}, "limit"),
    ({"since": "NaN"}, "since"), ({"since": "inf"}, "since"), ({"since": "yesterday"}, "since"),
    ({"since": "9" * 5000}, "since"),
])
def test_bad_query_is_a_clear_400(world: dict[str, Any], params: dict[str, str], param: str) -> None:
    r = _get(world, ADMIN, **params)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and param in r.json()["error"]["message"]


def test_bad_alert_webhook_is_a_startup_error(tmp_path: Path) -> None:
    for bad in ("ftp://x/hook", "not a url", "http://", "https://h:99999/"):
        with pytest.raises(ValueError, match="--alert-webhook"):
            ServerConfig(alert_webhooks=[bad])
    with pytest.raises(ValueError, match="alert_interval_s"):
        ServerConfig(alert_interval_s=float("nan"))
    r = subprocess.run([sys.executable, "-m", "lockgate.server", "--load-format", "fake", "--data-dir",
                        str(tmp_path / "d"), "--alert-webhook", "ftp://example.com/x"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "--alert-webhook" in r.stderr and "http" in r.stderr and "Traceback" not in r.stderr
