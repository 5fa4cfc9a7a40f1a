"""`GET /admin/usage` (group-by fields, filters, totals, CSV), `GET /v1/usage` with the same views, and
`GET /admin/usage/compare`, over real HTTP against a fake-engine server whose ledger holds known rows
(written into its --data-dir by this test, as another process would) and one real request's row."""
from __future__ import annotations

import csv
import io
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from lockgate.store.models import UsageRecord
from lockgate.store.sqlite import open_store
from tests.server.conftest import ServerProcess, start_server, wait_for

ADMIN = "usage-http-root-key"
T0 = 20000 * 86400.0  # 2024-10-04T00:00:00Z


@dataclass
class World:
    srv: ServerProcess
    root: httpx.Client
    tenant: dict[str, Any]
    app_key: str
    app_key_id: str

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.srv.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def _ok(r: httpx.Response) -> Any:
    assert r.status_code == 200, r.text
    return r.json()


def _bad(r: httpx.Response, param: str, *needles: str) -> None:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] and err["code"], err
    for n in needles:
        assert n in err["message"], err


@pytest.fixture(scope="module")
def w(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("usage-http")
    data = tmp / "data"
    srv = start_server(tmp, "--admin-key", ADMIN, "--data-dir", str(data), "--load-format", "fake",
                       "--fake-step-delay", "0.001", "--no-slo-admission")
    root = httpx.Client(base_url=srv.base_url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
    try:
        t = root.post("/admin/tenants", json={"name": "acme", "prices": {"*": {"prompt": 1, "completion": 2}}})
        assert t.status_code == 201, t.text
        tenant = t.json()
        k = root.post(f"/admin/tenants/{tenant['id']}/keys", json={"name": "app"}).json()
        _seed(data, tenant["id"])
        world = World(srv, root, tenant, k["key"], k["id"])
        app = world.client(k["key"])
        model = _ok(app.get("/v1/models"))["data"][0]["id"]
        r = app.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 3, "user": "end-user-7"})
        assert r.status_code == 200, r.text
        assert wait_for(lambda: _ok(root.get("/admin/usage", params={"user": "end-user-7"}))["data"], 20)
        yield world
    finally:
        root.close()
        srv.stop()


def _seed(data: Path, tenant_id: str) -> None:
    """Known rows for another tenant, written as another process would (SQLite WAL)."""
    store = open_store(data)
    rows = []
    for i in range(6):
        rows.append(UsageRecord(f"seed{i}", "ten_seed", f"key_s{i % 2}", "sm", 100, 11, 0, None, 0.1 * (1 + i % 2),
                                1.1 * (1 + i % 2), "error" if i == 5 else "stop", 500 if i == 5 else 200,
                                0.000056 * (1 + i % 2), T0 + i * 3600, model_version="v1" if i % 2 else "v2",
                                user=f"u{i % 3}", priority_class="batch",
                                spec_draft_tokens=12 if i == 0 else 0, spec_accepted_tokens=9 if i == 0 else 0))
    store.settle(rows)
    store.close()


def test_group_by_and_filters(w: World) -> None:
    r = _ok(w.root.get("/admin/usage", params={"group_by": "key,version", "tenant_id": "ten_seed"}))
    assert r["group_by"] == "key,version"
    assert [(g["key"], g["version"], g["requests"], g["cost_nusd"]) for g in r["data"]] == [
        ("key_s1", "sm@v1", 3, 336_000), ("key_s0", "sm@v2", 3, 168_000)]
    assert r["total"] == {"requests": 6, "prompt_tokens": 600, "completion_tokens": 66, "cached_tokens": 0,
                          "cost_usd": 0.000504, "cost_nusd": 504_000, "errors": 1}
    hours = _ok(w.root.get("/admin/usage", params={"group_by": "hour", "tenant_id": "ten_seed", "limit": 2}))
    assert [g["hour"] for g in hours["data"]] == ["2024-10-04T05:00:00Z", "2024-10-04T04:00:00Z"]
    errs = _ok(w.root.get("/admin/usage", params={"outcome": "error", "since": "2024-10-04", "until": T0 + 86400}))
    assert [x["request_id"] for x in errs["data"]] == ["seed5"] and errs["total"]["errors"] == 1
    users = _ok(w.root.get("/admin/usage", params={"group_by": "user", "tenant_id": "ten_seed",
                                                     "version": "sm@v1"}))
    assert {g["user"]: g["requests"] for g in users["data"]} == {"u1": 1, "u0": 1, "u2": 1}
    text = w.root.get("/admin/usage", params={"group_by": "tenant", "format": "csv"})
    assert text.status_code == 200 and text.headers["content-type"].startswith("text/csv")
    rows = {r["tenant"]: r for r in csv.DictReader(io.StringIO(text.text))}
    assert rows["ten_seed"]["cost_usd"] == "0.000504" and rows["ten_seed"]["errors"] == "1"


def test_a_real_request_is_grouped_by_its_user_and_class(w: World) -> None:
    own = _ok(w.client(w.app_key).get("/v1/usage", params={"group_by": "user,class,key"}))
    (g,) = own["data"]
    assert g["user"] == "end-user-7" and g["key"] == w.app_key_id and g["class"]
    assert g["cost_nusd"] > 0 and g["cost_nusd"] == own["total"]["cost_nusd"]
    # the tenant's own view never shows another tenant's rows, whatever it asks
    assert _ok(w.client(w.app_key).get("/v1/usage", params={"group_by": "tenant"}))["data"][0]["tenant"] == \
        w.tenant["id"]
    assert w.client(w.app_key).get("/v1/usage", params={"tenant_id": "ten_seed"}).status_code == 404


def test_request_rows_carry_the_speculative_decoding_counts(w: World) -> None:
    """Schema 11: a row's spec_draft_tokens / spec_accepted_tokens, in JSON and CSV; 0 without speculation
    (the fake engine's real request never speculates)."""
    real = _ok(w.root.get("/admin/usage", params={"user": "end-user-7"}))["data"]
    assert real and all((r["spec_draft_tokens"], r["spec_accepted_tokens"]) == (0, 0) for r in real)
    seeded = {r["request_id"]: r for r in _ok(w.root.get("/admin/usage", params={"tenant_id": "ten_seed"}))["data"]}
    assert (seeded["seed0"]["spec_draft_tokens"], seeded["seed0"]["spec_accepted_tokens"]) == (12, 9)
    assert (seeded["seed1"]["spec_draft_tokens"], seeded["seed1"]["spec_accepted_tokens"]) == (0, 0)
    text = w.root.get("/admin/usage", params={"tenant_id": "ten_seed", "format": "csv"})
    rows = {r["request_id"]: r for r in csv.DictReader(io.StringIO(text.text))}
    assert (rows["seed0"]["spec_draft_tokens"], rows["seed0"]["spec_accepted_tokens"]) == ("12", "9")


def test_compare_two_versions(w: World) -> None:
    c = _ok(w.root.get("/admin/usage/compare", params={"a_version": "sm@v2", "b_version": "sm@v1",
                                                        "tenant_id": "ten_seed"}))
    assert c["object"] == "usage.compare"
    assert (c["a"]["requests"], c["b"]["requests"]) == (3, 3)
    assert c["change"]["cost_usd"] == pytest.approx(1.0) and c["change"]["ttft_s"]["p50"] == pytest.approx(1.0)
    assert c["b"]["error_rate"] == pytest.approx(1 / 3) and c["a"]["error_rate"] == 0.0
    win = _ok(w.root.get("/admin/usage/compare", params={
        "a_since": T0, "a_until": T0 + 3 * 3600, "b_since": T0 + 3 * 3600, "b_until": T0 + 6 * 3600,
        "tenant_id": "ten_seed"}))
    assert win["a"]["requests"] == win["b"]["requests"] == 3


@pytest.mark.parametrize("params,param,needle", [
    ({"group_by": "week"}, "group_by", "tenant, key, model, version"),
    ({"group_by": "model,model"}, "group_by", "more than once"),
    ({"since": "2024-10-05", "until": "2024-10-04"}, "until", "later than"),
    ({"outcome": "meh"}, "outcome", "ok, error"),
    ({"limit": "0"}, "limit", ""),
    ({"limit": str(2**70)}, "limit", ""),
    ({"since": "NaN"}, "since", ""),
    ({"key_id": "k" * 60_000}, "key_id", "too long"),
    ({"format": "xml"}, "format", ""),
])
def test_bad_usage_params_are_400s(w: World, params: dict, param: str, needle: str) -> None:
    _bad(w.root.get("/admin/usage", params=params), param, needle)
    _bad(w.client(w.app_key).get("/v1/usage", params=params), param, needle)


@pytest.mark.parametrize("params,param", [
    ({}, "a_version"),
    ({"a_version": "sm@v1"}, "b_version"),
    ({"a_since": "2024-10-05", "a_until": "2024-10-04", "b_version": "v1"}, "a_until"),
    ({"a_version": "v1", "b_version": "v2", "until": "tomorrow"}, "until"),
    ({"a_version": "v" * 60_000, "b_version": "v2"}, "a_version"),
])
def test_bad_compare_params_are_400s(w: World, params: dict, param: str) -> None:
    _bad(w.root.get("/admin/usage/compare", params=params), param)


def test_a_10mb_query_string_is_refused_cleanly(w: World) -> None:
    # httpx refuses to send such a URL: a raw socket does; the server answers before reading it all
    host, port = w.srv.base_url.removeprefix("http://").rsplit(":", 1)
    head = (f"GET /admin/usage?group_by={'x' * 10_000_000} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Authorization: Bearer {ADMIN}\r\n\r\n").encode()
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        try:
            sock.sendall(head)
        except OSError:  # the server answered and closed while we were still sending
            pass
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
    status = int(answer.split(b" ", 2)[1])
    assert status in (400, 414, 431), answer[:300]


def test_compare_needs_an_admin_key_and_a_tenant_admin_sees_its_own(w: World) -> None:
    params = {"a_version": "sm@v1", "b_version": "sm@v2"}
    r = w.client(w.app_key).get("/admin/usage/compare", params=params)
    assert r.status_code == 403, r.text
    k = w.root.post(f"/admin/tenants/{w.tenant['id']}/keys", json={"name": "ops", "scopes": ["admin"]}).json()
    ops = w.client(k["key"])
    mine = _ok(ops.get("/admin/usage/compare", params=params))
    assert mine["a"]["requests"] == mine["b"]["requests"] == 0  # the seeded rows are another tenant's
    assert mine["a"]["filters"]["tenant_id"] == w.tenant["id"]
    other = ops.get("/admin/usage/compare", params={**params, "tenant_id": "ten_seed"})
    assert other.status_code == 404 and other.json()["error"]["param"] == "tenant_id"
    assert {g["tenant"] for g in _ok(ops.get("/admin/usage", params={"group_by": "tenant"}))["data"]} == {
        w.tenant["id"]}
