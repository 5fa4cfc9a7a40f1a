"""Admin input and reach below HTTP: names, weights, duplicate names, a tenant admin's limits,
global keys (schema migration 4, the key ring, the CLI), and the bootstrap key's audit fingerprint."""
from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lockgate.cli import app
from lockgate.gateway.admin_scope import AdminReach
from lockgate.gateway.auth import KeyRing
from lockgate.gateway.gateway import Gateway, GatewayConfig
from lockgate.gateway.tenants import AdminService
from lockgate.server.errors import APIError
from lockgate.store.models import name_key
from lockgate.store.schema import MIGRATIONS
from lockgate.store.sqlite import DB_FILENAME, open_store

BAD_CHARS = ["\u202e", "\u2066", "\u200b", "\u200d", "\ufeff", "\u0085", "\u009b", "\x1b", "\u2028", "\x7f"]


@pytest.fixture
def svc(tmp_path: Path):
    store = open_store(tmp_path)
    yield AdminService(store)
    store.close()


def _refused(fn, status: int, code: str, param: str | None, needle: str) -> APIError:  # noqa: ANN001
    with pytest.raises(APIError) as ei:
        fn()
    e = ei.value
    assert (e.status, e.code, e.param) == (status, code, param), (e.status, e.code, e.param, e.message)
    assert needle in e.message, e.message
    return e


@pytest.mark.parametrize("ch", BAD_CHARS)
def test_invisible_and_control_characters_are_refused_everywhere(svc: AdminService, ch: str) -> None:
    t = svc.create_tenant({"name": "ok"}, actor="cli")
    n = len(svc.store.list_audit())
    msg = f"U+{ord(ch):04X}"
    for where in (f"a{ch}b", f"{ch}ab", f"ab{ch}"):  # a trailing U+0085 is not stripped as whitespace
        _refused(lambda: svc.create_tenant({"name": where}, actor="cli"), 400, "invalid_value", "name", msg)
        _refused(lambda: svc.update_tenant(t["id"], {"name": where}, actor="cli"), 400, "invalid_value", "name", msg)
        _refused(lambda: svc.create_key(t["id"], {"name": where}, actor="cli"), 400, "invalid_value", "name", msg)
        _refused(lambda: svc.create_global_key({"name": where}, actor="cli"), 400, "invalid_value", "name", msg)
        _refused(lambda: svc.create_tenant({"name": "m", "models": [where]}, actor="cli"), 400, "invalid_value",
                 "models.0", msg)
    assert len(svc.store.list_audit()) == n and [x.name for x in svc.store.list_tenants()] == ["ok"]


def test_printable_unicode_names_are_fine(svc: AdminService) -> None:
    for name in ("Ünïcødé GmbH", "東京チーム", "team 🚀", "  padded  "):
        assert svc.create_tenant({"name": name}, actor="cli")["name"] == name.strip()


@pytest.mark.parametrize("weight,needle", [(1e-300, "0.01"), (0, "0.01"), (-1, "0.01"), (0.009, "0.01"),
                                           (100.5, "100"), (1e300, "100"), ("NaN", "number"), ("1", "number")])
def test_weight_is_bounded(svc: AdminService, weight: object, needle: str) -> None:
    _refused(lambda: svc.create_tenant({"name": "w", "weight": weight}, actor="cli"), 400, "invalid_value",
             "weight", needle)
    assert svc.store.list_tenants() == []


@pytest.mark.parametrize("raw", [b'{"name": "w", "weight": NaN}', b'{"name": "w", "weight": Infinity}',
                                 b'{"name": "w", "weight": -Infinity}'])
def test_non_finite_weight_literals_are_refused(svc: AdminService, raw: bytes) -> None:
    _refused(lambda: svc.create_tenant(raw, actor="cli"), 400, "invalid_value", "weight", "")


def test_weight_bounds_themselves_are_accepted(svc: AdminService) -> None:
    assert svc.create_tenant({"name": "lo", "weight": 0.01}, actor="cli")["weight"] == 0.01
    assert svc.create_tenant({"name": "hi", "weight": 100}, actor="cli")["weight"] == 100.0


def test_duplicate_names_are_a_409_ignoring_case_and_compatibility_forms(svc: AdminService) -> None:
    a = svc.create_tenant({"name": "Acme"}, actor="cli")
    b = svc.create_tenant({"name": "Beta"}, actor="cli")
    n = len(svc.store.list_audit())
    for dup in ("Acme", "acme", " ACME ", "Ａｃｍｅ", "ACMＥ"):
        _refused(lambda: svc.create_tenant({"name": dup}, actor="cli"), 409, "conflict", "name", "exists already")
        _refused(lambda: svc.update_tenant(b["id"], {"name": dup}, actor="cli"), 409, "conflict", "name",
                 "exists already")
    assert len(svc.store.list_audit()) == n and svc.get_tenant(b["id"])["name"] == "Beta"
    assert svc.update_tenant(a["id"], {"name": "ACME"}, actor="cli")["name"] == "ACME"  # its own name: fine
    svc.delete_tenant(a["id"], actor="cli")
    assert svc.create_tenant({"name": "acme"}, actor="cli")["name"] == "acme"  # a deleted tenant's name is free
    assert name_key("ﬁne") == name_key("FINE") and name_key("straße") == name_key("STRASSE")


def test_huge_name_and_limits(svc: AdminService) -> None:
    _refused(lambda: svc.create_tenant({"name": "x" * 10_000_000}, actor="cli"), 400, "invalid_value", "name",
             "at most 128")
    for f in ("rpm", "tpm", "max_concurrency", "max_tokens"):
        _refused(lambda: svc.create_tenant({"name": "x", f: 2**70}, actor="cli"), 400, "invalid_value", f, "")
        _refused(lambda: svc.create_tenant(f'{{"name": "x", "{f}": {2**70}}}'.encode(), actor="cli"), 400,
                 "invalid_value", f, "")
    assert svc.store.list_tenants() == []


# ---- a tenant admin's reach (the HTTP side is in tests/server/test_hardening_admin.py) ----------

def test_tenant_admin_reach(svc: AdminService) -> None:
    a = svc.create_tenant({"name": "a", "rpm": 10, "max_tokens": 100, "budget_usd": 5}, actor="cli")
    b = svc.create_tenant({"name": "b"}, actor="cli")
    kb = svc.create_key(b["id"], None, actor="cli")
    mine = AdminService(svc.store, reach=AdminReach(a["id"]))
    assert [t["id"] for t in mine.list_tenants()["data"]] == [a["id"]]
    _refused(lambda: mine.get_tenant(b["id"]), 404, "not_found", "tenant_id", "not found")
    _refused(lambda: mine.update_tenant(a["id"], {"budget_usd": None}, actor="k"), 403, "insufficient_scope",
             "budget_usd", "cannot change")
    _refused(lambda: mine.update_tenant(a["id"], {"name": "b"}, actor="k"), 403, "insufficient_scope", "name",
             "cannot change")  # a 403 before the name is compared: no 409 oracle for other tenants' names
    _refused(lambda: mine.create_key(a["id"], {"max_tokens": 101}, actor="k"), 403, "insufficient_scope",
             "max_tokens", "above the tenant's own limit")
    _refused(lambda: mine.revoke_key(kb["id"], actor="k"), 404, "not_found", "key_id", "not found")
    k = mine.create_key(a["id"], {"rpm": 10, "max_tokens": 100}, actor="key_x")
    assert svc.store.list_audit()[-1].actor == "key_x"
    assert mine.revoke_key(k["id"], actor="key_x")["revoked"] is True
    assert mine.usage(tenant_id=None)["data"] == [] and mine.usage(tenant_id=a["id"])["data"] == []


# ---- global keys ---------------------------------------------------------------------------------

def _v3_database(path: Path) -> None:
    """A database as lockgate wrote it before global keys: api_keys.tenant_id NOT NULL."""
    conn = sqlite3.connect(path, isolation_level=None)
    for stmts in MIGRATIONS[:3]:
        for s in stmts:
            conn.execute(s)
    conn.execute("PRAGMA user_version = 3")
    conn.execute("INSERT INTO tenants(id, name, models, priority, budget_period, prices, created_at, updated_at) "
                 "VALUES ('ten_a', 'a', '[\"*\"]', 'standard', 'month', '{}', 1, 1)")
    conn.execute("INSERT INTO api_keys(id, tenant_id, name, prefix, key_hash, scopes, created_at) "
                 "VALUES ('key_old', 'ten_a', 'k', 'lg-xxxxxxx', 'h1', '[\"inference\"]', 1)")
    conn.close()


def test_migration_keeps_keys_and_allows_global_ones(tmp_path: Path) -> None:
    _v3_database(tmp_path / DB_FILENAME)
    store = open_store(tmp_path)
    try:
        assert store.schema_version() == len(MIGRATIONS)
        old = store.get_key("key_old")
        assert old is not None and old.tenant_id == "ten_a" and old.key_hash == "h1"
        svc = AdminService(store)
        g = svc.create_global_key({"name": "ops", "scopes": ["admin", "metrics"]}, actor="cli")
        assert g["tenant_id"] is None and g["key"].startswith("lg-")
        assert {k["id"] for k in svc.list_keys()["data"]} == {"key_old", g["id"]}
        assert [k["id"] for k in svc.list_keys("ten_a")["data"]] == ["key_old"]
        conn = sqlite3.connect(tmp_path / DB_FILENAME)
        assert conn.execute("PRAGMA foreign_key_check").fetchall() == []
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        conn.close()
        ring = KeyRing(None)
        ring.load(store.list_tenants(), store.list_keys())
        p = ring.authenticate(f"Bearer {g['key']}".encode())
        assert p.is_global_admin and p.tenant is None and not p.can_infer and p.actor == g["id"]
        assert p.admin_reach.is_global and p.can_read_metrics
        _refused(lambda: svc.create_global_key({"scopes": ["inference"]}, actor="cli"), 400, "invalid_value",
                 "scopes", "cannot have the inference scope")
        _refused(lambda: svc.create_global_key({"rpm": 5}, actor="cli"), 400, "invalid_value", "rpm", "unknown")
    finally:
        store.close()


def test_tenant_admin_key_is_not_global(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    svc = AdminService(store)
    t = svc.create_tenant({"name": "a"}, actor="cli")
    k = svc.create_key(t["id"], {"scopes": ["admin"]}, actor="cli")
    ring = KeyRing(None)
    ring.load(store.list_tenants(), store.list_keys())
    p = ring.authenticate(f"Bearer {k['key']}".encode())
    assert p.is_admin and not p.is_global_admin and p.admin_reach == AdminReach(t["id"]) and not p.can_read_metrics
    store.close()


def test_cli_global_keys(tmp_path: Path) -> None:
    runner = CliRunner()

    def run(*args: str, code: int = 0):  # noqa: ANN202
        r = runner.invoke(app, [*args, "--data-dir", str(tmp_path)])
        assert r.exit_code == code, (args, r.exit_code, r.stdout, r.stderr)
        return r

    g = json.loads(run("keys", "create", "--global", "--name", "ops").stdout)
    assert g["tenant_id"] is None and g["scopes"] == ["admin"]
    m = json.loads(run("keys", "create", "--global", "--scope", "metrics").stdout)
    assert m["scopes"] == ["metrics"]
    t = json.loads(run("tenants", "create", "--name", "a").stdout)
    assert "not both" in run("keys", "create", t["id"], "--global", code=2).stderr
    assert "not both" in run("keys", "create", code=2).stderr
    assert "inference scope" in run("keys", "create", "--global", "--scope", "inference", code=1).stderr
    assert "exists already" in run("tenants", "create", "--name", "A", code=1).stderr
    keys = json.loads(run("keys", "list").stdout)["data"]
    assert {k["id"] for k in keys} == {g["id"], m["id"]}


# ---- the bootstrap key's audit fingerprint ------------------------------------------------------

def _start(data: Path, key: str) -> None:
    async def go() -> None:
        gw = Gateway(GatewayConfig(data_dir=str(data), admin_key=key))
        await gw.start()
        await gw.stop()
    asyncio.run(go())


def _audit(data: Path) -> list:
    store = open_store(data)
    try:
        assert store.verify_audit()[0]
        return [(r.action, r.details) for r in store.list_audit()]
    finally:
        store.close()


def test_bootstrap_record_is_a_keyed_hash(tmp_path: Path) -> None:
    key = "weak-admin-key"
    _start(tmp_path, key)
    _start(tmp_path, key)  # the same key: nothing new
    recs = _audit(tmp_path)
    assert [a for a, _ in recs] == ["bootstrap"]
    text = json.dumps(recs)
    assert hashlib.sha256(key.encode()).hexdigest()[:8] not in text and "admin_key_sha256" not in text
    assert len(recs[0][1]["admin_key_hmac"]) == 32
    _start(tmp_path, "another-key")
    assert [a for a, _ in _audit(tmp_path)] == ["bootstrap", "admin_key.change"]


def test_old_sha256_records_are_understood(tmp_path: Path) -> None:
    key = "weak-admin-key"
    store = open_store(tmp_path)
    store.append_audit("system", "bootstrap", None, {"admin_key_sha256": hashlib.sha256(key.encode()).hexdigest()[:16]})
    store.close()
    _start(tmp_path, key)  # the same key in the new form: recorded once, as such
    _start(tmp_path, key)
    assert [a for a, _ in _audit(tmp_path)] == ["bootstrap", "admin_key.fingerprint"]
    _start(tmp_path, "another-key")
    assert [a for a, _ in _audit(tmp_path)] == ["bootstrap", "admin_key.fingerprint", "admin_key.change"]

    other = tmp_path / "other"  # an old record of a different key: a change
    store = open_store(other)
    store.append_audit("system", "bootstrap", None, {"admin_key_sha256": "0123456789abcdef"})
    store.close()
    _start(other, key)
    assert [a for a, _ in _audit(other)] == ["bootstrap", "admin_key.change"]


def test_the_secret_is_per_database_and_stable(tmp_path: Path) -> None:
    a, b = open_store(tmp_path / "a"), open_store(tmp_path / "b")
    try:
        s = a.meta_secret("x")
        assert len(s) == 32 and a.meta_secret("x") == s and b.meta_secret("x") != s and a.meta_secret("y") != s
    finally:
        a.close()
        b.close()
