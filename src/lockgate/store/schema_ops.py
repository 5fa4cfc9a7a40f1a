"""Versioned output schemas: `SchemaOps`, mixed into `SqlStore` (the same `_write`/`_q`/`_append_audit`).

A version is written once and never changed. The next version number is read and written inside
the admin write transaction (SQLite's write lock, PostgreSQL's advisory admin lock), so two
instances registering the same name at once get consecutive versions, never the same one; the
compatibility check against the previous version runs inside that transaction too (the caller's
`check`), so it always compares with the version actually before the new one.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

SCHEMA_COLS = "namespace, name, version, schema, created_at, created_by, forced"


@dataclass(slots=True)
class OutputSchema:
    namespace: str  # '' for the global namespace, else the owning tenant's id
    name: str
    version: int
    schema: str  # compact JSON text
    created_at: float
    created_by: str
    forced: bool = False


@dataclass(slots=True)
class SchemaSummary:
    """A name and its newest version (the listing)."""

    namespace: str
    name: str
    latest: int
    versions: int
    updated_at: float


@dataclass(slots=True)
class SchemaConflict(Exception):
    """The new version breaks the previous one (and `force` was not given): nothing was written.
    `differences`: every difference found, each with `breaking` true or false."""

    previous: int
    differences: list[dict[str, Any]] = field(default_factory=list)


def _row(r: tuple) -> OutputSchema:
    return OutputSchema(namespace=r[0], name=r[1], version=int(r[2]), schema=r[3], created_at=float(r[4]),
                        created_by=r[5], forced=bool(r[6]))


# `check(previous_schema_text)` -> the differences from it, each a dict with a `breaking` flag.
CompatCheck = Callable[[str], list[dict[str, Any]]]


class SchemaOps:
    def _write(self, admin: bool = False, lazy: bool = False) -> Any:
        raise NotImplementedError

    def _q(self, sql: str, args: tuple | list = ()) -> Any:
        raise NotImplementedError

    def _append_audit(self, conn: Any, actor: str, action: str, target: str | None,
                      details: dict[str, Any] | None, ts: float | None = None) -> Any:
        raise NotImplementedError

    def register_schema(self, namespace: str, name: str, schema: str, actor: str, check: CompatCheck,
                        force: bool = False) -> tuple[OutputSchema, list[dict[str, Any]]]:
        """Write the next version of `namespace/name` and its audit record (`schema.register`) in one
        admin transaction (with every difference from the previous version); returns it and those
        differences. Raises `SchemaConflict` (nothing written) when one of them is breaking and
        `force` is false."""
        now = time.time()
        with self._write(admin=True) as conn:
            prev = conn.execute(
                f"SELECT {SCHEMA_COLS} FROM output_schemas WHERE namespace = ? AND name = ? "
                "ORDER BY version DESC LIMIT 1", (namespace, name)).fetchone()
            differences: list[dict[str, Any]] = []
            version = 1
            if prev is not None:
                version = int(prev[2]) + 1
                differences = check(prev[3])
                if any(d.get("breaking") for d in differences) and not force:
                    raise SchemaConflict(int(prev[2]), differences)
            forced = any(d.get("breaking") for d in differences)
            row = OutputSchema(namespace, name, version, schema, now, actor, forced)
            conn.execute(f"INSERT INTO output_schemas({SCHEMA_COLS}) VALUES (?,?,?,?,?,?,?)",
                         (namespace, name, version, schema, now, actor, int(row.forced)))
            details: dict[str, Any] = {"namespace": namespace, "name": name, "version": version,
                                       "previous": version - 1 if prev is not None else None,
                                       "forced": row.forced, "differences": differences}
            self._append_audit(conn, actor, "schema.register", f"{name}@{version}", details, ts=now)
        return row, differences

    def get_schema(self, namespace: str, name: str, version: int | None = None) -> OutputSchema | None:
        """One version (None: the newest) of a name in one namespace."""
        if version is None:
            r = self._q(f"SELECT {SCHEMA_COLS} FROM output_schemas WHERE namespace = ? AND name = ? "
                        "ORDER BY version DESC LIMIT 1", (namespace, name)).fetchone()
        else:
            r = self._q(f"SELECT {SCHEMA_COLS} FROM output_schemas WHERE namespace = ? AND name = ? AND version = ?",
                        (namespace, name, int(version))).fetchone()
        return _row(r) if r else None

    def list_schema_versions(self, namespace: str, name: str) -> list[OutputSchema]:
        rows = self._q(f"SELECT {SCHEMA_COLS} FROM output_schemas WHERE namespace = ? AND name = ? ORDER BY version",
                       (namespace, name)).fetchall()
        return [_row(r) for r in rows]

    def list_schemas(self, namespaces: list[str] | None = None, limit: int = 10_000) -> list[SchemaSummary]:
        """Each name with its newest version, in the given namespaces (None: all)."""
        where, args = "", []
        if namespaces is not None:
            if not namespaces:
                return []
            where = f"WHERE namespace IN ({','.join('?' * len(namespaces))})"
            args = list(namespaces)
        rows = self._q(f"SELECT namespace, name, max(version), count(*), max(created_at) FROM output_schemas {where} "
                       "GROUP BY namespace, name ORDER BY namespace, name LIMIT ?", [*args, int(limit)]).fetchall()
        return [SchemaSummary(r[0], r[1], int(r[2]), int(r[3]), float(r[4])) for r in rows]
