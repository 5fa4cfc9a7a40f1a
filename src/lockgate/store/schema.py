"""The SQLite schema as an ordered list of migrations, tracked in `PRAGMA user_version`.

Migration N (1-based) takes a database from version N-1 to N. Append new
migrations at the end; never edit one that has shipped. Each migration is a
tuple of statements run in one transaction together with the version bump, so a
crash mid-migration leaves the previous version intact.
"""
from __future__ import annotations

import sqlite3

GENESIS_HASH = "0" * 64

SHARED_STATE_MIGRATION: tuple[str, ...] = (
    "ALTER TABLE reservations ADD COLUMN instance_id TEXT",
    "CREATE INDEX reservations_tenant ON reservations(tenant_id)",
    "CREATE INDEX reservations_key ON reservations(key_id)",
    "CREATE INDEX reservations_instance ON reservations(instance_id)",
    """CREATE TABLE budget_books (
        tenant_id TEXT PRIMARY KEY,
        period TEXT NOT NULL,              -- '' until first computed
        period_start DOUBLE PRECISION,     -- NULL: all time
        spent DOUBLE PRECISION NOT NULL    -- settled cost of usage rows created in the period
    )""",
    """CREATE TABLE limit_buckets (
        scope TEXT NOT NULL,               -- 't:<tenant id>' or 'k:<key id>'
        kind TEXT NOT NULL,                -- 'req' (rpm) or 'tok' (tpm)
        capacity DOUBLE PRECISION NOT NULL,
        level DOUBLE PRECISION NOT NULL,
        updated DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (scope, kind)
    )""",
    """CREATE TABLE instances (
        id TEXT PRIMARY KEY,
        host TEXT NOT NULL,
        pid INTEGER NOT NULL,
        started_at DOUBLE PRECISION NOT NULL,
        renewed_at DOUBLE PRECISION NOT NULL
    )""",
)

# 8: spend: exact money (integer nano-USD, store/money.py) per usage row with its end user and class,
# budgets and alert thresholds per key, alert thresholds and receiver per tenant, the alert outbox
# (one row per alert however many instances raise it; one delivery row per receiver).
SPEND_MIGRATION: tuple[str, ...] = (
    "ALTER TABLE usage ADD COLUMN user_id TEXT",
    "ALTER TABLE usage ADD COLUMN priority_class TEXT",
    "ALTER TABLE usage ADD COLUMN cost_nusd INTEGER NOT NULL DEFAULT 0",
    "UPDATE usage SET cost_nusd = CAST(round(cost_usd * 1000000000) AS INTEGER)",
    "CREATE INDEX usage_key_time ON usage(key_id, created_at)",
    "ALTER TABLE api_keys ADD COLUMN budget_usd REAL",
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
        created_at REAL NOT NULL
    )""",
    "CREATE INDEX alerts_time ON alerts(created_at)",
    """CREATE TABLE alert_deliveries (
        alert_id TEXT NOT NULL REFERENCES alerts(id),
        url TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        claimed_until REAL,              -- a sender holds it until then; another takes it over after
        delivered_at REAL,
        failed_at REAL,                 -- given up (refused address, too many attempts, too old)
        last_error TEXT,
        PRIMARY KEY (alert_id, url)
    )""",
    "CREATE INDEX alert_deliveries_due ON alert_deliveries(delivered_at, next_attempt_at)",
)

# 9: versioned output schemas (store/schema_ops.py): one row per (namespace, name, version), never
# changed once written; namespace '' is the global one, else the tenant id that owns it.
OUTPUT_SCHEMAS_MIGRATION: tuple[str, ...] = (
    """CREATE TABLE output_schemas (
        namespace TEXT NOT NULL,           -- '' (global) or the owning tenant's id
        name TEXT NOT NULL,
        version INTEGER NOT NULL,          -- 1, 2, ... decided inside the registering transaction
        schema TEXT NOT NULL,              -- compact JSON text
        created_at DOUBLE PRECISION NOT NULL,
        created_by TEXT NOT NULL,          -- the actor (key id or 'admin')
        forced INTEGER NOT NULL DEFAULT 0, -- 1: registered over breaking differences (force)
        PRIMARY KEY (namespace, name, version)
    )""",
)

# 10: gateway policies (issue 27): per usage row, a response-cache hit ('hit'), the attempts a
# fallback made before the model that served (JSON list), whether a hedge copy was sent, and the router
# (NAME/RULE) that chose the model; the embedding cache shared by every API process of a server.
POLICIES_MIGRATION: tuple[str, ...] = (
    "ALTER TABLE usage ADD COLUMN cache TEXT",
    "ALTER TABLE usage ADD COLUMN attempts TEXT",
    "ALTER TABLE usage ADD COLUMN hedged INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE usage ADD COLUMN router TEXT",
    "ALTER TABLE tenants ADD COLUMN hedge INTEGER NOT NULL DEFAULT 0",  # opted in to hedged requests
    """CREATE TABLE embedding_cache (
        tenant_id TEXT NOT NULL,           -- '' in open mode; never shared across tenants
        key TEXT NOT NULL,                 -- SHA-256 of (model version, input, dimensions)
        vector TEXT NOT NULL,              -- base64 of little-endian float32
        nbytes INTEGER NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL,
        used_at DOUBLE PRECISION NOT NULL,
        PRIMARY KEY (tenant_id, key)
    )""",
    "CREATE INDEX embedding_cache_used ON embedding_cache(used_at)",
)

# 11: speculative decoding per usage row: the tokens the engine's drafter proposed for the request and
# the tokens verification accepted, summed over its engine requests (0: it did not speculate).
SPEC_MIGRATION: tuple[str, ...] = (
    "ALTER TABLE usage ADD COLUMN spec_draft_tokens INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE usage ADD COLUMN spec_accepted_tokens INTEGER NOT NULL DEFAULT 0",
)

MIGRATIONS: list[tuple[str, ...]] = [
    # 1: tenants, keys, reservations, the usage ledger, idempotency, the audit chain.
    (
        """CREATE TABLE meta (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL
        )""",
        """CREATE TABLE tenants (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            models TEXT NOT NULL,             -- JSON list
            rpm INTEGER, tpm INTEGER, max_concurrency INTEGER, max_tokens INTEGER,
            priority TEXT NOT NULL,
            budget_usd REAL,
            budget_period TEXT NOT NULL,
            prices TEXT NOT NULL,             -- JSON {model: {prompt, completion, cached_prompt}}
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL,
            deleted_at REAL                   -- soft delete: usage rows keep their tenant
        )""",
        """CREATE TABLE api_keys (
            id TEXT PRIMARY KEY,
            tenant_id TEXT NOT NULL REFERENCES tenants(id),
            name TEXT NOT NULL,
            prefix TEXT NOT NULL,
            key_hash TEXT NOT NULL UNIQUE,    -- hex SHA-256; the key itself is never stored
            scopes TEXT NOT NULL,             -- JSON list
            rpm INTEGER, tpm INTEGER, max_concurrency INTEGER, max_tokens INTEGER,
            expires_at REAL,
            revoked_at REAL,
            created_at REAL NOT NULL
        )""",
        "CREATE INDEX api_keys_tenant ON api_keys(tenant_id)",
        """CREATE TABLE reservations (
            request_id TEXT PRIMARY KEY,
            tenant_id TEXT NOT NULL,
            key_id TEXT,
            model TEXT NOT NULL,
            reserved_usd REAL NOT NULL,
            prompt_tokens INTEGER NOT NULL,
            completion_tokens INTEGER NOT NULL DEFAULT 0,
            cached_tokens INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL,
            updated_at REAL NOT NULL
        )""",
        """CREATE TABLE usage (
            request_id TEXT PRIMARY KEY,      -- exactly once: ON CONFLICT DO NOTHING
            tenant_id TEXT,
            key_id TEXT,
            model TEXT NOT NULL,
            prompt_tokens INTEGER NOT NULL,
            completion_tokens INTEGER NOT NULL,
            cached_tokens INTEGER NOT NULL,
            queue_time_s REAL,
            ttft_s REAL,
            e2e_s REAL,
            finish_reason TEXT NOT NULL,
            status INTEGER NOT NULL,
            cost_usd REAL NOT NULL,
            created_at REAL NOT NULL
        )""",
        "CREATE INDEX usage_tenant_time ON usage(tenant_id, created_at)",
        "CREATE INDEX usage_model ON usage(model)",
        "CREATE INDEX usage_time ON usage(created_at)",
        """CREATE TABLE idempotency (
            tenant_id TEXT NOT NULL,
            key TEXT NOT NULL,
            body_hash TEXT NOT NULL,
            request_id TEXT NOT NULL,
            status INTEGER,
            response BLOB,
            created_at REAL NOT NULL,
            PRIMARY KEY (tenant_id, key)
        )""",
        "CREATE INDEX idempotency_time ON idempotency(created_at)",
        """CREATE TABLE audit (
            id INTEGER PRIMARY KEY,           -- 1, 2, ... never reused
            ts REAL NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            target TEXT,
            details TEXT NOT NULL,            -- canonical JSON
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL
        )""",
        # The chain's head, updated with every append: deleting the newest rows shows.
        f"INSERT INTO meta(key, value) VALUES ('audit_head', '{GENESIS_HASH}')",
        "INSERT INTO meta(key, value) VALUES ('audit_count', '0')",
        "INSERT INTO meta(key, value) VALUES ('admin_version', '0')",
    ),
    # 2: a tenant's fair-share weight (the engine's virtual token counters divide by it).
    ("ALTER TABLE tenants ADD COLUMN weight REAL NOT NULL DEFAULT 1.0",),
    # 3: the model version that served a request (lifecycle/: several versions of a model at once).
    ("ALTER TABLE usage ADD COLUMN model_version TEXT",
     "ALTER TABLE reservations ADD COLUMN model_version TEXT"),
    # 4: global keys (admin or metrics scope, bound to no tenant): api_keys.tenant_id may be NULL.
    # SQLite cannot drop NOT NULL in place: the table is rebuilt (nothing references api_keys).
    (
        """CREATE TABLE api_keys_v4 (
            id TEXT PRIMARY KEY,
            tenant_id TEXT REFERENCES tenants(id),  -- NULL: a global key
            name TEXT NOT NULL,
            prefix TEXT NOT NULL,
            key_hash TEXT NOT NULL UNIQUE,
            scopes TEXT NOT NULL,
            rpm INTEGER, tpm INTEGER, max_concurrency INTEGER, max_tokens INTEGER,
            expires_at REAL,
            revoked_at REAL,
            created_at REAL NOT NULL
        )""",
        "INSERT INTO api_keys_v4 SELECT id, tenant_id, name, prefix, key_hash, scopes, rpm, tpm, max_concurrency, "
        "max_tokens, expires_at, revoked_at, created_at FROM api_keys",
        "DROP TABLE api_keys",
        "ALTER TABLE api_keys_v4 RENAME TO api_keys",
        "CREATE INDEX api_keys_tenant ON api_keys(tenant_id)",
    ),
    # 5: refused requests (never admitted: nothing reserved, nothing generated), counted per tenant, key,
    # HTTP status, error code and hour instead of one ledger row each: a tenant's refusals add at most
    # one row per (key, status, code) an hour however many it sends.
    (
        """CREATE TABLE refusals (
            tenant_id TEXT NOT NULL,
            key_id TEXT NOT NULL DEFAULT '',   -- '' for a request with no key id
            status INTEGER NOT NULL,           -- the HTTP status answered (0: the client left first)
            code TEXT NOT NULL DEFAULT '',     -- the OpenAI error code answered
            bucket REAL NOT NULL,              -- the hour's start (Unix seconds, UTC)
            count INTEGER NOT NULL,
            PRIMARY KEY (tenant_id, key_id, status, code, bucket)
        )""",
        "CREATE INDEX refusals_time ON refusals(bucket)",
    ),
    # 6: the replica that served a request (NAME@VERSION/INDEX; lifecycle/fleet.py).
    ("ALTER TABLE usage ADD COLUMN replica TEXT",),
    # 7: several processes or instances on one store (store/shared_ops.py): which instance holds a
    # reservation (a dead one's are swept), each tenant's spend in its budget period, the rpm/tpm
    # token buckets of tenants and keys, and the instances' leases.
    SHARED_STATE_MIGRATION,
    SPEND_MIGRATION,
    OUTPUT_SCHEMAS_MIGRATION,
    POLICIES_MIGRATION,
    SPEC_MIGRATION,
]

SCHEMA_VERSION = len(MIGRATIONS)


class SchemaError(RuntimeError):
    """The database cannot be used by this code (e.g. written by a newer lockgate)."""


def user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def migrate(conn: sqlite3.Connection, path: str = "") -> int:
    """Bring the database to SCHEMA_VERSION; returns the version found before.

    `conn` must be in autocommit mode (isolation_level=None). Safe against another
    process migrating at the same time: the version is re-read under the write lock.
    """
    found = user_version(conn)
    if found > SCHEMA_VERSION:
        raise SchemaError(
            f"database {path or '(memory)'} has schema version {found}, newer than this lockgate "
            f"knows ({SCHEMA_VERSION}); upgrade lockgate or use another --data-dir")
    if found == SCHEMA_VERSION:
        return found
    conn.execute("BEGIN IMMEDIATE")
    try:
        current = user_version(conn)
        if current > SCHEMA_VERSION:
            raise SchemaError(f"database {path} has schema version {current}, newer than {SCHEMA_VERSION}")
        for version in range(current + 1, SCHEMA_VERSION + 1):
            for stmt in MIGRATIONS[version - 1]:
                conn.execute(stmt)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return found
