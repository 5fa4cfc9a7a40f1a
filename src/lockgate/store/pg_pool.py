"""`PgPool`: the PostgreSQL store's connections, made for riding out an outage.

What it must do, and why not psycopg_pool: while PostgreSQL is down a request
that needs it must get its 503 at once (not after a pool's checkout timeout,
5 s with psycopg_pool, every request), and when PostgreSQL is back the next
request must work (psycopg_pool's reconnect backoff kept answering 503 for up
to 8 s after a restart, measured). So:
- at most `size` connections; a caller waits at most `timeout_s` for a free one;
- a connection that failed is closed, never reused;
- a failed connect marks the database down for `retry_s`: meanwhile callers
  fail at once (no connection storm against a dead host), then one tries again;
- `begin()` starts a transaction; if a reused connection turns out dead (the
  server restarted since it was last used), every idle connection is dropped
  (they died with it) and the transaction starts on a fresh one: nothing had
  run on the dead connection, so the retry is safe.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from lockgate.store.store_error import StoreUnavailable


class PgPool:
    def __init__(self, conninfo: str, where: str, *, size: int, timeout_s: float, connect_timeout_s: float,
                 retry_s: float = 0.25) -> None:
        self.conninfo, self.where = conninfo, where
        self.size, self.timeout_s, self.retry_s = size, timeout_s, retry_s
        self.connect_timeout_s = max(1, int(round(connect_timeout_s)))
        self._idle: list[Any] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(size)
        self._down_until = 0.0
        self._closed = False
        self.connects = 0  # connections opened (a test reads it: outages open new ones, nothing else)

    def _connect(self) -> Any:
        import psycopg

        now = time.monotonic()
        if now < self._down_until:
            raise StoreUnavailable(f"the store {self.where} is unavailable (retrying)")
        try:
            conn = psycopg.connect(self.conninfo, autocommit=True, connect_timeout=self.connect_timeout_s)
        except psycopg.OperationalError as e:
            self._down_until = time.monotonic() + self.retry_s
            raise StoreUnavailable(f"the store {self.where} is unavailable: {first_line(e)}") from None
        self.connects += 1
        return conn

    def _take(self) -> tuple[Any, bool]:
        """(a connection, whether it was idle in the pool)."""
        with self._lock:
            if self._closed:
                raise StoreUnavailable(f"the store {self.where} is closed")
            if self._idle:
                return self._idle.pop(), True
        return self._connect(), False

    def _drop_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for c in idle:
            _close(c)

    def _give_back(self, conn: Any) -> None:
        from psycopg.pq import TransactionStatus

        if conn.broken or conn.closed or conn.info.transaction_status != TransactionStatus.IDLE:
            _close(conn)
            return
        with self._lock:
            if not self._closed:
                self._idle.append(conn)
                return
        _close(conn)

    @contextmanager
    def connection(self, begin: str | None = None, args: tuple | list = ()) -> Iterator[tuple[Any, Any]]:
        """(a connection for one use, the cursor of `begin`): `begin` ("BEGIN", or a read that is safe
        to run twice) has run on it, on a fresh connection if a reused one turned out dead."""
        import psycopg

        if not self._slots.acquire(timeout=self.timeout_s):
            raise StoreUnavailable(f"the store {self.where} is busy: all {self.size} connections in use "
                                   f"for {self.timeout_s:g} s")
        try:
            conn, reused = self._take()
            try:
                cur = None
                if begin is not None:
                    try:
                        cur = conn.execute(begin, args)
                    except psycopg.OperationalError:
                        if not reused:
                            raise
                        _close(conn)  # it died idle: so did its siblings; start over on a new one
                        self._drop_idle()
                        conn = self._connect()
                        cur = conn.execute(begin, args)
                yield conn, cur
            except psycopg.OperationalError as e:
                _close(conn)
                raise StoreUnavailable(f"the store {self.where} is unavailable: {first_line(e)}") from None
            except BaseException:
                self._give_back(conn)
                raise
            else:
                self._give_back(conn)
        finally:
            self._slots.release()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._drop_idle()


def _close(conn: Any) -> None:
    try:
        conn.close()
    except Exception:  # noqa: BLE001 - already broken
        pass


def first_line(e: BaseException) -> str:
    """The driver's message, one line (libpq never puts the password in it)."""
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
