"""The alert outbox: budget and anomaly alerts, raised once, delivered at least once.

An alert's id is its dedup key (for example `budget:t:<tenant>:80:<period start>`):
every instance that sees a threshold crossed inserts the same id and only the
first insert counts, so several instances raise one alert. Each receiver (URL)
gets a delivery row; a sender claims due rows for a while (`claimed_until`), so
two instances never post the same delivery at once, and a sender that dies
leaves its claim to expire and be taken over: at least once, never lost.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from lockgate.store.audit import canonical_json


@dataclass(slots=True)
class Alert:
    id: str  # the dedup key
    kind: str  # 'budget' | 'anomaly'
    tenant_id: str | None
    key_id: str | None
    payload: dict[str, Any]  # the JSON body receivers get
    created_at: float = 0.0


@dataclass(slots=True)
class Delivery:
    alert: Alert
    url: str
    attempts: int  # attempts made before this one
    last_error: str | None = None


class AlertOps:
    """Mixed into `SqlStore` (the same `_write`/`_q`)."""

    def _write(self, admin: bool = False, lazy: bool = False) -> Any:
        raise NotImplementedError

    def _q(self, sql: str, args: tuple | list = ()) -> Any:
        raise NotImplementedError

    def raise_alert(self, alert: Alert, urls: list[str], actor: str = "system") -> bool:
        """Insert the alert, its delivery rows and its audit record in one transaction; False (nothing
        written) when an alert with this id exists already (another instance, or an earlier scan)."""
        now = time.time()
        alert.created_at = alert.created_at or now
        with self._write(admin=True) as conn:
            cur = conn.execute(
                "INSERT INTO alerts(id, kind, tenant_id, key_id, payload, created_at) VALUES (?,?,?,?,?,?) "
                "ON CONFLICT(id) DO NOTHING",
                (alert.id, alert.kind, alert.tenant_id, alert.key_id, canonical_json(alert.payload),
                 alert.created_at))
            if cur.rowcount != 1:
                return False
            conn.executemany(
                "INSERT INTO alert_deliveries(alert_id, url, attempts, next_attempt_at) VALUES (?,?,0,?) "
                "ON CONFLICT(alert_id, url) DO NOTHING", [(alert.id, u, now) for u in dict.fromkeys(urls)])
            self._append_audit(conn, actor, f"alert.{alert.kind}", alert.tenant_id or alert.key_id,
                               {"alert_id": alert.id, **alert.payload})
        return True

    def _append_audit(self, conn: Any, actor: str, action: str, target: str | None,
                      details: dict[str, Any] | None, ts: float | None = None) -> Any:
        raise NotImplementedError

    def claim_deliveries(self, now: float, hold_s: float, limit: int = 50) -> list[Delivery]:
        """Due, undelivered deliveries no other sender holds, now held by the caller until now + hold_s."""
        with self._write() as conn:
            rows = conn.execute(
                "SELECT d.alert_id, d.url, d.attempts, d.last_error, a.kind, a.tenant_id, a.key_id, a.payload, "
                "a.created_at FROM alert_deliveries d JOIN alerts a ON a.id = d.alert_id "
                "WHERE d.delivered_at IS NULL AND d.failed_at IS NULL AND d.next_attempt_at <= ? "
                "AND (d.claimed_until IS NULL OR d.claimed_until <= ?) "
                "ORDER BY d.next_attempt_at LIMIT ?", (now, now, int(limit))).fetchall()
            conn.executemany("UPDATE alert_deliveries SET claimed_until = ? WHERE alert_id = ? AND url = ?",
                             [(now + hold_s, r[0], r[1]) for r in rows])
        return [Delivery(Alert(r[0], r[4], r[5], r[6], json.loads(r[7]), r[8]), r[1], int(r[2]), r[3])
                for r in rows]

    def delivery_done(self, alert_id: str, url: str, at: float) -> None:
        with self._write() as conn:
            conn.execute("UPDATE alert_deliveries SET delivered_at = ?, attempts = attempts + 1, "
                         "claimed_until = NULL, last_error = NULL WHERE alert_id = ? AND url = ?",
                         (at, alert_id, url))

    def delivery_failed(self, alert_id: str, url: str, error: str, retry_at: float) -> None:
        with self._write() as conn:
            conn.execute("UPDATE alert_deliveries SET attempts = attempts + 1, next_attempt_at = ?, "
                         "claimed_until = NULL, last_error = ? WHERE alert_id = ? AND url = ?",
                         (retry_at, error[:500], alert_id, url))

    def delivery_abandoned(self, alert_id: str, url: str, error: str, at: float) -> None:
        """Give a delivery up for good (a refused address, too many attempts, too old): never claimed again."""
        with self._write() as conn:
            conn.execute("UPDATE alert_deliveries SET attempts = attempts + 1, failed_at = ?, claimed_until = NULL, "
                         "last_error = ? WHERE alert_id = ? AND url = ?", (at, error[:500], alert_id, url))

    def list_alerts(self, kind: str | None = None, tenant_id: str | None = None, since: float | None = None,
                    limit: int = 1000) -> list[dict[str, Any]]:
        """Alerts newest first, each with its deliveries' state."""
        where, args = [], []
        for col, val in (("kind", kind), ("tenant_id", tenant_id)):
            if val is not None:
                where.append(f"a.{col} = ?")
                args.append(val)
        if since is not None:
            where.append("a.created_at >= ?")
            args.append(float(since))
        cond = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._q(f"SELECT a.id, a.kind, a.tenant_id, a.key_id, a.payload, a.created_at FROM alerts a {cond} "
                       "ORDER BY a.created_at DESC, a.id LIMIT ?", (*args, max(1, min(int(limit), 10_000)))).fetchall()
        out = []
        for r in rows:
            deliveries = self._q("SELECT url, attempts, delivered_at, last_error, next_attempt_at, failed_at FROM "
                                 "alert_deliveries WHERE alert_id = ? ORDER BY url", (r[0],)).fetchall()
            out.append({"id": r[0], "kind": r[1], "tenant_id": r[2], "key_id": r[3], "payload": json.loads(r[4]),
                        "created_at": r[5],
                        "deliveries": [{"url": d[0], "attempts": d[1], "delivered_at": d[2], "last_error": d[3],
                                        "next_attempt_at": d[4], "failed_at": d[5],
                                        "state": _state(d[2], d[5])} for d in deliveries]})
        return out


def _state(delivered_at: float | None, failed_at: float | None) -> str:
    return "delivered" if delivered_at is not None else "failed" if failed_at is not None else "pending"
