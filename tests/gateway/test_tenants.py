"""AdminService over a real SQLite file: the admin contract, body validation, keys never stored in plaintext."""
from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import pytest

from lockgate.gateway.tenants import AdminService, hash_key, new_key
from lockgate.server.errors import APIError
from lockgate.store.models import UsageRecord
from lockgate.store.sqlite import DB_FILENAME, open_store


@pytest.fixture
def svc(tmp_path: Path):
    store = open_store(tmp_path)
    changes: list[tuple[str, str]] = []
    s = AdminService(store, on_change=lambda a, i: changes.append((a, i)))
    s.changes = changes  # type: ignore[attr-defined]
    yield s
    store.close()


FULL = {"name": "acme", "models": ["m1", "m2"], "rpm": 60, "tpm": 10000, "max_concurrency": 4, "max_tokens": 512,
        "priority": "interactive", "budget_usd": 12.5, "budget_period": "day",
        "prices": {"*": {"prompt": 1, "completion": 2.5}, "m1": {"prompt": 0.5, "completion": 1, "cached_prompt": 0.1}}}


def test_create_get_list_with_every_field(svc: AdminService) -> None:
    t = svc.create_tenant(FULL, actor="cli")
    assert t["id"].startswith("ten_") and len(t["id"]) == 24
    for f in ("name", "models", "rpm", "tpm", "max_concurrency", "max_tokens", "priority", "budget_usd",
              "budget_period"):
        assert t[f] == FULL[f], f
    assert t["prices"] == {"*": {"prompt": 1.0, "completion": 2.5, "cached_prompt": None, "cache_hit": 0.0},
                           "m1": {"prompt": 0.5, "completion": 1.0, "cached_prompt": 0.1, "cache_hit": 0.0}}
    assert svc.get_tenant(t["id"]) == t
    assert [x["id"] for x in svc.list_tenants()["data"]] == [t["id"]]
    assert svc.changes == [("tenant.create", t["id"])]  # type: ignore[attr-defined]
    rec = svc.store.list_audit()[-1]
    assert (rec.actor, rec.action, rec.target) == ("cli", "tenant.create", t["id"])
    assert rec.details["limits"]["rpm"] == 60


def test_defaults_are_unlimited(svc: AdminService) -> None:
    t = svc.create_tenant({"name": "min"}, actor="cli")
    assert t["models"] == ["*"] and t["priority"] == "standard" and t["budget_period"] == "month"
    assert t["rpm"] is t["tpm"] is t["max_concurrency"] is t["max_tokens"] is t["budget_usd"] is None
    assert t["prices"] == {}
    t2 = svc.create_tenant(b'{"name": "raw bytes", "rpm": null}', actor="cli")  # raw JSON body too
    assert t2["name"] == "raw bytes" and t2["rpm"] is None


def test_patch_changes_only_the_given_fields(svc: AdminService) -> None:
    t = svc.create_tenant(FULL, actor="admin-key")
    n = len(svc.store.list_audit())
    u = svc.update_tenant(t["id"], {"rpm": 5, "budget_usd": None, "models": None}, actor="key_x")
    assert u["rpm"] == 5 and u["budget_usd"] is None and u["models"] == ["*"]
    assert u["tpm"] == 10000 and u["priority"] == "interactive" and u["prices"] == t["prices"]
    assert svc.get_tenant(t["id"]) == u
    rec = svc.store.list_audit()[-1]
    assert (rec.actor, rec.action, rec.details) == ("key_x", "tenant.update",
                                                    {"rpm": 5, "budget_usd": None, "models": ["*"]})
    # no change: no write, no audit record
    svc.update_tenant(t["id"], {"rpm": 5}, actor="cli")
    svc.update_tenant(t["id"], {}, actor="cli")
    assert len(svc.store.list_audit()) == n + 1
    u = svc.update_tenant(t["id"], {"prices": {"*": {"prompt": 3}}, "name": "  renamed  "}, actor="cli")
    assert u["prices"] == {"*": {"prompt": 3.0, "completion": 0.0, "cached_prompt": None, "cache_hit": 0.0}}
    assert u["name"] == "renamed"


def test_unknown_ids_are_404(svc: AdminService) -> None:
    for call in (lambda: svc.get_tenant("ten_nope"),
                 lambda: svc.update_tenant("ten_nope", {"rpm": 1}, actor="cli"),
                 lambda: svc.delete_tenant("ten_nope", actor="cli"),
                 lambda: svc.create_key("ten_nope", {}, actor="cli"),
                 lambda: svc.list_keys("ten_nope"),
                 lambda: svc.revoke_key("key_nope", actor="cli")):
        with pytest.raises(APIError) as ei:
            call()
        assert ei.value.status == 404 and ei.value.code == "not_found"


@pytest.mark.parametrize("body,param", [
    ({}, "name"),
    ({"name": ""}, "name"),
    ({"name": "   "}, "name"),
    ({"name": "x" * 129}, "name"),
    ({"name": "a\x00b"}, "name"),
    ({"name": 5}, "name"),
    ({"name": "a", "rmp": 10}, "rmp"),  # a typo is an error, not a silent no-op
    ({"name": "a", "rpm": 2**70}, "rpm"),
    ({"name": "a", "rpm": 0}, "rpm"),
    ({"name": "a", "rpm": -1}, "rpm"),
    ({"name": "a", "rpm": 1.5}, "rpm"),
    ({"name": "a", "rpm": "10"}, "rpm"),
    ({"name": "a", "rpm": True}, "rpm"),
    ({"name": "a", "tpm": 2**31}, "tpm"),
    ({"name": "a", "max_concurrency": 2**70}, "max_concurrency"),
    ({"name": "a", "max_tokens": 0}, "max_tokens"),
    ({"name": "a", "priority": "urgent"}, "priority"),
    ({"name": "a", "budget_usd": -1}, "budget_usd"),
    ({"name": "a", "budget_usd": float("nan")}, "budget_usd"),
    ({"name": "a", "budget_usd": float("inf")}, "budget_usd"),
    ({"name": "a", "budget_usd": 1e300}, "budget_usd"),
    ({"name": "a", "budget_period": "week"}, "budget_period"),
    ({"name": "a", "models": "m1"}, "models"),
    ({"name": "a", "models": [""]}, "models.0"),
    ({"name": "a", "models": ["m"] * 257}, "models"),
    ({"name": "a", "prices": {"*": {"prompt": -1}}}, "prices.*.prompt"),
    ({"name": "a", "prices": {"*": {"prompt": float("nan")}}}, "prices.*.prompt"),
    ({"name": "a", "prices": {"*": {"completion": float("-inf")}}}, "prices.*.completion"),
    ({"name": "a", "prices": {"*": {"prompt": 1, "complete": 2}}}, "prices.*.complete"),
    ({"name": "a", "prices": {f"m{i}": {} for i in range(257)}}, "prices"),
    ({"name": "a", "prices": {"*": 1}}, "prices.*"),
])
def test_bad_tenant_bodies_are_400_naming_the_field(svc: AdminService, body: dict, param: str) -> None:
    with pytest.raises(APIError) as ei:
        svc.create_tenant(body, actor="cli")
    e = ei.value
    assert e.status == 400 and e.code == "invalid_value" and e.param == param, e.message
    assert param in e.message
    assert svc.list_tenants()["data"] == [] and svc.store.list_audit() == []


@pytest.mark.parametrize("raw,code", [(b"{", "invalid_json"), (b"[1]", "invalid_value"),
                                      (b'{"name": "a", "budget_usd": 1e400}', "invalid_value"),
                                      (b'{"name": "a", "budget_usd": NaN}', "invalid_value")])
def test_bad_raw_bodies(svc: AdminService, raw: bytes, code: str) -> None:
    with pytest.raises(APIError) as ei:
        svc.create_tenant(raw, actor="cli")
    assert ei.value.status == 400 and ei.value.code == code


def test_patch_validation(svc: AdminService) -> None:
    t = svc.create_tenant({"name": "a"}, actor="cli")
    for body, param in (({"name": None}, "name"), ({"rpm": 2**70}, "rpm"), ({"budget_usd": -0.01}, "budget_usd"),
                        ({"nmae": "b"}, "nmae"), ({"id": "ten_other"}, "id")):
        with pytest.raises(APIError) as ei:
            svc.update_tenant(t["id"], body, actor="cli")
        assert ei.value.status == 400 and ei.value.param == param
    assert svc.get_tenant(t["id"]) == t


def test_keys_create_list_revoke_and_never_in_plaintext(svc: AdminService, tmp_path: Path) -> None:
    t = svc.create_tenant({"name": "a"}, actor="cli")
    exp = "2099-01-01T00:00:00Z"
    k = svc.create_key(t["id"], {"name": "ci", "scopes": ["inference", "admin"], "expires_at": exp, "rpm": 7},
                       actor="cli")
    key = k["key"]
    assert key.startswith("lg-") and len(key) >= 3 + 43 and k["prefix"] == key[:10]
    assert k["id"].startswith("key_") and k["scopes"] == ["inference", "admin"] and k["rpm"] == 7
    assert k["expires_at"] == "2099-01-01T00:00:00Z" and k["revoked_at"] is None
    stored = svc.store.get_key_by_hash(hash_key(key))
    assert stored is not None and stored.id == k["id"] and stored.expires_at == 4070908800.0
    listed = svc.list_keys(t["id"])["data"]
    assert [x["id"] for x in listed] == [k["id"]]
    assert all("key" not in x and "key_hash" not in x for x in listed)
    assert hash_key(key) not in json.dumps(svc.audit_list())
    r = svc.revoke_key(k["id"], actor="cli")
    assert r["revoked"] is True and r["revoked_at"] is not None
    again = svc.revoke_key(k["id"], actor="cli")
    assert again["revoked_at"] == r["revoked_at"]
    assert [a.action for a in svc.store.list_audit()] == ["tenant.create", "key.create", "key.revoke"]

    def grep_files() -> int:
        seen = 0
        for f in tmp_path.iterdir():  # the database, its WAL and shared memory
            data = f.read_bytes()
            seen += hash_key(key).encode() in data
            assert key.encode() not in data and key[10:].encode() not in data, f.name
        return seen

    assert grep_files() >= 1  # the hash is there (the search works) ...
    svc.store.close()  # ... and after the WAL is checkpointed into the main file
    assert grep_files() >= 1


def test_key_defaults_and_validation(svc: AdminService) -> None:
    t = svc.create_tenant({"name": "a"}, actor="cli")
    k = svc.create_key(t["id"], None, actor="cli")
    assert k["scopes"] == ["inference"] and k["expires_at"] is None and k["name"] == "default"
    for body, param in (({"scopes": ["root"]}, "scopes.0"), ({"scopes": []}, "scopes"),
                        ({"scopes": ["admin", "admin"]}, "scopes"), ({"expires_at": "tomorrow"}, "expires_at"),
                        ({"expires_at": "2000-01-01T00:00:00Z"}, "expires_at"), ({"expires_at": 5}, "expires_at"),
                        ({"max_tokens": 2**70}, "max_tokens"), ({"scope": ["admin"]}, "scope")):
        with pytest.raises(APIError) as ei:
            svc.create_key(t["id"], body, actor="cli")
        assert ei.value.status == 400 and ei.value.param == param, (body, ei.value.message)


def test_new_key_is_random_and_hash_is_sha256() -> None:
    keys = {new_key()[0] for _ in range(100)}
    assert len(keys) == 100
    key, prefix, h = new_key()
    assert key.startswith(prefix) and len(h) == 64 and h == hash_key(key.encode()) and h != hash_key(key + "x")


def test_delete_tenant_revokes_keys(svc: AdminService) -> None:
    t = svc.create_tenant({"name": "a"}, actor="cli")
    k = svc.create_key(t["id"], {}, actor="cli")
    assert svc.delete_tenant(t["id"], actor="cli") == {"object": "tenant", "id": t["id"], "deleted": True}
    got = svc.store.get_key(k["id"])
    assert got is not None and got.revoked_at is not None
    with pytest.raises(APIError):
        svc.get_tenant(t["id"])


def _settle(svc: AdminService, rid: str, tid: str, model: str, cost: float, at: float) -> None:
    svc.store.settle([UsageRecord(rid, tid, "key_1", model, 10, 20, 5, 0.01, 0.1, 1.0, "stop", 200, cost, at)])


def test_usage_json_csv_filters_and_errors(svc: AdminService) -> None:
    _settle(svc, "r1", "ten_a", "m1", 1.0, 1_700_000_000.0)
    _settle(svc, "r2", "ten_a", "m2", 2.0, 1_700_100_000.0)
    _settle(svc, "r3", "ten_b", "m1", 4.0, 1_700_200_000.0)
    out = svc.usage()
    assert out["object"] == "list" and [r["request_id"] for r in out["data"]] == ["r3", "r2", "r1"]
    assert out["data"][2]["created_at"] == "2023-11-14T22:13:20Z"
    assert [r["request_id"] for r in svc.usage(tenant_id="ten_a", since="2023-11-15")["data"]] == ["r2"]
    assert [r["request_id"] for r in svc.usage(until="1700100000")["data"]] == ["r1"]
    assert [r["request_id"] for r in svc.usage(model="m1", limit="1")["data"]] == ["r3"]
    by_model = svc.usage(group_by="model")["data"]
    assert by_model[0] == {"model": "m1", "requests": 2, "prompt_tokens": 20, "completion_tokens": 40,
                           "cached_tokens": 10, "cost_usd": 5.0, "cost_nusd": 5_000_000_000, "errors": 0}
    text = svc.usage(group_by="day", format="csv")
    assert isinstance(text, str)
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["day", "requests", "prompt_tokens", "completion_tokens", "cached_tokens", "cost_usd",
                       "cost_nusd", "errors"]
    assert len(rows) == 4 and rows[1][0] == "2023-11-17"
    req_csv = list(csv.DictReader(io.StringIO(svc.usage(format="csv", tenant_id="ten_b"))))
    assert len(req_csv) == 1 and req_csv[0]["request_id"] == "r3" and req_csv[0]["cost_usd"] == "4.0"
    assert svc.usage(tenant_id="ten_nobody", format="csv").count("\n") == 1  # just the header
    for kw, param in (({"group_by": "week"}, "group_by"), ({"format": "xml"}, "format"),
                      ({"since": "yesterday"}, "since"), ({"until": "nan"}, "until"), ({"limit": "0"}, "limit"),
                      ({"limit": "x"}, "limit"), ({"limit": 10**9}, "limit")):
        with pytest.raises(APIError) as ei:
            svc.usage(**kw)
        assert ei.value.status == 400 and ei.value.param == param


def test_audit_list_and_verify(svc: AdminService, tmp_path: Path) -> None:
    t = svc.create_tenant({"name": "a"}, actor="cli")
    svc.update_tenant(t["id"], {"rpm": 3}, actor="admin-key")
    a = svc.audit_list()["data"]
    assert [(r["id"], r["actor"], r["action"]) for r in a] == [(1, "cli", "tenant.create"),
                                                               (2, "admin-key", "tenant.update")]
    assert svc.audit_list(since_id=1)["data"][0]["id"] == 2
    v = svc.audit_verify()
    assert v["ok"] is True and v["records"] == 2 and v["first_bad"] is None and v["head"] == a[1]["hash"]
    import sqlite3
    with sqlite3.connect(tmp_path / DB_FILENAME) as raw:
        raw.execute("UPDATE audit SET details = '{\"rpm\":300}' WHERE id = 2")
    v = svc.audit_verify()
    assert v["ok"] is False and v["first_bad"] == 2
    with pytest.raises(APIError):
        svc.audit_list(limit=0)


def test_expiry_parsing_accepts_offsets_and_naive_utc(svc: AdminService) -> None:
    t = svc.create_tenant({"name": "a"}, actor="cli")
    k1 = svc.create_key(t["id"], {"expires_at": "2099-01-01T02:00:00+02:00"}, actor="cli")
    k2 = svc.create_key(t["id"], {"expires_at": "2099-01-01"}, actor="cli")
    assert k1["expires_at"] == k2["expires_at"] == "2099-01-01T00:00:00Z"
    assert svc.store.get_key(k1["id"]).expires_at > time.time()  # type: ignore[union-attr]


def test_weight_and_priority_class_are_validated(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    try:
        svc = AdminService(store, class_names=("rt", "bulk"))
        t = svc.create_tenant({"name": "w", "priority": "bulk", "weight": 3}, actor="cli")
        assert t["weight"] == 3.0 and t["priority"] == "bulk"
        assert svc.update_tenant(t["id"], {"weight": 0.5}, actor="cli")["weight"] == 0.5
        assert svc.update_tenant(t["id"], {"weight": None}, actor="cli")["weight"] == 1.0  # back to the default
        assert store.list_audit()[-1].details == {"weight": 1.0}
        for bad, match in (({"weight": 0}, "weight"), ({"weight": -1}, "weight"), ({"weight": 1e9}, "weight"),
                           ({"weight": "2"}, "weight"), ({"weight": True}, "weight"),
                           ({"priority": "interactive"}, "priority: must be one of rt, bulk"),
                           ({"priority": "BAD NAME"}, "priority")):
            with pytest.raises(APIError) as e:
                svc.create_tenant({"name": "x", **bad}, actor="cli")
            assert e.value.status == 400 and match in e.value.message, (bad, e.value.message)
            assert e.value.param in ("weight", "priority")
        assert [x["name"] for x in svc.list_tenants()["data"]] == ["w"]  # nothing half-created
    finally:
        store.close()
