"""Versioned output schemas in the store (store/schema_ops.py) on both backends: two store objects on
one database (as two instances) registering the same name at once get consecutive versions, never the
same one; a conflict writes nothing; each version and its audit record commit together."""
from __future__ import annotations

import threading

import pytest

from lockgate.store.schema_ops import SchemaConflict




def _no_breaks(_prev: str) -> list[dict]:
    return [{"path": "$", "change": "property_added", "breaking": False, "detail": "x"}]


def test_concurrent_registrations_get_consecutive_versions(two: tuple) -> None:
    a, b = two
    n = 12
    barrier = threading.Barrier(n)
    got: list[int] = []
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            barrier.wait()
            row, _ = (a if i % 2 else b).register_schema("", "invoice", f'{{"title":"{i}"}}', f"actor{i}", _no_breaks)
            got.append(row.version)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(got) == list(range(1, n + 1))
    versions = b.list_schema_versions("", "invoice")
    assert [v.version for v in versions] == list(range(1, n + 1))
    audit = [r for r in a.list_audit() if r.action == "schema.register"]
    assert sorted(r.target for r in audit) == sorted(f"invoice@{v}" for v in range(1, n + 1))
    assert a.verify_audit()[0] is True
    assert a.get_schema("", "invoice").version == n
    assert a.get_schema("", "invoice", 3).version == 3


def test_a_conflict_writes_nothing_and_force_records_it(two: tuple) -> None:
    a, b = two
    a.register_schema("ten_a", "pal", '{"type":"object"}', "k1", _no_breaks)
    breaking = [{"path": "$.type", "change": "type_narrowed", "breaking": True, "detail": "object -> string"}]
    before = len(a.list_audit())
    with pytest.raises(SchemaConflict) as exc:
        b.register_schema("ten_a", "pal", '{"type":"string"}', "k1", lambda _p: breaking)
    assert exc.value.previous == 1 and exc.value.differences == breaking
    assert len(a.list_audit()) == before and a.get_schema("ten_a", "pal").version == 1
    row, diffs = b.register_schema("ten_a", "pal", '{"type":"string"}', "k1", lambda _p: breaking, force=True)
    assert row.version == 2 and row.forced and diffs == breaking
    rec = a.list_audit()[-1]
    assert rec.action == "schema.register" and rec.details["forced"] is True
    assert rec.details["differences"] == breaking and rec.details["namespace"] == "ten_a"
    # Namespaces are apart: the global one has no 'pal'; the listing shows each namespace's newest.
    assert a.get_schema("", "pal") is None
    a.register_schema("", "pal", '{"type":"object"}', "admin", _no_breaks)
    listed = {(s.namespace, s.name): s.latest for s in a.list_schemas()}
    assert listed == {("ten_a", "pal"): 2, ("", "pal"): 1}
    assert [s.namespace for s in a.list_schemas([""])] == [""]
