"""The audit log's hash chain.

Each record's hash is SHA-256 (hex) over the canonical JSON (sorted keys, no
whitespace) of {prev_hash, id, ts, actor, action, target, details}; the first
record's prev_hash is 64 zeros. The store also keeps the chain's head (newest
hash) and record count in its `meta` table, updated in the same transaction as
each append, so removing the newest rows is detected too.

What it proves: any row edited, inserted or deleted through anything but this
code (e.g. `sqlite3` on the file) breaks the chain. What it cannot prove alone:
someone with write access who recomputes every later hash and the head. Anchor
the head elsewhere (`lockgate audit verify` prints it) to catch that.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from lockgate.store.schema import GENESIS_HASH


def canonical_json(value: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace, no NaN/inf."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def normalize_details(details: dict[str, Any] | None) -> dict[str, Any]:
    """The details as they will read back from the database (tuples -> lists, ...)."""
    return json.loads(canonical_json(details or {}))


def record_hash(prev_hash: str, id: int, ts: float, actor: str, action: str, target: str | None,
                details: dict[str, Any]) -> str:
    payload = {"prev_hash": prev_hash, "id": id, "ts": ts, "actor": actor, "action": action,
               "target": target, "details": details}
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()


@dataclass(slots=True)
class ChainHead:
    last_id: int = 0
    count: int = 0
    hash: str = GENESIS_HASH


@dataclass(slots=True)
class VerifyResult:
    ok: bool
    records: int
    first_bad: int | None
    head: str  # the newest valid hash (anchor it outside the database)


def verify_rows(rows: Iterable[tuple[int, float, str, str, str | None, str, str, str]],
                meta_head: str | None, meta_count: int | None) -> VerifyResult:
    """Walk (id, ts, actor, action, target, details_json, prev_hash, hash) in id order.

    first_bad is the first id where the chain breaks: a row whose content does not
    match its hash (edited), whose prev_hash does not match the row before (edited
    or inserted before it), or an id that is not the next one (a row deleted: the
    missing id is reported). Then the head and count in `meta` must match the
    newest row (rows deleted or appended at the end).
    """
    prev = GENESIS_HASH
    expected_id = 1
    n = 0
    for id_, ts, actor, action, target, details_text, prev_hash, hash_ in rows:
        n += 1
        if id_ != expected_id:
            return VerifyResult(False, n, min(id_, expected_id), prev)
        try:
            details = json.loads(details_text)
        except (TypeError, ValueError):
            return VerifyResult(False, n, id_, prev)
        if prev_hash != prev:
            return VerifyResult(False, n, id_, prev)
        if record_hash(prev_hash, id_, ts, actor, action, target, details) != hash_:
            return VerifyResult(False, n, id_, prev)
        prev = hash_
        expected_id += 1
    if meta_head is None or meta_count is None:
        return VerifyResult(False, n, expected_id if n == 0 else expected_id - 1, prev)
    if meta_count > n:  # the newest rows were removed: the first missing id
        return VerifyResult(False, n, n + 1, prev)
    if meta_count < n or meta_head != prev:  # rows appended outside the store, or the head edited
        return VerifyResult(False, n, max(meta_count + 1, 1) if meta_count < n else max(n, 1), prev)
    return VerifyResult(True, n, None, prev)
