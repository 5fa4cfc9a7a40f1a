"""The PostgreSQL schema: the same numbered migrations as SQLite's (schema.py), in PostgreSQL's types.

Migration N takes a database from version N-1 to N on both backends, so a
version number names one schema everywhere. The version is kept in
`lockgate_schema`; migrations run under a session advisory lock, so instances
starting together migrate once (the others wait, then find the version current).
"""
from __future__ import annotations

from typing import Any

from lockgate.store.pg_functions import ADMIT_V8, FUNCTIONS
from lockgate.store.schema import (
    GENESIS_HASH,
    OUTPUT_SCHEMAS_MIGRATION,
    POLICIES_MIGRATION,
    SCHEMA_VERSION,
    SHARED_STATE_MIGRATION,
    SPEC_MIGRATION,
    SchemaError,
)

MIGRATE_LOCK = 0x6C6F636B67617465  # "lockgate": pg_advisory_lock key for migrations
ADMIN_LOCK = MIGRATE_LOCK + 1  # admin changes and the audit chain (pg_advisory_xact_lock)

# 8: as schema.py's SPEND_MIGRATION, in PostgreSQL's types.
SPEND_MIGRATION: tuple[str, ...] = (
    "ALTER TABLE usage ADD COLUMN user_id TEXT",
    "ALTER TABLE usage ADD COLUMN priority_class TEXT",
    "ALTER TABLE usage ADD COLUMN cost_nusd BIGINT NOT NULL DEFAULT 0",
    "UPDATE usage SET cost_nusd = CAST(round(cost_usd * 1000000000) AS BIGINT)",
    "CREATE INDEX usage_key_time ON usage(key_id, created_at)",
    "ALTER TABLE api_keys ADD COLUMN budget_usd DOUBLE PRECISION",
    "ALTER TABLE api_keys ADD COLUMN budget_period TEXT NOT NULL DEFAULT 'month'",
    "ALTER TABLE api_keys ADD COLUMN alert_thresholds TEXT NOT NULL DEFAULT '[]'",
    "ALTER TABLE tenants ADD COLUMN alert_thresholds TEXT NOT NULL DEFAULT '[]'",
    "ALTER TABLE tenants ADD COLUMN alert_webhook TEXT",
    """CREATE TABLE alerts (
        id TEXT PRIMARY KEY,               -- the dedup key: one row however many instances raise it
        kind TEXT NOT NULL,                -- 'budget' | 'anomaly'
        tenant_id TEXT,
        key_id TEXT,
        payload TEXT NOT NULL,             -- the JSON body sent (canonical)
        created_at DOUBLE PRECISION NOT NULL
    )""",
    "CREATE INDEX alerts_time ON alerts(created_at)",
    """CREATE TABLE alert_deliveries (
        alert_id TEXT NOT NULL REFERENCES alerts(id),
        url TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at DOUBLE PRECISION NOT NULL,
        claimed_until DOUBLE PRECISION,              -- a sender holds it until then; another takes it over after
        delivered_at DOUBLE PRECISION,
        failed_at DOUBLE PRECISION,                 -- given up (refused address, too many attempts, too old)
        last_error TEXT,
        PRIMARY KEY (alert_id, url)
    )""",
    "CREATE INDEX alert_deliveries_due ON alert_deliveries(delivered_at, next_attempt_at)",
    ADMIT_V8,  # lockgate_admit with the key's own budget (pg_functions.py), replacing migration 7's
)

MIGRATIONS: list[tuple[str, ...]] = [
    # 1: tenants, keys, reservations, the usage ledger, idempotency, the audit chain.
    (
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        """CREATE TABLE tenants (
            id TEXT PRIMARY KEY, name TEXT NOT NULL, models TEXT NOT NULL,
            rpm BIGINT, tpm BIGINT, max_concurrency BIGINT, max_tokens BIGINT,
            priority TEXT NOT NULL, budget_usd DOUBLE PRECISION, budget_period TEXT NOT NULL,
            prices TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL,
            deleted_at DOUBLE PRECISION
        )""",
        """CREATE TABLE api_keys (
            id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL REFERENCES tenants(id), name TEXT NOT NULL,
            prefix TEXT NOT NULL, key_hash TEXT NOT NULL UNIQUE, scopes TEXT NOT NULL,
            rpm BIGINT, tpm BIGINT, max_concurrency BIGINT, max_tokens BIGINT,
            expires_at DOUBLE PRECISION, revoked_at DOUBLE PRECISION, created_at DOUBLE PRECISION NOT NULL
        )""",
        "CREATE INDEX api_keys_tenant ON api_keys(tenant_id)",
        """CREATE TABLE reservations (
            request_id TEXT PRIMARY KEY, tenant_id TEXT NOT NULL, key_id TEXT, model TEXT NOT NULL,
            reserved_usd DOUBLE PRECISION NOT NULL, prompt_tokens BIGINT NOT NULL,
            completion_tokens BIGINT NOT NULL DEFAULT 0, cached_tokens BIGINT NOT NULL DEFAULT 0,
            created_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL
        )""",
        """CREATE TABLE usage (
            request_id TEXT PRIMARY KEY, tenant_id TEXT, key_id TEXT, model TEXT NOT NULL,
            prompt_tokens BIGINT NOT NULL, completion_tokens BIGINT NOT NULL, cached_tokens BIGINT NOT NULL,
            queue_time_s DOUBLE PRECISION, ttft_s DOUBLE PRECISION, e2e_s DOUBLE PRECISION,
            finish_reason TEXT NOT NULL, status INTEGER NOT NULL, cost_usd DOUBLE PRECISION NOT NULL,
            created_at DOUBLE PRECISION NOT NULL
        )""",
        "CREATE INDEX usage_tenant_time ON usage(tenant_id, created_at)",
        "CREATE INDEX usage_model ON usage(model)",
        "CREATE INDEX usage_time ON usage(created_at)",
        """CREATE TABLE idempotency (
            tenant_id TEXT NOT NULL, key TEXT NOT NULL, body_hash TEXT NOT NULL, request_id TEXT NOT NULL,
            status INTEGER, response BYTEA, created_at DOUBLE PRECISION NOT NULL,
            PRIMARY KEY (tenant_id, key)
        )""",
        "CREATE INDEX idempotency_time ON idempotency(created_at)",
        """CREATE TABLE audit (
            id BIGINT PRIMARY KEY, ts DOUBLE PRECISION NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
            target TEXT, details TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL
        )""",
        f"INSERT INTO meta(key, value) VALUES ('audit_head', '{GENESIS_HASH}')",
        "INSERT INTO meta(key, value) VALUES ('audit_count', '0')",
        "INSERT INTO meta(key, value) VALUES ('admin_version', '0')",
    ),
    # 2: a tenant's fair-share weight.
    ("ALTER TABLE tenants ADD COLUMN weight DOUBLE PRECISION NOT NULL DEFAULT 1.0",),
    # 3: the model version that served a request.
    ("ALTER TABLE usage ADD COLUMN model_version TEXT",
     "ALTER TABLE reservations ADD COLUMN model_version TEXT"),
    # 4: global keys: api_keys.tenant_id may be NULL.
    ("ALTER TABLE api_keys ALTER COLUMN tenant_id DROP NOT NULL",),
    # 5: refused requests, counted per tenant, key, status, code and hour.
    (
        """CREATE TABLE refusals (
            tenant_id TEXT NOT NULL, key_id TEXT NOT NULL DEFAULT '', status INTEGER NOT NULL,
            code TEXT NOT NULL DEFAULT '', bucket DOUBLE PRECISION NOT NULL, count BIGINT NOT NULL,
            PRIMARY KEY (tenant_id, key_id, status, code, bucket)
        )""",
        "CREATE INDEX refusals_time ON refusals(bucket)",
    ),
    # 6: the replica that served a request.
    ("ALTER TABLE usage ADD COLUMN replica TEXT",),
    # 7: instances sharing the store: reservation holders, budget books, rate buckets, leases; and
    # the per-request decisions as server-side functions (pg_functions.py).
    SHARED_STATE_MIGRATION + FUNCTIONS,
    SPEND_MIGRATION,
    OUTPUT_SCHEMAS_MIGRATION,  # 9: the same SQL on both (DOUBLE PRECISION and INTEGER)
    POLICIES_MIGRATION,  # 10: the same SQL on both
    SPEC_MIGRATION,  # 11: the same SQL on both (INTEGER)
]

assert len(MIGRATIONS) == SCHEMA_VERSION, "a migration added to schema.py needs its PostgreSQL form here"


def migrate(conn: Any, where: str) -> int:
    """Bring the database to SCHEMA_VERSION under the migration lock; returns the version found.
    `conn`: a psycopg connection in autocommit mode."""
    conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATE_LOCK,))
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS lockgate_schema (version INTEGER NOT NULL)")
        row = conn.execute("SELECT max(version) FROM lockgate_schema").fetchone()
        found = int(row[0] or 0)
        if found > SCHEMA_VERSION:
            raise SchemaError(f"database {where} has schema version {found}, newer than this lockgate knows "
                              f"({SCHEMA_VERSION}); upgrade lockgate or use another database")
        for version in range(found + 1, SCHEMA_VERSION + 1):
            with conn.transaction():  # each migration and its version bump commit together
                for stmt in MIGRATIONS[version - 1]:
                    conn.execute(stmt)
                conn.execute("INSERT INTO lockgate_schema(version) VALUES (%s)", (version,))
        return found
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATE_LOCK,))
