"""The statements that let several processes or instances share one store's limits and budgets.

With one API process on SQLite the gateway keeps rate buckets and budget books
in memory (gateway/limits.py, budget.py): exact, and free. With several (a
PostgreSQL store, or `--api-workers`), every decision that a sum over all
instances bounds is one transaction here, serialised by row locks (PostgreSQL)
or the database write lock (SQLite), so no read-modify-write spans processes:
- `charge_requests`: one request unit from the tenant's and key's rpm buckets,
  both or neither;
- `admit`: concurrency (the tenant's and key's open reservations, counted),
  tokens per minute, and the budgets (the period's settled spend in
  `budget_books` plus the open reservations' worst cases): the tenant's, and
  the key's own (read from `api_keys` in the same transaction, its book the
  row `k:<key id>`; both must hold), then the reservation row, all or nothing;
- settle and checkpoint (`SqlStore._settle`/`_checkpoint` call here when
  `shared`): the usage row (unique by request id), the tenant's and key's
  books' spend only when that row was new, completion tokens off the tpm buckets;
- instance leases: each instance renews its row; reservations whose instance's
  lease is stale are settled as `interrupted` by any live one (`dead_reservations`).

Locks are always taken in one order (tenants' books, then keys' books, then
buckets sorted by scope) so two transactions cannot deadlock. Clocks: `now` is the calling
instance's time (keep instances on NTP; a bucket refills by elapsed time).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from lockgate.store.models import Reservation, UsageRecord
from lockgate.store.periods import period_start

# A row locked and read in one statement: the no-op update takes the row lock (PostgreSQL) and
# RETURNING reads it (both dialects; SQLite holds the database write lock anyway).
_LOCK_BUCKET = ("INSERT INTO limit_buckets(scope, kind, capacity, level, updated) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(scope, kind) DO UPDATE SET kind = excluded.kind RETURNING capacity, level, updated")
_LOCK_BOOK = ("INSERT INTO budget_books(tenant_id, period, period_start, spent) VALUES (?, '', NULL, 0) "
              "ON CONFLICT(tenant_id) DO UPDATE SET tenant_id = excluded.tenant_id "
              "RETURNING period, period_start, spent")


@dataclass(slots=True)
class Refusal:
    """Why `charge_requests` or `admit` said no (the gateway words the 429)."""

    kind: str  # rpm | concurrency | tpm | tpm_too_large | budget
    scope: str  # 't:<tenant id>' or 'k:<key id>'
    wait_s: float = 0.0  # until a bucket holds enough (rpm, tpm)
    inflight: int = 0  # concurrency: requests open now
    left_usd: float = 0.0  # budget: what is left for new holds
    budget_usd: float | None = None  # budget: the budget that refused (a key's, as read in the store)
    period: str | None = None  # budget: its period


@dataclass(slots=True)
class Charge:
    refusal: Refusal | None
    levels: dict[str, tuple[float, float]] = field(default_factory=dict)  # scope -> (capacity, level) after


@dataclass(slots=True)
class AdmitRequest:
    reservation: Reservation  # reserved_usd: the worst case at the prices it is admitted at
    budget_usd: float | None
    period: str
    period_start: float | None  # gateway/budget.py period_start
    tenant_concurrency: int | None = None
    key_concurrency: int | None = None
    tpm: list[tuple[str, int]] = field(default_factory=list)  # (scope, tokens per minute)


def _refill(capacity: float, level: float, updated: float, wanted: float, now: float) -> float:
    """A bucket's level at `now` (a changed limit starts a full bucket, as in memory)."""
    if capacity != wanted:
        return wanted
    return min(capacity, level + max(0.0, now - updated) * capacity / 60.0)


class SharedOps:
    """Mixed into `SqlStore`: needs its `_write`, `_q`, `RES_COLS_SQL`, `USAGE_INSERT_SQL` and `usage_values`."""

    # ---- buckets ------------------------------------------------------------------------------
    @staticmethod
    def _lock_buckets(conn: Any, kind: str, specs: list[tuple[str, int]], now: float) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for scope, cap in sorted(specs):
            capacity, level, updated = conn.execute(_LOCK_BUCKET, (scope, kind, float(cap), float(cap), now)).fetchone()
            out[scope] = [float(cap), _refill(float(capacity), float(level), float(updated), float(cap), now)]
        return out

    @staticmethod
    def _save_buckets(conn: Any, kind: str, buckets: dict[str, list[float]], now: float) -> None:
        conn.executemany("UPDATE limit_buckets SET capacity = ?, level = ?, updated = ? WHERE scope = ? AND kind = ?",
                         [(c, level, now, scope, kind) for scope, (c, level) in sorted(buckets.items())])

    @staticmethod
    def _consume_tokens(conn: Any, deltas: dict[str, int]) -> None:
        """Completion tokens off the tpm buckets (may go below zero: later requests wait)."""
        rows = [(float(d), scope) for scope, d in sorted(deltas.items()) if d]
        if rows:
            conn.executemany("UPDATE limit_buckets SET level = level - ? WHERE scope = ? AND kind = 'tok'", rows)

    def charge_requests(self, scopes: list[tuple[str, int]], now: float | None = None) -> Charge:
        """One request unit from every (scope, rpm) bucket, or none and the refusal with its wait."""
        now = time.time() if now is None else now
        with self._write(lazy=True) as conn:  # type: ignore[attr-defined]
            buckets = self._lock_buckets(conn, "req", scopes, now)
            for scope, (cap, level) in buckets.items():
                if level < 1.0:
                    return Charge(Refusal("rpm", scope, wait_s=(1.0 - level) / (cap / 60.0)),
                                  {s: (c, lv) for s, (c, lv) in buckets.items()})
            for b in buckets.values():
                b[1] -= 1.0
            self._save_buckets(conn, "req", buckets, now)
        return Charge(None, {s: (c, lv) for s, (c, lv) in buckets.items()})

    # ---- admission ----------------------------------------------------------------------------
    def _book(self, conn: Any, tenant_id: str, period: str, start: float | None, key_id: str | None = None) -> float:
        """Lock the tenant's book (or with `key_id` the key's, row `k:<key id>`) and return the spend of
        the period starting at `start` (recounted from the ledger when the book was for another
        period: the lock makes settlements wait)."""
        book_id, col, owner = (tenant_id, "tenant_id", tenant_id) if key_id is None else (f"k:{key_id}", "key_id", key_id)
        have, have_start, spent = conn.execute(_LOCK_BOOK, (book_id,)).fetchone()
        if have == period and have_start == start:
            return float(spent)
        if start is None:
            row = conn.execute(f"SELECT coalesce(sum(cost_usd), 0) FROM usage WHERE {col} = ?", (owner,))
        else:
            row = conn.execute(f"SELECT coalesce(sum(cost_usd), 0) FROM usage WHERE {col} = ? AND created_at >= ?",
                               (owner, start))
        spent = float(row.fetchone()[0])
        conn.execute("UPDATE budget_books SET period = ?, period_start = ?, spent = ? WHERE tenant_id = ?",
                     (period, start, spent, book_id))
        return spent

    def _key_budget(self, conn: Any, key_id: str | None, now: float) -> tuple[float, str, float | None] | None:
        """The key's own budget as the store has it now: (budget, period, period start), or None."""
        if key_id is None:
            return None
        row = conn.execute("SELECT budget_usd, budget_period FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        if row is None or row[0] is None:
            return None
        period = row[1] or "month"
        return float(row[0]), period, period_start(period, now)

    def admit(self, req: AdmitRequest, now: float | None = None) -> Refusal | None:
        """Concurrency, tokens per minute and the budget for `req.reservation`, and its row: all or none."""
        now = time.time() if now is None else now
        r = req.reservation
        with self._write(lazy=True) as conn:  # type: ignore[attr-defined]
            spent = self._book(conn, r.tenant_id, req.period, req.period_start)
            kbudget = self._key_budget(conn, r.key_id, now)
            kspent = self._book(conn, r.tenant_id, kbudget[1], kbudget[2], r.key_id) if kbudget else 0.0
            open_n, held = conn.execute("SELECT count(*), coalesce(sum(reserved_usd), 0) FROM reservations "
                                        "WHERE tenant_id = ?", (r.tenant_id,)).fetchone()
            if req.tenant_concurrency is not None and open_n >= req.tenant_concurrency:
                return Refusal("concurrency", f"t:{r.tenant_id}", inflight=int(open_n))
            if req.key_concurrency is not None and r.key_id is not None:
                (key_n,) = conn.execute("SELECT count(*) FROM reservations WHERE key_id = ?", (r.key_id,)).fetchone()
                if key_n >= req.key_concurrency:
                    return Refusal("concurrency", f"k:{r.key_id}", inflight=int(key_n))
            buckets = self._lock_buckets(conn, "tok", req.tpm, now)
            for scope, (cap, level) in buckets.items():
                if r.prompt_tokens > cap:
                    return Refusal("tpm_too_large", scope, wait_s=60.0)
                if level < r.prompt_tokens:
                    return Refusal("tpm", scope, wait_s=(r.prompt_tokens - level) / (cap / 60.0))
            held = float(held)
            refusals = []
            if req.budget_usd is not None and spent + held + r.reserved_usd > req.budget_usd + 1e-12:
                refusals.append(Refusal("budget", f"t:{r.tenant_id}", left_usd=max(0.0, req.budget_usd - spent - held),
                                        budget_usd=req.budget_usd, period=req.period))
            if kbudget is not None:
                (kheld,) = conn.execute("SELECT coalesce(sum(reserved_usd), 0) FROM reservations WHERE key_id = ?",
                                        (r.key_id,)).fetchone()
                kheld = float(kheld)
                if kspent + kheld + r.reserved_usd > kbudget[0] + 1e-12:
                    refusals.append(Refusal("budget", f"k:{r.key_id}", left_usd=max(0.0, kbudget[0] - kspent - kheld),
                                            budget_usd=kbudget[0], period=kbudget[1]))
            if refusals:  # the stricter wins: the one with less left
                return min(refusals, key=lambda x: x.left_usd)
            conn.execute(f"INSERT INTO reservations({self.RES_COLS_SQL}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",  # type: ignore[attr-defined]
                         (r.request_id, r.tenant_id, r.key_id, r.model, float(r.reserved_usd), int(r.prompt_tokens),
                          0, 0, r.created_at or now, now, r.model_version, r.instance_id))
            for b in buckets.values():
                b[1] -= r.prompt_tokens
            if buckets:
                self._save_buckets(conn, "tok", buckets, now)
        return None

    # ---- checkpoint and settle (inside SqlStore's write transaction) -----------------------------
    def _checkpoint_shared(self, conn: Any, updates: list[tuple[str, int, int]]) -> None:
        now = time.time()
        deltas: dict[str, int] = {}
        for rid, completion, cached in updates:
            row = conn.execute("SELECT tenant_id, key_id, completion_tokens FROM reservations WHERE request_id = ?",
                               (rid,)).fetchone()
            if row is None:
                continue
            conn.execute("UPDATE reservations SET completion_tokens = ?, cached_tokens = ?, updated_at = ? "
                         "WHERE request_id = ?", (int(completion), int(cached), now, rid))
            _add_delta(deltas, row[0], row[1], int(completion) - int(row[2]))
        self._consume_tokens(conn, deltas)

    def _settle_shared(self, conn: Any, records: list[UsageRecord]) -> None:
        now = time.time()
        spent: list[tuple[str, float, float]] = []
        deltas: dict[str, int] = {}
        for rec in records:
            held = conn.execute("DELETE FROM reservations WHERE request_id = ? RETURNING tenant_id, key_id, "
                                "completion_tokens", (rec.request_id,)).fetchone()
            new = conn.execute(self.USAGE_INSERT_SQL + " RETURNING request_id",  # type: ignore[attr-defined]
                               self.usage_values(rec, now)).fetchone()  # type: ignore[attr-defined]
            if new is not None and rec.tenant_id is not None:
                spent.append((rec.tenant_id, float(rec.cost_usd), rec.created_at or now))
                if rec.key_id:  # the key's book too (a row only where the key has had a budget)
                    spent.append((f"k:{rec.key_id}", float(rec.cost_usd), rec.created_at or now))
            if held is not None:
                _add_delta(deltas, held[0], held[1], int(rec.completion_tokens) - int(held[2]))
        # Tenants' books before keys' (`k:...`), each sorted: the lock order `admit` takes them in.
        for tenant_id, cost, at in sorted(spent, key=lambda s: (s[0].startswith("k:"), s)):
            conn.execute("UPDATE budget_books SET spent = spent + ? WHERE tenant_id = ? "
                         "AND (period_start IS NULL OR period_start <= ?)", (cost, tenant_id, at))
        self._consume_tokens(conn, deltas)

    # ---- instances ----------------------------------------------------------------------------
    def register_instance(self, instance_id: str, host: str, pid: int, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._write(lazy=True) as conn:  # type: ignore[attr-defined]
            conn.execute("INSERT INTO instances(id, host, pid, started_at, renewed_at) VALUES (?, ?, ?, ?, ?) "
                         "ON CONFLICT(id) DO UPDATE SET renewed_at = excluded.renewed_at",
                         (instance_id, host, int(pid), now, now))

    def renew_instance(self, instance_id: str, now: float | None = None) -> bool:
        """False: the lease was gone (another instance judged this one dead and swept it)."""
        now = time.time() if now is None else now
        with self._write(lazy=True) as conn:  # type: ignore[attr-defined]
            return conn.execute("UPDATE instances SET renewed_at = ? WHERE id = ?", (now, instance_id)).rowcount == 1

    def drop_instance(self, instance_id: str) -> None:
        with self._write() as conn:  # type: ignore[attr-defined]
            conn.execute("DELETE FROM instances WHERE id = ?", (instance_id,))

    def list_instances(self) -> list[dict[str, Any]]:
        rows = self._q("SELECT id, host, pid, started_at, renewed_at FROM instances ORDER BY started_at, id")  # type: ignore[attr-defined]
        return [dict(zip(("id", "host", "pid", "started_at", "renewed_at"), r)) for r in rows]

    def dead_reservations(self, live_since: float) -> list[Reservation]:
        """Reservations no live instance holds: its lease not renewed since `live_since`, or none."""
        rows = self._q(f"SELECT {self.RES_COLS_SQL} FROM reservations WHERE instance_id IS NULL "  # type: ignore[attr-defined]
                       "OR instance_id NOT IN (SELECT id FROM instances WHERE renewed_at >= ?) ORDER BY created_at",
                       (live_since,)).fetchall()
        return [Reservation(*r) for r in rows]

    def forget_dead_instances(self, live_since: float) -> int:
        """Drop stale leases that hold no reservation any more (after a sweep settled them)."""
        with self._write() as conn:  # type: ignore[attr-defined]
            return conn.execute("DELETE FROM instances WHERE renewed_at < ? AND NOT EXISTS "
                                "(SELECT 1 FROM reservations WHERE instance_id = instances.id)", (live_since,)).rowcount

    def reset_shared_state(self) -> None:
        """A single process takes the store over (SQLite, one API process): the books and buckets
        that only shared mode keeps current are dropped, to be rebuilt from the ledger if shared
        mode runs again."""
        with self._write() as conn:  # type: ignore[attr-defined]
            conn.execute("DELETE FROM budget_books")
            conn.execute("DELETE FROM limit_buckets")


def _add_delta(deltas: dict[str, int], tenant_id: str, key_id: str | None, n: int) -> None:
    if n:
        deltas[f"t:{tenant_id}"] = deltas.get(f"t:{tenant_id}", 0) + n
        if key_id:
            deltas[f"k:{key_id}"] = deltas.get(f"k:{key_id}", 0) + n
