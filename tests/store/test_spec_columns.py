"""Schema 11: speculative decoding's per-request counts in the usage ledger (`spec_draft_tokens`,
`spec_accepted_tokens`), on a real SQLite file and a real PostgreSQL database: written and read back,
a schema-10 database migrated on open with its old rows reading 0, and the pipeline's sums over a
request's engine requests reaching the row."""
from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from types import SimpleNamespace


from lockgate.engine.outputs import RequestTimes
from lockgate.gateway.accounting import Meter
from lockgate.gateway.auth import Principal
from lockgate.gateway.usage_view import REQUEST_COLUMNS, to_csv
from lockgate.observability.record import RequestRecord
from lockgate.server.pipeline import Pipeline
from lockgate.store import pg_schema
from lockgate.store.models import Tenant, UsageQuery, UsageRecord
from lockgate.store.schema import MIGRATIONS, SCHEMA_VERSION, SPEC_MIGRATION
from lockgate.store.sqlite import DB_FILENAME, SQLiteStore, open_store

SPEC_COLS = ("spec_draft_tokens", "spec_accepted_tokens")


def _usage(rid: str, at: float = 1.0, **kw) -> UsageRecord:
    return UsageRecord(request_id=rid, tenant_id="ten_a", key_id="key_1", model="m1", prompt_tokens=10,
                       completion_tokens=5, cached_tokens=0, queue_time_s=0.01, ttft_s=0.1, e2e_s=0.5,
                       finish_reason="stop", status=200, cost_usd=0.25, created_at=at, **kw)


def _rows(s) -> dict[str, dict]:
    return {r["request_id"]: r for r in s.query_usage(UsageQuery())}


# Column lists of a schema-10 usage table (what an older lockgate wrote).
OLD_INSERT = ("INSERT INTO usage(request_id, tenant_id, key_id, model, prompt_tokens, completion_tokens, "
              "cached_tokens, finish_reason, status, cost_usd, created_at, cost_nusd, hedged, router) "
              "VALUES ('old', 'ten_a', NULL, 'm1', 3, 4, 0, 'stop', 200, 0.5, 1.0, 500000000, 1, 'r/x')")


def test_schema_11_is_the_spec_columns_on_both_backends() -> None:
    assert SCHEMA_VERSION == 11
    assert MIGRATIONS[10] is SPEC_MIGRATION and pg_schema.MIGRATIONS[10] is SPEC_MIGRATION
    for col in SPEC_COLS:
        assert any(col in stmt and "NOT NULL DEFAULT 0" in stmt for stmt in SPEC_MIGRATION), col


def test_spec_counts_are_written_and_read_back(store) -> None:
    store.settle([_usage("spec", at=2.0, spec_draft_tokens=12, spec_accepted_tokens=9), _usage("plain")])
    rows = _rows(store)
    assert (rows["spec"]["spec_draft_tokens"], rows["spec"]["spec_accepted_tokens"]) == (12, 9)
    assert (rows["plain"]["spec_draft_tokens"], rows["plain"]["spec_accepted_tokens"]) == (0, 0)
    assert all(type(rows[r][c]) is int for r in rows for c in SPEC_COLS)
    # exactly once: a second row for the same request id keeps the first one's counts
    store.settle([_usage("spec", at=3.0, spec_draft_tokens=1, spec_accepted_tokens=1)])
    assert _rows(store)["spec"]["spec_draft_tokens"] == 12


def _check_migrated(s) -> None:
    """A store opened on a schema-10 database holding the old row: at 11, the old row reads 0 and
    keeps its other values, a new row stores its counts."""
    assert s.schema_version() == 11
    s.settle([_usage("new", at=2.0, spec_draft_tokens=12, spec_accepted_tokens=9)])
    rows = _rows(s)
    old = rows["old"]
    assert (old["spec_draft_tokens"], old["spec_accepted_tokens"]) == (0, 0)
    assert old["hedged"] == 1 and old["router"] == "r/x" and old["completion_tokens"] == 4  # kept
    assert (rows["new"]["spec_draft_tokens"], rows["new"]["spec_accepted_tokens"]) == (12, 9)


def test_a_schema_10_sqlite_database_migrates_and_old_rows_read_0(tmp_path: Path) -> None:
    path = tmp_path / DB_FILENAME
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as raw:
        for migration in MIGRATIONS[:10]:
            for stmt in migration:
                raw.execute(stmt)
        raw.execute("PRAGMA user_version = 10")
        raw.execute(OLD_INSERT)
        cols = {r[1] for r in raw.execute("PRAGMA table_info(usage)")}
        assert not cols & set(SPEC_COLS)  # really the previous schema
    s = SQLiteStore(path)
    try:
        _check_migrated(s)
    finally:
        s.close()
    with contextlib.closing(sqlite3.connect(path)) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == 11
        info = {r[1]: r for r in raw.execute("PRAGMA table_info(usage)")}
        for col in SPEC_COLS:  # (cid, name, type, notnull, default, pk)
            assert info[col][2] == "INTEGER" and info[col][3] == 1 and info[col][4] == "0"


def test_a_schema_10_postgresql_database_migrates_and_old_rows_read_0(pg_url: str) -> None:
    import psycopg

    from lockgate.store.postgres import PostgresStore

    with psycopg.connect(pg_url, autocommit=True) as c:  # as an older lockgate's migrate() left it
        c.execute("CREATE TABLE lockgate_schema (version INTEGER NOT NULL)")
        for version, migration in enumerate(pg_schema.MIGRATIONS[:10], start=1):
            with c.transaction():
                for stmt in migration:
                    c.execute(stmt)
                c.execute("INSERT INTO lockgate_schema(version) VALUES (%s)", (version,))
        c.execute(OLD_INSERT)
        cols = {r[0] for r in c.execute("SELECT column_name FROM information_schema.columns "
                                        "WHERE table_name = 'usage'")}
        assert "router" in cols and not cols & set(SPEC_COLS)
    s = PostgresStore(pg_url)
    try:
        _check_migrated(s)
    finally:
        s.close()
    with psycopg.connect(pg_url, autocommit=True) as c:
        assert [v for (v,) in c.execute("SELECT version FROM lockgate_schema ORDER BY version")] == \
            list(range(1, 12))
        info = {r[0]: r for r in c.execute(
            "SELECT column_name, is_nullable, column_default FROM information_schema.columns "
            "WHERE table_name = 'usage' AND column_name LIKE 'spec_%'")}
        assert set(info) == set(SPEC_COLS)
        assert all(info[col][1] == "NO" and info[col][2] == "0" for col in SPEC_COLS)


def test_the_pipeline_sums_every_engine_request_into_the_ledger_row(tmp_path: Path) -> None:
    """n = 2: two engine requests' counts add up in the meter, then in the row the store returns."""
    tenant = Tenant(id="ten_a", name="acme")
    meter = Meter(request_id="req-n2", principal=Principal(tenant=tenant, key=None, is_admin=False, can_infer=True),
                  model="m1", prompt_tokens=4, completion_tokens=20)
    record = RequestRecord(request_id="req-n2", route="/v1/completions")
    record.engine_times = [RequestTimes("req-n2-0", 1.0, 1.5, 2.0, 3.0, num_draft_tokens=8, num_accepted_tokens=6),
                           RequestTimes("req-n2-1", 1.0, 1.25, 2.0, 3.0, num_draft_tokens=4, num_accepted_tokens=3)]
    pipe = SimpleNamespace(record=record, _params=None, meter=meter, target=None, app=None)
    Pipeline._on_finish(pipe, ["stop", "stop"], None)  # type: ignore[arg-type]
    assert (meter.spec_draft_tokens, meter.spec_accepted_tokens) == (12, 9)
    assert meter.queue_time_s == 0.25  # set alongside, from the same engine times
    row = meter.usage_row(200, "ok")
    assert (row.spec_draft_tokens, row.spec_accepted_tokens) == (12, 9)
    s = open_store(tmp_path)
    try:
        s.settle([row])
        (got,) = s.query_usage(UsageQuery())
        assert (got["spec_draft_tokens"], got["spec_accepted_tokens"]) == (12, 9)
    finally:
        s.close()
    # a request that did not speculate (or never reached the engine) reads 0
    plain = Meter(request_id="req-0", principal=meter.principal, model="m1")
    Pipeline._on_finish(SimpleNamespace(record=RequestRecord(request_id="req-0", route="/v1/completions"),
                                        _params=None, meter=plain, target=None, app=None), None, "internal")
    assert (plain.usage_row(500, "error").spec_draft_tokens, plain.spec_accepted_tokens) == (0, 0)


def test_request_rows_and_csv_carry_the_counts() -> None:
    assert REQUEST_COLUMNS[-2:] == SPEC_COLS
    row = {c: None for c in REQUEST_COLUMNS} | {"spec_draft_tokens": 12, "spec_accepted_tokens": 9}
    header, line = to_csv(REQUEST_COLUMNS, [row]).splitlines()
    assert header.endswith(",spec_draft_tokens,spec_accepted_tokens") and line.endswith(",12,9")
