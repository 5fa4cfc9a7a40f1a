"""`SqlStore`: the `Store` in SQL that runs unchanged on SQLite and PostgreSQL.

The subclasses (sqlite.py, postgres.py) own connections, transactions and
migrations; this class owns every statement. Statements use `?` placeholders
(the PostgreSQL connection adapter rewrites them) and only SQL both dialects
share; the few differences are class attributes (`DAY_SQL`, `RES_SELECT`). A subclass provides:
- `_write(admin=False)`: one write transaction; `admin=True` for changes that
  append to the audit chain (PostgreSQL takes a cross-instance advisory lock
  there, so the chain stays linear and tenant names unique across instances);
- `_read()`: one consistent snapshot for several SELECTs;
- `_q(sql, args)`: one autocommitted statement (a cursor).
The statements of several processes sharing limits and budgets are in
shared_ops.py (`shared = True`).
"""
from __future__ import annotations

import json
import secrets
import time
from contextlib import AbstractContextManager
from dataclasses import asdict
from typing import Any

from lockgate.store.alert_ops import AlertOps
from lockgate.store.embedding_ops import EmbeddingOps
from lockgate.store.hourly_ops import HourlyOps
from lockgate.store.audit import (
    ChainHead,
    VerifyResult,
    canonical_json,
    normalize_details,
    record_hash,
    verify_rows,
)
from lockgate.store.base import DuplicateName
from lockgate.store.models import (
    ApiKey,
    AuditRecord,
    IdempotencyRecord,
    Limits,
    Price,
    RefusalCount,
    Reservation,
    Tenant,
    UsageQuery,
    UsageRecord,
    name_key,
)
from lockgate.store import usage_query
from lockgate.store.money import nano
from lockgate.store.schema import GENESIS_HASH
from lockgate.store.schema_ops import SchemaOps
from lockgate.store.shared_ops import SharedOps
from lockgate.store.spend_ops import SpendOps
from lockgate.store.object_spend import ObjectSpendOps

GROUP_BY = usage_query.GROUP_BY
MAX_QUERY_LIMIT = 100_000

TENANT_COLS = ("id, name, models, rpm, tpm, max_concurrency, max_tokens, priority, budget_usd, "
                "budget_period, prices, created_at, updated_at, weight, alert_thresholds, alert_webhook, hedge")
KEY_COLS = ("id, tenant_id, name, prefix, key_hash, scopes, rpm, tpm, max_concurrency, max_tokens, "
             "expires_at, revoked_at, created_at, budget_usd, budget_period, alert_thresholds")
RES_COLS = ("request_id, tenant_id, key_id, model, reserved_usd, prompt_tokens, completion_tokens, "
             "cached_tokens, created_at, updated_at, model_version, instance_id")
USAGE_COLS = ("request_id", "tenant_id", "key_id", "model", "prompt_tokens", "completion_tokens",
               "cached_tokens", "queue_time_s", "ttft_s", "e2e_s", "finish_reason", "status", "cost_usd",
               "created_at", "model_version", "replica", "user_id", "priority_class", "cost_nusd", "cache", "attempts",
               "hedged", "router", "spec_draft_tokens", "spec_accepted_tokens")
AUDIT_COLS = "id, ts, actor, action, target, details, prev_hash, hash"


def _prices_json(prices: dict[str, Price]) -> str:
    return canonical_json({m: asdict(p) for m, p in prices.items()})


def _tenant(row: tuple) -> Tenant:
    prices = {m: Price(**p) for m, p in json.loads(row[10]).items()}
    return Tenant(id=row[0], name=row[1], models=json.loads(row[2]),
                  limits=Limits(rpm=row[3], tpm=row[4], max_concurrency=row[5], max_tokens=row[6]),
                  priority=row[7], budget_usd=row[8], budget_period=row[9], prices=prices,
                  created_at=row[11], updated_at=row[12], weight=row[13],
                  alert_thresholds=json.loads(row[14] or "[]"), alert_webhook=row[15], hedge=bool(row[16]))


def _key(row: tuple) -> ApiKey:
    return ApiKey(id=row[0], tenant_id=row[1], name=row[2], prefix=row[3], key_hash=row[4],
                  scopes=json.loads(row[5]),
                  limits=Limits(rpm=row[6], tpm=row[7], max_concurrency=row[8], max_tokens=row[9]),
                  expires_at=row[10], revoked_at=row[11], created_at=row[12], budget_usd=row[13],
                  budget_period=row[14] or "month", alert_thresholds=json.loads(row[15] or "[]"))


def _reservation(row: tuple) -> Reservation:
    return Reservation(*row)


def _audit(row: tuple) -> AuditRecord:
    return AuditRecord(id=row[0], ts=row[1], actor=row[2], action=row[3], target=row[4],
                       details=json.loads(row[5]), prev_hash=row[6], hash=row[7])



class SqlStore(SharedOps, AlertOps, SpendOps, HourlyOps, ObjectSpendOps, SchemaOps, EmbeddingOps):
    DAY_SQL = "date(created_at, 'unixepoch')"  # a usage row's UTC day, YYYY-MM-DD
    HOUR_TEXT_SQL = "strftime('%Y-%m-%dT%H:00:00Z', created_at, 'unixepoch')"  # its UTC hour, as text
    # The values of a reservation row in `INSERT ... SELECT`: PostgreSQL needs their types spelled.
    RES_SELECT = "SELECT ?,?,?,?,?,?,?,?,?,?,?,?"
    shared = False  # several processes share limits and budgets (shared_ops.py)
    RES_COLS_SQL = RES_COLS
    # A request id already there keeps its first row; ON CONFLICT on the key only, so a malformed row
    # is an error, never silently dropped.
    USAGE_INSERT_SQL = (f"INSERT INTO usage({','.join(USAGE_COLS)}) VALUES ({','.join('?' * len(USAGE_COLS))}) "
                        "ON CONFLICT(request_id) DO NOTHING")

    def _write(self, admin: bool = False, lazy: bool = False) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def _read(self) -> AbstractContextManager[Any]:
        raise NotImplementedError

    def _q(self, sql: str, args: tuple | list = ()) -> Any:
        raise NotImplementedError

    # ------------------------------------------------------------------ audit (inside a write txn)
    def _head(self, conn: Any) -> ChainHead:
        meta = dict(conn.execute("SELECT key, value FROM meta WHERE key IN ('audit_head', 'audit_count')"))
        last = conn.execute("SELECT max(id) FROM audit").fetchone()[0] or 0
        count = int(meta.get("audit_count", last))
        # Append after the larger of what meta and the table say: ids are never reused, so a
        # deleted tail leaves a gap that verify reports.
        return ChainHead(last_id=max(last, count), count=count, hash=meta.get("audit_head", GENESIS_HASH))

    def _append_audit(self, conn: Any, actor: str, action: str, target: str | None,
                      details: dict[str, Any] | None, ts: float | None = None) -> AuditRecord:
        head = self._head(conn)
        rec_id = head.last_id + 1
        ts = time.time() if ts is None else float(ts)
        det = normalize_details(details)
        h = record_hash(head.hash, rec_id, ts, actor, action, target, det)
        conn.execute(f"INSERT INTO audit({AUDIT_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                     (rec_id, ts, actor, action, target, canonical_json(det), head.hash, h))
        conn.execute("UPDATE meta SET value = ? WHERE key = 'audit_head'", (h,))
        conn.execute("UPDATE meta SET value = ? WHERE key = 'audit_count'", (str(head.count + 1),))
        conn.execute("UPDATE meta SET value = CAST(CAST(value AS INTEGER) + 1 AS TEXT) WHERE key = 'admin_version'")
        return AuditRecord(id=rec_id, ts=ts, actor=actor, action=action, target=target, details=det,
                           prev_hash=head.hash, hash=h)

    def append_audit(self, actor: str, action: str, target: str | None, details: dict[str, Any]) -> AuditRecord:
        with self._write(admin=True) as conn:
            return self._append_audit(conn, actor, action, target, details)

    def list_audit(self, since_id: int = 0, limit: int = 1000) -> list[AuditRecord]:
        limit = max(1, min(int(limit), MAX_QUERY_LIMIT))
        rows = self._q(f"SELECT {AUDIT_COLS} FROM audit WHERE id > ? ORDER BY id LIMIT ?",
                                    (int(since_id), limit)).fetchall()
        return [_audit(r) for r in rows]

    def verify_audit_full(self) -> VerifyResult:
        with self._read() as conn:
            meta = dict(conn.execute("SELECT key, value FROM meta WHERE key IN ('audit_head', 'audit_count')"))
            count = meta.get("audit_count")
            rows = conn.execute(f"SELECT {AUDIT_COLS} FROM audit ORDER BY id")
            return verify_rows(rows, meta.get("audit_head"), int(count) if count is not None else None)

    def verify_audit(self) -> tuple[bool, int, int | None]:
        r = self.verify_audit_full()
        return r.ok, r.records, r.first_bad

    def admin_version(self) -> int:
        """Bumped by every admin change (any process): poll it to know when to reload tenants and keys."""
        row = self._q("SELECT value FROM meta WHERE key = 'admin_version'").fetchone()
        return int(row[0]) if row else 0

    def meta_secret(self, name: str) -> bytes:
        """32 random bytes made the first time `name` is asked for, the same ever after (any process).
        Kept in `meta`, which no API shows: only a reader of the database file sees it."""
        key = f"secret:{name}"
        with self._write(admin=True) as conn:
            conn.execute("INSERT INTO meta(key, value) VALUES (?, ?) ON CONFLICT(key) DO NOTHING",
                         (key, secrets.token_hex(32)))
            value = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0]
        return bytes.fromhex(value)

    # ------------------------------------------------------------------ tenants
    @staticmethod
    def _check_name_free(conn: Any, name: str, tenant_id: str) -> None:
        """Inside the write transaction, so two processes cannot both take a name. Names already
        duplicated before this check existed are left as they are; only a new clash is refused."""
        wanted = name_key(name)
        for (other,) in conn.execute("SELECT name FROM tenants WHERE deleted_at IS NULL AND id != ?",
                                     (tenant_id,)):
            if name_key(other) == wanted:
                raise DuplicateName(name)

    def create_tenant(self, tenant: Tenant, actor: str) -> Tenant:
        now = time.time()
        tenant.created_at = tenant.created_at or now
        tenant.updated_at = tenant.updated_at or tenant.created_at
        with self._write(admin=True) as conn:
            self._check_name_free(conn, tenant.name, tenant.id)
            conn.execute(f"INSERT INTO tenants({TENANT_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                         self._tenant_values(tenant))
            self._append_audit(conn, actor, "tenant.create", tenant.id, _tenant_details(tenant))
        return tenant

    @staticmethod
    def _tenant_values(t: Tenant) -> tuple:
        lim = t.limits
        return (t.id, t.name, canonical_json(list(t.models)), lim.rpm, lim.tpm, lim.max_concurrency,
                lim.max_tokens, t.priority, t.budget_usd, t.budget_period, _prices_json(t.prices),
                t.created_at, t.updated_at, t.weight, canonical_json(list(t.alert_thresholds)), t.alert_webhook,
                int(t.hedge))

    def get_tenant(self, tenant_id: str) -> Tenant | None:
        row = self._q(
            f"SELECT {TENANT_COLS} FROM tenants WHERE id = ? AND deleted_at IS NULL", (tenant_id,)).fetchone()
        return _tenant(row) if row else None

    def list_tenants(self) -> list[Tenant]:
        rows = self._q(
            f"SELECT {TENANT_COLS} FROM tenants WHERE deleted_at IS NULL ORDER BY created_at, id").fetchall()
        return [_tenant(r) for r in rows]

    def count_tenants(self) -> int:
        return int(self._q("SELECT count(*) FROM tenants WHERE deleted_at IS NULL").fetchone()[0])

    def update_tenant(self, tenant: Tenant, changes: dict[str, Any], actor: str) -> Tenant:
        """Write `tenant` whole; `changes` (field -> new value) is what the audit record shows."""
        tenant.updated_at = time.time()
        with self._write(admin=True) as conn:
            if "name" in changes:
                self._check_name_free(conn, tenant.name, tenant.id)
            cur = conn.execute(
                "UPDATE tenants SET name=?, models=?, rpm=?, tpm=?, max_concurrency=?, max_tokens=?, "
                "priority=?, budget_usd=?, budget_period=?, prices=?, updated_at=?, weight=?, "
                "alert_thresholds=?, alert_webhook=?, hedge=? WHERE id=? AND deleted_at IS NULL",
                self._tenant_values(tenant)[1:11] + (tenant.updated_at, tenant.weight,
                                                     *self._tenant_values(tenant)[14:], tenant.id))
            if cur.rowcount != 1:
                raise KeyError(tenant.id)
            self._append_audit(conn, actor, "tenant.update", tenant.id, changes)
        return tenant

    def delete_tenant(self, tenant_id: str, actor: str) -> bool:
        """Soft delete (usage rows keep their tenant id); its keys are revoked in the same transaction."""
        now = time.time()
        with self._write(admin=True) as conn:
            cur = conn.execute("UPDATE tenants SET deleted_at = ?, updated_at = ? "
                               "WHERE id = ? AND deleted_at IS NULL", (now, now, tenant_id))
            if cur.rowcount != 1:
                return False
            revoked = [r[0] for r in conn.execute(
                "SELECT id FROM api_keys WHERE tenant_id = ? AND revoked_at IS NULL ORDER BY id", (tenant_id,))]
            conn.execute("UPDATE api_keys SET revoked_at = ? WHERE tenant_id = ? AND revoked_at IS NULL",
                         (now, tenant_id))
            self._append_audit(conn, actor, "tenant.delete", tenant_id, {"revoked_keys": revoked})
        return True

    # ------------------------------------------------------------------ keys
    def create_key(self, key: ApiKey, actor: str) -> ApiKey:
        key.created_at = key.created_at or time.time()
        lim = key.limits
        with self._write(admin=True) as conn:
            if key.tenant_id is not None and conn.execute(
                    "SELECT 1 FROM tenants WHERE id = ? AND deleted_at IS NULL", (key.tenant_id,)).fetchone() is None:
                raise KeyError(key.tenant_id)
            conn.execute(f"INSERT INTO api_keys({KEY_COLS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                         (key.id, key.tenant_id, key.name, key.prefix, key.key_hash,
                          canonical_json(list(key.scopes)), lim.rpm, lim.tpm, lim.max_concurrency,
                          lim.max_tokens, key.expires_at, key.revoked_at, key.created_at, key.budget_usd,
                          key.budget_period, canonical_json(list(key.alert_thresholds))))
            details = {"tenant_id": key.tenant_id, "name": key.name, "prefix": key.prefix,
                       "scopes": list(key.scopes), "limits": asdict(lim), "expires_at": key.expires_at}
            if key.budget_usd is not None or key.alert_thresholds:
                details.update(budget_usd=key.budget_usd, budget_period=key.budget_period,
                               alert_thresholds=list(key.alert_thresholds))
            self._append_audit(conn, actor, "key.create", key.id, details)  # never the key nor its hash
        return key

    def list_keys(self, tenant_id: str | None = None) -> list[ApiKey]:
        if tenant_id is None:
            rows = self._q(f"SELECT {KEY_COLS} FROM api_keys ORDER BY created_at, id").fetchall()
        else:
            rows = self._q(f"SELECT {KEY_COLS} FROM api_keys WHERE tenant_id = ? "
                                        "ORDER BY created_at, id", (tenant_id,)).fetchall()
        return [_key(r) for r in rows]

    def get_key(self, key_id: str) -> ApiKey | None:
        row = self._q(f"SELECT {KEY_COLS} FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        return _key(row) if row else None

    def get_key_by_hash(self, key_hash: str) -> ApiKey | None:
        """The key with this hash, revoked or expired ones included: the caller checks both."""
        row = self._q(f"SELECT {KEY_COLS} FROM api_keys WHERE key_hash = ?",
                                   (key_hash,)).fetchone()
        return _key(row) if row else None

    def update_key(self, key: ApiKey, changes: dict[str, Any], actor: str) -> ApiKey:
        """Write `key`'s changeable fields (name, limits, budget, alert thresholds, expiry); `changes`
        (field -> new value) is what the audit record `key.update` shows (never the key nor its hash).
        KeyError: no such key."""
        lim = key.limits
        with self._write(admin=True) as conn:
            cur = conn.execute(
                "UPDATE api_keys SET name=?, rpm=?, tpm=?, max_concurrency=?, max_tokens=?, budget_usd=?, "
                "budget_period=?, alert_thresholds=?, expires_at=? WHERE id=?",
                (key.name, lim.rpm, lim.tpm, lim.max_concurrency, lim.max_tokens, key.budget_usd, key.budget_period,
                 canonical_json(list(key.alert_thresholds)), key.expires_at, key.id))
            if cur.rowcount != 1:
                raise KeyError(key.id)
            self._append_audit(conn, actor, "key.update", key.id, {"tenant_id": key.tenant_id, "changes": changes})
        return key

    def revoke_key(self, key_id: str, actor: str) -> bool:
        """True: revoked now. False: no such key, or already revoked (nothing changes, nothing audited)."""
        with self._write(admin=True) as conn:
            row = conn.execute("SELECT tenant_id FROM api_keys WHERE id = ? AND revoked_at IS NULL",
                               (key_id,)).fetchone()
            if row is None:
                return False
            conn.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ?", (time.time(), key_id))
            self._append_audit(conn, actor, "key.revoke", key_id, {"tenant_id": row[0]})
        return True

    # ------------------------------------------------------------------ reservations and the ledger
    def _add_reservations(self, conn: Any, reservations: list[Reservation]) -> None:
        now = time.time()
        # A request already settled gets no new hold (a late or repeated add is a no-op).
        conn.executemany(
            f"INSERT INTO reservations({RES_COLS}) {self.RES_SELECT} "
            "WHERE NOT EXISTS (SELECT 1 FROM usage WHERE request_id = ?) "
            "ON CONFLICT(request_id) DO NOTHING",
            [(r.request_id, r.tenant_id, r.key_id, r.model, float(r.reserved_usd), int(r.prompt_tokens),
              int(r.completion_tokens), int(r.cached_tokens), r.created_at or now, r.updated_at or now,
              r.model_version, r.instance_id, r.request_id) for r in reservations])

    def _checkpoint(self, conn: Any, updates: list[tuple[str, int, int]]) -> None:
        if self.shared:
            self._checkpoint_shared(conn, updates)
            return
        now = time.time()
        conn.executemany("UPDATE reservations SET completion_tokens = ?, cached_tokens = ?, updated_at = ? "
                         "WHERE request_id = ?",
                         [(int(c), int(cached), now, rid) for rid, c, cached in updates])

    def _settle(self, conn: Any, records: list[UsageRecord]) -> None:
        if self.shared:  # budget books and token buckets move with the rows (store/shared_ops.py)
            self._settle_shared(conn, records)
            return
        now = time.time()
        conn.executemany(self.USAGE_INSERT_SQL, [self.usage_values(r, now) for r in records])
        conn.executemany("DELETE FROM reservations WHERE request_id = ?", [(r.request_id,) for r in records])

    @staticmethod
    def usage_values(r: UsageRecord, now: float) -> tuple:
        return (r.request_id, r.tenant_id, r.key_id, r.model, int(r.prompt_tokens), int(r.completion_tokens),
                int(r.cached_tokens), r.queue_time_s, r.ttft_s, r.e2e_s, r.finish_reason, int(r.status),
                float(r.cost_usd), r.created_at or now, r.model_version, r.replica, r.user, r.priority_class,
                nano(r.cost_usd), r.cache, r.attempts, int(bool(r.hedged)), r.router, int(r.spec_draft_tokens),
                int(r.spec_accepted_tokens))

    def add_reservations(self, reservations: list[Reservation]) -> None:
        if reservations:
            with self._write() as conn:
                self._add_reservations(conn, reservations)

    def checkpoint_reservations(self, updates: list[tuple[str, int, int]]) -> None:
        if updates:
            with self._write() as conn:
                self._checkpoint(conn, updates)

    def settle(self, records: list[UsageRecord]) -> None:
        """Insert usage rows (a request id already there keeps its first row; ON CONFLICT on the key
        only, so a malformed row is an error, never silently dropped) and drop their reservations."""
        if records:
            with self._write() as conn:
                self._settle(conn, records)

    def write_batch(self, reservations: list[Reservation], checkpoints: list[tuple[str, int, int]],
                    records: list[UsageRecord]) -> None:
        """Group commit: adds, then checkpoints, then settlements, in one transaction."""
        with self._write() as conn:
            if reservations:
                self._add_reservations(conn, reservations)
            if checkpoints:
                self._checkpoint(conn, checkpoints)
            if records:
                self._settle(conn, records)

    def list_reservations(self) -> list[Reservation]:
        rows = self._q(f"SELECT {RES_COLS} FROM reservations ORDER BY created_at").fetchall()
        return [_reservation(r) for r in rows]

    def spent_usd(self, tenant_id: str, since: float | None) -> float:
        if since is None:
            row = self._q("SELECT coalesce(sum(cost_usd), 0) FROM usage WHERE tenant_id = ?",
                                       (tenant_id,)).fetchone()
        else:
            row = self._q("SELECT coalesce(sum(cost_usd), 0) FROM usage WHERE tenant_id = ? "
                                       "AND created_at >= ?", (tenant_id, float(since))).fetchone()
        return float(row[0])

    def query_usage(self, q: UsageQuery) -> list[dict[str, Any]]:
        """Rows newest first (group_by "request"), or totals per group (store/usage_query.py): time
        groups newest first, the others by cost (highest first). ValueError: an unknown group field."""
        fields = usage_query.parse_group_by(q.group_by)
        if not fields:
            cond, args = usage_query.where(q)
            rows = self._q(f"SELECT {','.join(USAGE_COLS)} FROM usage {cond} "
                           "ORDER BY created_at DESC, request_id DESC LIMIT ?",
                           (*args, usage_query.clamp_limit(q.limit)))
            return [dict(zip(USAGE_COLS, r)) for r in rows]
        sql, args = usage_query.grouped_sql(q, fields, usage_query.Dialect(self.DAY_SQL, self.HOUR_TEXT_SQL))
        return usage_query.grouped_rows(fields, list(self._q(sql, args)))

    def usage_totals(self, q: UsageQuery) -> dict[str, Any]:
        """The totals (requests, tokens, exact cost, errors) of every row `q`'s filters select."""
        sql, args = usage_query.totals_sql(q)
        return usage_query.totals(self._q(sql, args).fetchone())

    def usage_timings(self, q: UsageQuery, limit: int) -> list[tuple[float, float | None, int]]:
        """(ttft_s, e2e_s, completion_tokens) of the newest `limit` timed rows `q` selects."""
        sql, args = usage_query.timings_sql(q, limit)
        return [(float(r[0]), None if r[1] is None else float(r[1]), int(r[2])) for r in self._q(sql, args)]

    # ------------------------------------------------------------------ refused requests
    def add_refusals(self, counts: list[RefusalCount]) -> None:
        """Add counts to their (tenant, key, status, code, hour) rows: one row however many arrive."""
        if not counts:
            return
        with self._write() as conn:
            conn.executemany(
                "INSERT INTO refusals(tenant_id, key_id, status, code, bucket, count) VALUES (?,?,?,?,?,?) "
                "ON CONFLICT(tenant_id, key_id, status, code, bucket) DO UPDATE SET count = refusals.count + excluded.count",
                [(c.tenant_id, c.key_id, int(c.status), c.code, float(c.bucket), int(c.count)) for c in counts])

    def query_refusals(self, q: UsageQuery) -> list[dict[str, Any]]:
        """Refusal counts per tenant, key, status, code and hour (newest first); `since`/`until` select
        the hours that start in [since, until)."""
        where, args = [], []
        for col, op, val in (("tenant_id", "=", q.tenant_id), ("bucket", ">=", q.since), ("bucket", "<", q.until)):
            if val is not None:
                where.append(f"{col} {op} ?")
                args.append(val)
        cond = f"WHERE {' AND '.join(where)}" if where else ""
        limit = max(1, min(int(q.limit), MAX_QUERY_LIMIT))
        rows = self._q(
            f"SELECT bucket, tenant_id, key_id, status, code, count FROM refusals {cond} "
            "ORDER BY bucket DESC, tenant_id, key_id, status, code LIMIT ?", (*args, limit))
        return [{"hour": r[0], "tenant_id": r[1], "key_id": r[2] or None, "status": r[3], "code": r[4] or None,
                 "requests": r[5]} for r in rows]

    # ------------------------------------------------------------------ idempotency
    def get_idempotency(self, tenant_id: str, key: str) -> IdempotencyRecord | None:
        row = self._q(
            "SELECT tenant_id, key, body_hash, request_id, status, response, created_at FROM idempotency "
            "WHERE tenant_id = ? AND key = ?", (tenant_id or "", key)).fetchone()
        if row is None:
            return None
        resp = bytes(row[5]) if row[5] is not None else None
        return IdempotencyRecord(row[0], row[1], row[2], row[3], row[4], resp, row[6])

    def put_idempotency(self, rec: IdempotencyRecord) -> bool:
        """Claim (tenant, key) for a request; False if it is already claimed (the caller replays or 409s)."""
        rec.created_at = rec.created_at or time.time()
        with self._write() as conn:
            cur = conn.execute(
                "INSERT INTO idempotency(tenant_id, key, body_hash, request_id, status, response, "
                "created_at) VALUES (?,?,?,?,?,?,?) ON CONFLICT(tenant_id, key) DO NOTHING",
                (rec.tenant_id or "", rec.key, rec.body_hash, rec.request_id, rec.status, rec.response, rec.created_at))
            return cur.rowcount == 1

    def finish_idempotency(self, tenant_id: str, key: str, status: int, response: bytes) -> None:
        with self._write() as conn:
            conn.execute("UPDATE idempotency SET status = ?, response = ? WHERE tenant_id = ? AND key = ?",
                         (int(status), bytes(response), tenant_id or "", key))

    def delete_idempotency(self, tenant_id: str, key: str) -> None:
        """Release a claim whose request never ran (so a retry can run it)."""
        with self._write() as conn:
            conn.execute("DELETE FROM idempotency WHERE tenant_id = ? AND key = ?", (tenant_id or "", key))

    def prune_idempotency(self, older_than: float) -> int:
        """Drop finished records created before `older_than` (Unix seconds); returns how many."""
        with self._write() as conn:
            cur = conn.execute("DELETE FROM idempotency WHERE created_at < ? AND status IS NOT NULL",
                               (float(older_than),))
            return cur.rowcount


def _tenant_details(t: Tenant) -> dict[str, Any]:
    return {"name": t.name, "models": list(t.models), "limits": asdict(t.limits), "priority": t.priority,
            "weight": t.weight, "budget_usd": t.budget_usd, "budget_period": t.budget_period,
            "prices": {m: asdict(p) for m, p in t.prices.items()},
            **({"alert_thresholds": list(t.alert_thresholds), "alert_webhook": t.alert_webhook}
               if t.alert_thresholds or t.alert_webhook else {}), **({"hedge": True} if t.hedge else {})}
