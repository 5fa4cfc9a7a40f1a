"""`PostgresStore`: the `Store` on PostgreSQL, for several API processes and gateway instances.

`--store postgresql://USER@HOST[:PORT]/DB[?sslmode=...&pool_size=N]`, or the same
in `$LOCKGATE_STORE_URL` so a password stays out of the process list. Every
statement is SqlStore's (sql.py, shared_ops.py); this module owns connections,
transactions and migrations.

- Driver: psycopg 3, synchronous, on our own small pool (pg_pool.py: it fails
  fast while the database is down and recovers on the next request). The server
  calls the store from threads (store/writer.py: the group-committing writer for settlements,
  a small pool for the per-request limit and budget statements), where a round
  trip releases the GIL; the CLI and tests call it directly. The same class
  serves both, so there is one code path to trust for the ledger. Statements
  are prepared by the server after a few uses (psycopg's prepare threshold).
- Transactions: autocommit connections with explicit BEGIN/COMMIT, as the
  SQLite store. Admin changes take an advisory transaction lock (`ADMIN_LOCK`):
  the audit chain is appended by one transaction at a time across instances,
  and two instances cannot both give a new tenant the same name.
- Failure: a connection that breaks is closed and replaced on the next use;
  while the database is down every call raises `StoreUnavailable` at once (the
  server answers 503 `store_unavailable`), and service resumes by itself on
  the first request after it is back.
- The password never appears in a message: errors name user, host, port and
  database only.
"""
from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

from lockgate.store.pg_pool import PgPool, first_line
from lockgate.store.pg_schema import ADMIN_LOCK, migrate
from lockgate.store.schema import SchemaError
from lockgate.store.shared_ops import AdmitRequest, Charge, Refusal
from lockgate.store.sql import SqlStore
from lockgate.store.store_error import StoreError, StoreUnavailable

log = logging.getLogger("lockgate.store")

STORE_URL_ENV = "LOCKGATE_STORE_URL"
DEFAULT_POOL_SIZE = 8
SCHEMES = ("postgresql", "postgres")


def is_store_url(value: str | None) -> bool:
    return bool(value) and urlsplit(str(value)).scheme in SCHEMES


def describe(url: str) -> str:
    """USER@HOST:PORT/DB of a store URL: safe to log (no password, no query)."""
    u = urlsplit(url)
    user = f"{u.username}@" if u.username else ""
    port = f":{u.port}" if u.port else ""
    return f"postgresql://{user}{u.hostname or 'localhost'}{port}{u.path or '/'}"


def split_url(url: str) -> tuple[str, int]:
    """The libpq connection string without lockgate's own `pool_size` parameter, and the pool size."""
    u = urlsplit(url)
    if u.scheme not in SCHEMES:
        raise StoreError(f"a store URL starts with postgresql://, not {u.scheme or '(nothing)'}://")
    query = parse_qsl(u.query, keep_blank_values=True)
    size = DEFAULT_POOL_SIZE
    rest = []
    for k, v in query:
        if k == "pool_size":
            try:
                size = int(v)
            except ValueError:
                raise StoreError(f"pool_size must be a whole number, not {v!r}") from None
            if not 1 <= size <= 256:
                raise StoreError(f"pool_size must be between 1 and 256, not {size}")
        else:
            rest.append((k, v))
    return urlunsplit((u.scheme, u.netloc, u.path, urlencode(rest, quote_via=quote), u.fragment)), size


@functools.lru_cache(maxsize=512)
def _pg_sql(sql: str) -> str:
    """SqlStore's `?` placeholders as psycopg's `%s` (a literal `%` doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")


class _Conn:
    """A psycopg connection that speaks SqlStore's dialect (`?` placeholders)."""

    __slots__ = ("c",)

    def __init__(self, c: Any) -> None:
        self.c = c

    def execute(self, sql: str, args: tuple | list = ()) -> Any:
        return self.c.execute(_pg_sql(sql), args)

    def executemany(self, sql: str, rows: list) -> Any:
        cur = self.c.cursor()
        cur.executemany(_pg_sql(sql), rows)
        return cur


class PostgresStore(SqlStore):
    DAY_SQL = "to_char(to_timestamp(created_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD')"
    HOUR_TEXT_SQL = "to_char(to_timestamp(created_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:00:00\"Z\"')"
    HOUR_SQL = "CAST(floor(created_at / 3600) AS BIGINT)"  # hourly_ops.py (SQLite's CAST rounds on PG)
    RES_SELECT = ("SELECT ?::text, ?::text, ?::text, ?::text, ?::float8, ?::bigint, ?::bigint, ?::bigint, "
                  "?::float8, ?::float8, ?::text, ?::text")
    shared = True  # always several possible writers: limits and budgets are decided here

    def __init__(self, url: str | None = None, *, pool_size: int | None = None, timeout_s: float = 5.0,
                 connect_timeout_s: float = 5.0) -> None:
        import psycopg  # noqa: F401 - fail here, clearly, when the driver is missing

        url = url or os.environ.get(STORE_URL_ENV)
        if not url:
            raise StoreError(f"no store URL: pass --store postgresql://... or set {STORE_URL_ENV}")
        self.where = describe(url)
        conninfo, size = split_url(url)
        self.pool_size = pool_size or size
        self.pool = PgPool(conninfo, self.where, size=self.pool_size, timeout_s=timeout_s,
                           connect_timeout_s=connect_timeout_s)
        # Rate buckets and admission holds commit without waiting for the WAL's fsync (see `_write`'s
        # `lazy`): connections of their own, with synchronous_commit off for the session.
        self.lazy_pool = PgPool(_with_options(conninfo, "-c synchronous_commit=off"), self.where,
                                size=self.pool_size, timeout_s=timeout_s, connect_timeout_s=connect_timeout_s)
        try:
            with self.pool.connection() as (c, _):
                migrate(c, self.where)
        except SchemaError:
            self.pool.close()
            raise
        except StoreUnavailable as e:
            self.pool.close()
            raise StoreError(f"cannot connect to {self.where}: {str(e).split(': ', 1)[-1]}") from None
        except Exception as e:  # noqa: BLE001
            self.pool.close()
            raise StoreError(f"cannot use {self.where} as a lockgate database: {first_line(e)}") from None

    # ------------------------------------------------------------------ connections
    @contextmanager
    def _write(self, admin: bool = False, lazy: bool = False) -> Iterator[_Conn]:
        """`lazy`: the commit returns before the WAL reaches disk (synchronous_commit off; PostgreSQL
        flushes it within 200 ms). For rate buckets and admission holds only: a database crash may
        forget the last instant of them, never a ledger row (settlements commit durably), while the
        tenant's book row lock is no longer held through an fsync (4x the admissions per second)."""
        begin = "BEGIN; SET LOCAL synchronous_commit TO off" if lazy else "BEGIN"
        with self.pool.connection(begin) as (c, _):
            try:
                if admin:
                    c.execute("SELECT pg_advisory_xact_lock(%s)", (ADMIN_LOCK,))
                yield _Conn(c)
            except BaseException:
                try:
                    c.execute("ROLLBACK")
                except Exception:  # noqa: BLE001 - a broken connection: the pool closes it
                    pass
                raise
            c.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[_Conn]:
        with self.pool.connection("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY") as (c, _):
            try:
                yield _Conn(c)
            finally:
                try:
                    c.execute("COMMIT")
                except Exception:  # noqa: BLE001
                    pass

    def _q(self, sql: str, args: tuple | list = ()) -> Any:
        """One read; its rows are fetched before the connection goes back to the pool."""
        with self.pool.connection(_pg_sql(sql), args) as (_, cur):
            return _Rows(cur.fetchall() if cur.description is not None else [], cur.rowcount)

    def close(self) -> None:
        self.pool.close()
        self.lazy_pool.close()

    # ------------------------------------------------------------------ per request (pg_functions.py)
    def charge_requests(self, scopes: list[tuple[str, int]], now: float | None = None) -> Charge:
        now = time.time() if now is None else now
        ordered = sorted(scopes)
        with self.lazy_pool.connection(
                "SELECT o_scope, o_wait, o_levels FROM lockgate_take('req', %s, %s, 1, %s, true)",
                ([s for s, _ in ordered], [float(c) for _, c in ordered], now)) as (_, cur):
            scope, wait, levels = cur.fetchone()
        out = {s: (float(c), float(lv)) for (s, c), lv in zip(ordered, levels or [])}
        return Charge(Refusal("rpm", scope, wait_s=float(wait)) if scope is not None else None, out)

    def admit(self, req: AdmitRequest, now: float | None = None) -> Refusal | None:
        now = time.time() if now is None else now
        r = req.reservation
        tpm = sorted(req.tpm)
        with self.lazy_pool.connection(
                "SELECT o_kind, o_scope, o_wait, o_inflight, o_left FROM lockgate_admit("
                "%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (r.request_id, r.tenant_id, r.key_id, r.model, float(r.reserved_usd), int(r.prompt_tokens),
                 r.created_at or now, r.model_version, r.instance_id, req.budget_usd, req.period,
                 req.period_start, req.tenant_concurrency, req.key_concurrency, [s for s, _ in tpm],
                 [float(c) for _, c in tpm], now)) as (_, cur):
            kind, scope, wait, inflight, left = cur.fetchone()
        if kind is None:
            return None
        return Refusal(kind, scope, wait_s=float(wait or 0.0), inflight=int(inflight or 0), left_usd=float(left or 0.0))

    def schema_version(self) -> int:
        return int(self._q("SELECT max(version) FROM lockgate_schema").fetchone()[0])

    def ping(self) -> None:
        """StoreUnavailable unless the database answers now."""
        self._q("SELECT 1")


def _with_options(conninfo: str, option: str) -> str:
    """The URL with a server option added to libpq's `options` parameter."""
    u = urlsplit(conninfo)
    query = parse_qsl(u.query, keep_blank_values=True)
    opts = " ".join([v for k, v in query if k == "options"] + [option])
    rest = [(k, v) for k, v in query if k != "options"] + [("options", opts)]
    return urlunsplit((u.scheme, u.netloc, u.path, urlencode(rest, quote_via=quote), u.fragment))


class _Rows:
    """A fetched result that reads like a cursor (fetchone, fetchall, iteration, rowcount)."""

    __slots__ = ("rows", "rowcount", "_i")

    def __init__(self, rows: list, rowcount: int) -> None:
        self.rows, self.rowcount, self._i = rows, rowcount, 0

    def fetchone(self) -> Any:
        if self._i >= len(self.rows):
            return None
        self._i += 1
        return self.rows[self._i - 1]

    def fetchall(self) -> list:
        out, self._i = self.rows[self._i:], len(self.rows)
        return out

    def __iter__(self) -> Iterator[Any]:
        return iter(self.fetchall())
