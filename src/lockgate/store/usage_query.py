"""The usage ledger read back: filters, group-by fields and totals as SQL that SQLite and PostgreSQL both run.

Money is summed as the integer `cost_nusd` column (store/money.py), so every total
is exact; `cost_usd` in a result is that integer as a USD number. The only
dialect differences are the UTC day and hour of a row (`Dialect`, from the
store's `DAY_SQL` / `HOUR_TEXT_SQL`). Statements use `?` placeholders like the rest
of SqlStore; every value a caller gives is a bound parameter, never SQL text.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lockgate.store.models import FINISH_REASONS, UsageQuery
from lockgate.store.money import usd

MAX_QUERY_LIMIT = 100_000
# A request that failed on our side: the engine or a replica broke, or the server answered 5xx.
ERROR_SQL = "(finish_reason IN ('error', 'interrupted') OR status >= 500)"
# NAME@VERSION (just NAME for rows written before model versions existed).
VERSION_SQL = "CASE WHEN model_version IS NULL THEN model ELSE model || '@' || model_version END"
TIME_FIELDS = ("day", "hour")
GROUP_FIELDS = ("tenant", "key", "model", "version", "class", "user", "day", "hour", "outcome")
GROUP_BY = ("request", *GROUP_FIELDS)  # "request": the rows themselves, newest first
OUTCOMES = (*FINISH_REASONS, "ok", "error")
TOTAL_COLUMNS = ("requests", "prompt_tokens", "completion_tokens", "cached_tokens", "cost_usd", "cost_nusd",
                 "errors")
_COLUMNS = {"tenant": "tenant_id", "key": "key_id", "model": "model", "version": VERSION_SQL,
            "class": "priority_class", "user": "user_id", "outcome": "finish_reason"}
_TOTALS_SQL = ("count(*), coalesce(sum(prompt_tokens), 0), coalesce(sum(completion_tokens), 0), "
               "coalesce(sum(cached_tokens), 0), coalesce(sum(cost_nusd), 0), "
               f"coalesce(sum(CASE WHEN {ERROR_SQL} THEN 1 ELSE 0 END), 0)")


@dataclass(frozen=True, slots=True)
class Dialect:
    day_sql: str  # a row's UTC day, YYYY-MM-DD
    hour_sql: str  # a row's UTC hour, YYYY-MM-DDTHH:00:00Z


def parse_group_by(text: str | None) -> tuple[str, ...]:
    """"request" (or nothing) -> (); "tenant,model" -> ("tenant", "model"). ValueError says what is wrong."""
    text = (text or "request").strip()
    if text == "request":
        return ()
    fields = tuple(f.strip() for f in text.split(","))
    for f in fields:
        if f not in GROUP_FIELDS:
            shown = repr(f[:40]) if f else "an empty field"
            raise ValueError(f"unknown field {shown}: must be request, or one or more of "
                             f"{', '.join(GROUP_FIELDS)} separated by commas")
    dupes = sorted({f for f in fields if fields.count(f) > 1})
    if dupes:
        raise ValueError(f"{', '.join(dupes)} given more than once")
    return fields


def split_version(version: str) -> tuple[str | None, str]:
    """NAME@VERSION -> (NAME, VERSION); a bare VERSION -> (None, VERSION): that version of any model."""
    name, at, ver = version.rpartition("@")
    return (name, ver) if at and name else (None, version.lstrip("@"))


def where(q: UsageQuery) -> tuple[str, list[Any]]:
    """The WHERE clause (or "") of a query's filters, and its arguments."""
    conds: list[str] = []
    args: list[Any] = []
    for col, op, val in (("tenant_id", "=", q.tenant_id), ("key_id", "=", q.key_id), ("model", "=", q.model),
                         ("user_id", "=", q.user), ("created_at", ">=", q.since), ("created_at", "<", q.until)):
        if val is not None:
            conds.append(f"{col} {op} ?")
            args.append(val)
    if q.version is not None:
        name, ver = split_version(q.version)
        conds.append("model_version = ?")
        args.append(ver)
        if name is not None:
            conds.append("model = ?")
            args.append(name)
    if q.outcome == "error":
        conds.append(ERROR_SQL)
    elif q.outcome == "ok":
        conds.append(f"NOT {ERROR_SQL}")
    elif q.outcome is not None:
        conds.append("finish_reason = ?")
        args.append(q.outcome)
    return (f"WHERE {' AND '.join(conds)}" if conds else ""), args


def clamp_limit(limit: int) -> int:
    return max(1, min(int(limit), MAX_QUERY_LIMIT))


def _column(field: str, dialect: Dialect) -> str:
    if field == "day":
        return dialect.day_sql
    if field == "hour":
        return dialect.hour_sql
    return _COLUMNS[field]


def grouped_sql(q: UsageQuery, fields: tuple[str, ...], dialect: Dialect) -> tuple[str, list[Any]]:
    """Totals per group. Order: time fields newest first, then cost (highest first), then the other
    fields ascending with NULL last (the same on both backends)."""
    cond, args = where(q)
    n = len(fields)
    cols = ", ".join(_column(f, dialect) for f in fields)
    positions = {f: i + 1 for i, f in enumerate(fields)}
    order = [f"{positions[f]} DESC" for f in fields if f in TIME_FIELDS]
    order.append(f"{n + 5} DESC")  # cost_nusd
    for f in fields:
        if f not in TIME_FIELDS:
            p = positions[f]
            order.append(f"CASE WHEN {_column(f, dialect)} IS NULL THEN 1 ELSE 0 END, {p}")
    sql = (f"SELECT {cols}, {_TOTALS_SQL} FROM usage {cond} GROUP BY {', '.join(str(i + 1) for i in range(n))} "
           f"ORDER BY {', '.join(order)} LIMIT ?")
    return sql, [*args, clamp_limit(q.limit)]


def totals_sql(q: UsageQuery) -> tuple[str, list[Any]]:
    """One row: the totals of every row the filters select (no limit)."""
    cond, args = where(q)
    return f"SELECT {_TOTALS_SQL} FROM usage {cond}", args


def timings_sql(q: UsageQuery, limit: int) -> tuple[str, list[Any]]:
    """The newest `limit` rows' (ttft_s, e2e_s, completion_tokens), for latency percentiles."""
    cond, args = where(q)
    cond = f"{cond} AND ttft_s IS NOT NULL" if cond else "WHERE ttft_s IS NOT NULL"
    return (f"SELECT ttft_s, e2e_s, completion_tokens FROM usage {cond} "
            "ORDER BY created_at DESC, request_id DESC LIMIT ?", [*args, max(1, int(limit))])


def totals(row: tuple | list) -> dict[str, Any]:
    """A `_TOTALS_SQL` tuple as a dict (PostgreSQL sums come back as Decimal: made exact ints)."""
    requests, prompt, completion, cached, nusd, errors = (int(v or 0) for v in row)
    return {"requests": requests, "prompt_tokens": prompt, "completion_tokens": completion,
            "cached_tokens": cached, "cost_usd": usd(nusd), "cost_nusd": nusd, "errors": errors}


def grouped_rows(fields: tuple[str, ...], rows: list[tuple]) -> list[dict[str, Any]]:
    n = len(fields)
    return [{**dict(zip(fields, r[:n])), **totals(r[n:])} for r in rows]
