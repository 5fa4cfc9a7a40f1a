"""The store on a real SQLite file and (the `store` fixture) a real PostgreSQL database: migrations, WAL, tenants and keys, the exactly-once ledger, idempotency."""
from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from lockgate.store.models import (
    ApiKey,
    IdempotencyRecord,
    Limits,
    Price,
    Reservation,
    Tenant,
    UsageQuery,
    UsageRecord,
)
from lockgate.store.schema import MIGRATIONS, SCHEMA_VERSION, SchemaError
from lockgate.store.sqlite import DB_FILENAME, SQLiteStore, StoreError, open_store

try:
    import psycopg

    INTEGRITY: tuple[type[Exception], ...] = (sqlite3.IntegrityError, psycopg.errors.IntegrityError)
except ImportError:  # the PostgreSQL cases then fail at their fixture, not here
    INTEGRITY = (sqlite3.IntegrityError,)


def _tenant(tid: str = "ten_a", **kw) -> Tenant:
    return Tenant(id=tid, name=kw.pop("name", tid), **kw)


def _key(kid: str, tid: str = "ten_a", h: str | None = None) -> ApiKey:
    return ApiKey(id=kid, tenant_id=tid, name=kid, prefix="lg-xxxx", key_hash=h or ("h" + kid).ljust(64, "0"))


def _usage(rid: str, tid: str = "ten_a", model: str = "m1", cost: float = 1.0, at: float = 0.0, **kw) -> UsageRecord:
    base = dict(request_id=rid, tenant_id=tid, key_id="key_1", model=model, prompt_tokens=10,
                completion_tokens=5, cached_tokens=2, queue_time_s=0.01, ttft_s=0.1, e2e_s=0.5,
                finish_reason="stop", status=200, cost_usd=cost, created_at=at)
    base.update(kw)
    return UsageRecord(**base)


# ---------------------------------------------------------------- schema
def test_fresh_db_gets_latest_version_wal_and_reopen_is_idempotent(tmp_path: Path) -> None:
    s = open_store(tmp_path)
    assert s.schema_version() == SCHEMA_VERSION >= 1
    assert s.journal_mode() == "wal"
    s.create_tenant(_tenant(), "cli")
    s.close()
    s2 = open_store(tmp_path)  # migrations do not run again nor lose data
    assert s2.schema_version() == SCHEMA_VERSION
    assert [t.id for t in s2.list_tenants()] == ["ten_a"]
    assert s2.verify_audit() == (True, 1, None)
    s2.close()
    with sqlite3.connect(tmp_path / DB_FILENAME) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_database_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    open_store(tmp_path).close()
    with sqlite3.connect(tmp_path / DB_FILENAME) as raw:
        raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(SchemaError, match="newer"):
        open_store(tmp_path)


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / DB_FILENAME).write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError):
        open_store(tmp_path)


def test_synchronous_setting_is_applied(tmp_path: Path) -> None:
    s = SQLiteStore(tmp_path / "x.db", synchronous="FULL")
    assert s._conn().execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert s._conn().execute("PRAGMA foreign_keys").fetchone()[0] == 1
    s.close()
    with pytest.raises(ValueError):
        SQLiteStore(tmp_path / "y.db", synchronous="OFF")


# ---------------------------------------------------------------- tenants and keys
def test_tenant_crud_round_trips_every_field(store: SQLiteStore) -> None:
    t = _tenant(models=["m1", "m2"], limits=Limits(rpm=10, tpm=1000, max_concurrency=2, max_tokens=64),
                priority="batch", budget_usd=5.5, budget_period="day",
                prices={"*": Price(1.0, 2.0), "m1": Price(0.5, 1.5, 0.25)})
    store.create_tenant(t, "cli")
    got = store.get_tenant("ten_a")
    assert got is not None
    assert got.models == ["m1", "m2"] and got.limits == Limits(10, 1000, 2, 64)
    assert got.priority == "batch" and got.budget_usd == 5.5 and got.budget_period == "day"
    assert got.prices == {"*": Price(1.0, 2.0, None), "m1": Price(0.5, 1.5, 0.25)}
    assert got.created_at > 0
    got.limits.rpm = None
    got.name = "renamed"
    store.update_tenant(got, {"rpm": None, "name": "renamed"}, "cli")
    again = store.get_tenant("ten_a")
    assert again is not None and again.limits.rpm is None and again.name == "renamed"
    assert store.count_tenants() == 1
    with pytest.raises(INTEGRITY):
        store.create_tenant(_tenant(), "cli")  # same id
    with pytest.raises(KeyError):
        store.update_tenant(_tenant("ten_nope"), {}, "cli")
    assert [r.action for r in store.list_audit()] == ["tenant.create", "tenant.update"]


def test_key_lookup_by_hash_and_revoke(store: SQLiteStore) -> None:
    store.create_tenant(_tenant(), "cli")
    k = _key("key_1", h="a" * 64)
    k.scopes = ["admin"]
    k.limits = Limits(rpm=3)
    k.expires_at = time.time() + 60
    store.create_key(k, "cli")
    got = store.get_key_by_hash("a" * 64)
    assert got is not None and got.id == "key_1" and got.scopes == ["admin"] and got.limits.rpm == 3
    assert got.expires_at == pytest.approx(k.expires_at)
    assert store.get_key_by_hash("b" * 64) is None
    with pytest.raises(INTEGRITY):  # key_hash is unique
        store.create_key(_key("key_2", h="a" * 64), "cli")
    with pytest.raises(KeyError):
        store.create_key(_key("key_3", tid="ten_nope"), "cli")
    assert store.revoke_key("key_1", "cli") is True
    assert store.revoke_key("key_1", "cli") is False  # already revoked: no change, no audit
    assert store.revoke_key("key_nope", "cli") is False
    revoked = store.get_key("key_1")
    assert revoked is not None and revoked.revoked_at is not None
    assert [r.action for r in store.list_audit()] == ["tenant.create", "key.create", "key.revoke"]


def test_delete_tenant_revokes_its_keys_only(store: SQLiteStore) -> None:
    store.create_tenant(_tenant("ten_a"), "cli")
    store.create_tenant(_tenant("ten_b"), "cli")
    store.create_key(_key("key_a1", "ten_a"), "cli")
    store.create_key(_key("key_a2", "ten_a"), "cli")
    store.create_key(_key("key_b1", "ten_b"), "cli")
    v = store.admin_version()
    assert store.delete_tenant("ten_a", "cli") is True
    assert store.admin_version() == v + 1
    assert store.delete_tenant("ten_a", "cli") is False
    assert store.get_tenant("ten_a") is None
    assert [t.id for t in store.list_tenants()] == ["ten_b"]
    keys = {k.id: k for k in store.list_keys()}
    assert keys["key_a1"].revoked_at is not None and keys["key_a2"].revoked_at is not None
    assert keys["key_b1"].revoked_at is None
    assert [k.id for k in store.list_keys("ten_b")] == ["key_b1"]
    last = store.list_audit()[-1]
    assert last.action == "tenant.delete" and last.details == {"revoked_keys": ["key_a1", "key_a2"]}
    with pytest.raises(KeyError):  # no keys for a deleted tenant
        store.create_key(_key("key_a3", "ten_a"), "cli")


def test_a_failed_change_writes_no_audit_record(store: SQLiteStore) -> None:
    store.create_tenant(_tenant(), "cli")
    with pytest.raises(INTEGRITY):
        store.create_tenant(_tenant(), "cli")
    assert len(store.list_audit()) == 1
    assert store.verify_audit() == (True, 1, None)


# ---------------------------------------------------------------- reservations and the ledger
def test_settle_is_exactly_once(store: SQLiteStore) -> None:
    store.add_reservations([Reservation("r1", "ten_a", "key_1", "m1", 3.0, 10),
                            Reservation("r2", "ten_a", "key_1", "m1", 3.0, 10)])
    store.checkpoint_reservations([("r1", 7, 2)])
    live = {r.request_id: r for r in store.list_reservations()}
    assert set(live) == {"r1", "r2"} and live["r1"].completion_tokens == 7 and live["r1"].cached_tokens == 2
    store.settle([_usage("r1", cost=1.25)])
    store.settle([_usage("r1", cost=99.0), _usage("r1", cost=50.0)])  # retries and duplicates
    assert [r.request_id for r in store.list_reservations()] == ["r2"]
    rows = store.query_usage(UsageQuery(tenant_id="ten_a"))
    assert len(rows) == 1 and rows[0]["cost_usd"] == 1.25
    assert store.spent_usd("ten_a", None) == pytest.approx(1.25)
    # a settled request gets no new reservation (a late add must not hold budget forever)
    store.add_reservations([Reservation("r1", "ten_a", "key_1", "m1", 3.0, 10)])
    assert [r.request_id for r in store.list_reservations()] == ["r2"]
    # a repeated add keeps the first (and its checkpoint)
    store.checkpoint_reservations([("r2", 4, 0)])
    store.add_reservations([Reservation("r2", "ten_a", "key_1", "m1", 9.0, 10)])
    (r2,) = store.list_reservations()
    assert r2.reserved_usd == 3.0 and r2.completion_tokens == 4


def test_reservations_survive_reopen_for_recovery(tmp_path: Path) -> None:
    s = open_store(tmp_path)
    s.add_reservations([Reservation("r1", "ten_a", None, "m1", 0.5, 100, created_at=1.0)])
    s.checkpoint_reservations([("r1", 42, 3)])
    s.close()
    s = open_store(tmp_path)
    (r,) = s.list_reservations()
    assert (r.request_id, r.key_id, r.prompt_tokens, r.completion_tokens, r.cached_tokens) == ("r1", None, 100, 42, 3)
    s.close()


def test_spent_usd_per_period_and_tenant(store: SQLiteStore) -> None:
    store.settle([_usage("old", cost=10.0, at=1000.0), _usage("new", cost=2.5, at=5000.0),
                  _usage("other", tid="ten_b", cost=7.0, at=5000.0)])
    assert store.spent_usd("ten_a", None) == pytest.approx(12.5)
    assert store.spent_usd("ten_a", 5000.0) == pytest.approx(2.5)
    assert store.spent_usd("ten_a", 5000.1) == 0.0
    assert store.spent_usd("ten_b", 0.0) == pytest.approx(7.0)
    assert store.spent_usd("ten_nope", None) == 0.0


def test_query_usage_filters_and_grouping(store: SQLiteStore) -> None:
    day = 86400.0
    d0 = 20000 * day  # a UTC midnight
    store.settle([
        _usage("a1", model="m1", cost=1.0, at=d0 + 10),
        _usage("a2", model="m2", cost=2.0, at=d0 + 20),
        _usage("a3", model="m1", cost=4.0, at=d0 + day + 5),
        _usage("b1", tid="ten_b", model="m1", cost=8.0, at=d0 + day + 6),
    ])
    rows = store.query_usage(UsageQuery())
    assert [r["request_id"] for r in rows] == ["b1", "a3", "a2", "a1"]  # newest first
    assert set(rows[0]) >= {"tenant_id", "key_id", "model", "prompt_tokens", "completion_tokens", "cached_tokens",
                            "queue_time_s", "ttft_s", "e2e_s", "finish_reason", "status", "cost_usd", "created_at"}
    assert [r["request_id"] for r in store.query_usage(UsageQuery(tenant_id="ten_a", model="m1"))] == ["a3", "a1"]
    assert [r["request_id"] for r in store.query_usage(UsageQuery(since=d0 + 20, until=d0 + day + 6))] == ["a3", "a2"]
    assert [r["request_id"] for r in store.query_usage(UsageQuery(limit=2))] == ["b1", "a3"]
    by_day = store.query_usage(UsageQuery(tenant_id="ten_a", group_by="day"))
    assert by_day == [
        {"day": "2024-10-05", "requests": 1, "prompt_tokens": 10, "completion_tokens": 5, "cached_tokens": 2,
         "cost_usd": 4.0, "cost_nusd": 4_000_000_000, "errors": 0},
        {"day": "2024-10-04", "requests": 2, "prompt_tokens": 20, "completion_tokens": 10, "cached_tokens": 4,
         "cost_usd": 3.0, "cost_nusd": 3_000_000_000, "errors": 0},
    ]
    by_model = store.query_usage(UsageQuery(group_by="model"))
    assert [(r["model"], r["requests"], r["cost_usd"]) for r in by_model] == [("m1", 3, 13.0), ("m2", 1, 2.0)]
    with pytest.raises(ValueError):
        store.query_usage(UsageQuery(group_by="week"))


# ---------------------------------------------------------------- idempotency
def test_idempotency_claim_finish_and_conflict(store: SQLiteStore) -> None:
    rec = IdempotencyRecord("ten_a", "idem-1", "bh1", "req_1", None, None)
    assert store.put_idempotency(rec) is True
    assert store.put_idempotency(IdempotencyRecord("ten_a", "idem-1", "bh2", "req_2", None, None)) is False
    assert store.put_idempotency(IdempotencyRecord("ten_b", "idem-1", "bh2", "req_3", None, None)) is True
    got = store.get_idempotency("ten_a", "idem-1")
    assert got is not None and got.request_id == "req_1" and got.status is None and got.body_hash == "bh1"
    store.finish_idempotency("ten_a", "idem-1", 200, b'{"ok":true}')
    got = store.get_idempotency("ten_a", "idem-1")
    assert got is not None and got.status == 200 and got.response == b'{"ok":true}'
    assert store.get_idempotency("ten_a", "nope") is None
    store.delete_idempotency("ten_b", "idem-1")
    assert store.get_idempotency("ten_b", "idem-1") is None
    assert store.prune_idempotency(time.time() + 1) == 1
    assert store.get_idempotency("ten_a", "idem-1") is None


# ---------------------------------------------------------------- threads and processes
def test_readers_in_threads_while_writing(store: SQLiteStore) -> None:
    store.create_tenant(_tenant(), "cli")
    errors: list[BaseException] = []

    def read() -> None:
        try:
            for _ in range(50):
                assert store.get_tenant("ten_a") is not None
                store.spent_usd("ten_a", None)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=read) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(50):
        store.settle([_usage(f"r{i}", cost=1.0)])
    for t in threads:
        t.join()
    assert not errors
    assert store.spent_usd("ten_a", None) == pytest.approx(50.0)


def test_two_stores_on_one_file_see_each_other(tmp_path: Path) -> None:
    a, b = open_store(tmp_path), open_store(tmp_path)  # e.g. the server and the CLI
    v = a.admin_version()
    b.create_tenant(_tenant(), "cli")
    assert a.get_tenant("ten_a") is not None and a.admin_version() == v + 1
    a.append_audit("system", "bootstrap", None, {})
    assert b.verify_audit() == (True, 2, None)
    a.close()
    b.close()


def test_a_version_1_database_is_migrated_and_keeps_its_tenants(tmp_path: Path) -> None:
    """Schema 2 adds the tenant's fair-share weight; a database written by schema 1 gets weight 1.0."""
    path = tmp_path / DB_FILENAME
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as raw:
        for stmt in MIGRATIONS[0]:
            raw.execute(stmt)
        raw.execute("PRAGMA user_version = 1")
        raw.execute("INSERT INTO tenants(id, name, models, priority, budget_period, prices, created_at, updated_at) "
                    "VALUES ('ten_old', 'old', '[\"*\"]', 'batch', 'month', '{}', 1.0, 1.0)")
    s = SQLiteStore(path)
    try:
        t = s.get_tenant("ten_old")
        assert t is not None and t.priority == "batch" and t.weight == 1.0
        t.weight = 2.5
        s.update_tenant(t, {"weight": 2.5}, "test")
        again = s.get_tenant("ten_old")
        assert again is not None and again.weight == 2.5
    finally:
        s.close()
    with contextlib.closing(sqlite3.connect(path)) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_schema_3_keeps_the_model_version_and_migrates_a_version_2_database(tmp_path: Path) -> None:
    """Schema 3 adds the serving model version to usage rows and reservations (NULL for older rows)."""
    path = tmp_path / DB_FILENAME
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as raw:
        for stmt in (*MIGRATIONS[0], *MIGRATIONS[1]):
            raw.execute(stmt)
        raw.execute("PRAGMA user_version = 2")
        raw.execute("INSERT INTO usage(request_id, tenant_id, key_id, model, prompt_tokens, completion_tokens, "
                    "cached_tokens, finish_reason, status, cost_usd, created_at) "
                    "VALUES ('old', 'ten_a', NULL, 'm1', 1, 1, 0, 'stop', 200, 0.5, 1.0)")
    s = SQLiteStore(path)
    try:
        s.add_reservations([Reservation("r1", "ten_a", None, "m1", 1.0, 10, model_version="v2")])
        assert s.list_reservations()[0].model_version == "v2"
        s.settle([_usage("new", model_version="v2", at=2.0)])
        rows = {r["request_id"]: r for r in s.query_usage(UsageQuery())}
        assert rows["old"]["model_version"] is None and rows["new"]["model_version"] == "v2"
    finally:
        s.close()
