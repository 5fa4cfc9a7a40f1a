"""The audit chain: tampering with the database file directly (sqlite3) is detected and located."""
from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from lockgate.store.audit import canonical_json, record_hash
from lockgate.store.schema import GENESIS_HASH
from lockgate.store.sqlite import DB_FILENAME, SQLiteStore, open_store


def _filled(tmp_path: Path, n: int = 5) -> SQLiteStore:
    s = open_store(tmp_path)
    for i in range(1, n + 1):
        s.append_audit("cli", "tenant.update", f"ten_{i}", {"rpm": i, "nested": {"b": [1, 2], "a": None}})
    assert s.verify_audit() == (True, n, None)
    return s


def _raw(tmp_path: Path, sql: str, *args) -> None:
    with sqlite3.connect(tmp_path / DB_FILENAME) as raw:
        raw.execute(sql, args)


def test_chain_links_and_hashes(tmp_path: Path) -> None:
    s = _filled(tmp_path, 3)
    recs = s.list_audit()
    assert [r.id for r in recs] == [1, 2, 3]
    assert recs[0].prev_hash == GENESIS_HASH
    assert recs[1].prev_hash == recs[0].hash and recs[2].prev_hash == recs[1].hash
    r = recs[1]
    assert r.hash == record_hash(r.prev_hash, r.id, r.ts, r.actor, r.action, r.target, r.details)
    assert len(r.hash) == 64 and r.details == {"rpm": 2, "nested": {"b": [1, 2], "a": None}}
    assert [x.id for x in s.list_audit(since_id=1, limit=1)] == [2]
    assert s.verify_audit_full().head == recs[2].hash
    s.close()


def test_canonical_json_is_sorted_compact_and_rejects_nan() -> None:
    assert canonical_json({"b": 1, "a": [1, {"d": 2, "c": 3}]}) == '{"a":[1,{"c":3,"d":2}],"b":1}'
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


def test_empty_log_verifies(tmp_path: Path) -> None:
    s = open_store(tmp_path)
    assert s.verify_audit() == (True, 0, None)
    s.close()


def test_edited_row_is_detected(tmp_path: Path) -> None:
    s = _filled(tmp_path)
    _raw(tmp_path, "UPDATE audit SET details = ? WHERE id = 3", json.dumps({"rpm": 1000000}))
    assert s.verify_audit()[0] is False and s.verify_audit()[2] == 3
    s.close()


@pytest.mark.parametrize("column,value", [("actor", "someone"), ("action", "key.create"), ("target", None),
                                          ("ts", 1.0), ("hash", "f" * 64)])
def test_every_column_is_covered(tmp_path: Path, column: str, value) -> None:
    s = _filled(tmp_path)
    _raw(tmp_path, f"UPDATE audit SET {column} = ? WHERE id = 2", value)
    assert s.verify_audit() == (False, 2, 2)
    s.close()


def test_edit_with_recomputed_hash_breaks_the_next_link(tmp_path: Path) -> None:
    s = _filled(tmp_path)
    r = s.list_audit()[1]
    forged = {"rpm": 999}
    h = record_hash(r.prev_hash, r.id, r.ts, r.actor, r.action, r.target, forged)
    _raw(tmp_path, "UPDATE audit SET details = ?, hash = ? WHERE id = 2", canonical_json(forged), h)
    ok, _, first_bad = s.verify_audit()
    assert not ok and first_bad == 3
    s.close()


def test_deleted_middle_row_is_detected(tmp_path: Path) -> None:
    s = _filled(tmp_path)
    _raw(tmp_path, "DELETE FROM audit WHERE id = 2")
    assert s.verify_audit() == (False, 2, 2)
    s.close()


def test_deleted_tail_is_detected(tmp_path: Path) -> None:
    s = _filled(tmp_path)
    _raw(tmp_path, "DELETE FROM audit WHERE id >= 4")
    assert s.verify_audit() == (False, 3, 4)
    # and a later append does not paper over the gap
    s.append_audit("cli", "tenant.create", "ten_x", {})
    ok, _, first_bad = s.verify_audit()
    assert not ok and first_bad == 4
    s.close()


def test_deleted_everything_is_detected(tmp_path: Path) -> None:
    s = _filled(tmp_path)
    _raw(tmp_path, "DELETE FROM audit")
    assert s.verify_audit() == (False, 0, 1)
    s.close()


def test_inserted_row_at_the_end_is_detected(tmp_path: Path) -> None:
    s = _filled(tmp_path)
    last = s.list_audit()[-1]
    # a well-formed forged record, chained correctly, but not through the store (meta not updated)
    h = record_hash(last.hash, 6, 123.0, "cli", "key.create", "key_evil", {})
    _raw(tmp_path, "INSERT INTO audit VALUES (6, 123.0, 'cli', 'key.create', 'key_evil', '{}', ?, ?)", last.hash, h)
    assert s.verify_audit() == (False, 6, 6)
    s.close()


def test_inserted_row_in_a_gap_is_detected(tmp_path: Path) -> None:
    s = _filled(tmp_path)
    for i in (5, 4, 3):  # make room: shift the later ids up by one
        _raw(tmp_path, "UPDATE audit SET id = ? WHERE id = ?", i + 1, i)
    _raw(tmp_path, "INSERT INTO audit VALUES (3, 1.0, 'cli', 'key.create', 'k', '{}', ?, ?)", "0" * 64, "0" * 64)
    ok, _, first_bad = s.verify_audit()
    assert not ok and first_bad == 3
    s.close()


def test_meta_head_tampering_is_detected(tmp_path: Path) -> None:
    s = _filled(tmp_path)
    _raw(tmp_path, "UPDATE meta SET value = ? WHERE key = 'audit_head'", "e" * 64)
    assert s.verify_audit()[0] is False
    s.close()
