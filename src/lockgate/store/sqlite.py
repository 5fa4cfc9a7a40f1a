"""`SQLiteStore`: the `Store` on one SQLite file, `<data_dir>/lockgate.db` (statements: sql.py).

- WAL journal: readers never block the writer nor each other; another process
  (the CLI) can read and write the same file while the server runs.
- Durability: `synchronous=NORMAL` by default. In WAL mode a commit is in the
  WAL file (the OS page cache) when it returns, so a killed process (SIGKILL,
  OOM) loses nothing committed; only a power loss or kernel crash can drop the
  last commits before the next checkpoint. `synchronous="FULL"` fsyncs every
  commit (one fsync per group-committed batch through `AsyncStore`) for
  deployments that must survive power loss too.
- WAL checkpoints: SQLite runs one on the committing connection every 1000
  pages, an fsync that stalls that commit for tens of ms. `AsyncStore` turns
  that off for its writer thread and checkpoints from a thread of its own.
- One connection per thread (`threading.local`), autocommit mode with explicit
  `BEGIN IMMEDIATE ... COMMIT` for every change, so a change and its audit record
  commit together or not at all. In-process writes are serialised by a lock
  (no busy-waiting between our own threads); `busy_timeout` covers other processes.
- Times are Unix seconds; lists and dicts are JSON columns.
"""
from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lockgate.store.files import UnsafeDataDir, private_db_file, private_dir
from lockgate.store.schema import SCHEMA_VERSION, SchemaError, migrate
from lockgate.store.sql import SqlStore
from lockgate.store.store_error import StoreError

DB_FILENAME = "lockgate.db"
DEFAULT_DATA_DIR = "./lockgate-data"
DATA_DIR_ENV = "LOCKGATE_DATA_DIR"

__all__ = ["SQLiteStore", "SchemaError", "StoreError", "open_store", "resolve_data_dir", "DB_FILENAME",
           "SCHEMA_VERSION"]


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """--data-dir, else $LOCKGATE_DATA_DIR, else ./lockgate-data."""
    return Path(data_dir or os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR)


def open_store(data_dir: str | os.PathLike[str] | None = None, **kwargs: Any) -> SQLiteStore:
    """The store in `data_dir` (created 0700 if missing; refused if open to others: files.py)."""
    d = resolve_data_dir(data_dir)
    try:
        private_dir(d)
    except UnsafeDataDir:
        raise  # its message names the fix
    except OSError as e:
        raise StoreError(f"cannot create data directory {d}: {e}") from e
    return SQLiteStore(d / DB_FILENAME, **kwargs)



class SQLiteStore(SqlStore):
    def __init__(self, path: str | os.PathLike[str], *, synchronous: str = "NORMAL",
                 busy_timeout_ms: int = 10_000) -> None:
        if synchronous.upper() not in ("NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous must be NORMAL, FULL or EXTRA, not {synchronous!r}")
        self.path = str(path)
        self.synchronous = synchronous.upper()
        self.busy_timeout_ms = int(busy_timeout_ms)
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._write_lock = threading.RLock()
        self._closed = False
        private_db_file(self.path)  # 0700 directory, 0600 files; UnsafeDataDir (a PermissionError) if not
        conn = self._conn()  # opens, sets WAL, migrates: errors surface here, not on first use
        try:
            migrate(conn, self.path)
        except sqlite3.DatabaseError as e:
            self.close()
            raise StoreError(f"cannot use {self.path} as a lockgate database: {e}") from e
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ connections
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        if self._closed:
            raise StoreError("the store is closed")
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=self.busy_timeout_ms / 1000)
            conn.execute(f"PRAGMA busy_timeout = {self.busy_timeout_ms}")
            mode = self._set_wal(conn)
            if str(mode).lower() != "wal":
                raise StoreError(f"{self.path}: cannot switch to WAL journal mode (got {mode!r})")
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            conn.execute(f"PRAGMA journal_size_limit = {64 * 1024 * 1024}")  # the WAL file shrinks back after a burst
            conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.DatabaseError as e:
            raise StoreError(f"cannot open {self.path}: {e}") from e
        self._local.conn = conn
        with self._conns_lock:
            self._conns.append(conn)
        return conn

    def _set_wal(self, conn: sqlite3.Connection) -> str:
        """Switch to WAL. Two processes creating the file at once (API workers starting together)
        can get SQLITE_BUSY here without the busy handler being asked, so retry until busy_timeout."""
        deadline = time.monotonic() + self.busy_timeout_ms / 1000
        while True:
            try:
                return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            except sqlite3.OperationalError as e:
                if ("locked" not in str(e) and "busy" not in str(e)) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)

    @contextmanager
    def _write(self, admin: bool = False, lazy: bool = False) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE: takes the write lock up front, no upgrade deadlocks;
        it holds across processes, so `admin` needs nothing more)."""
        conn = self._conn()
        with self._write_lock:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """A consistent snapshot across several SELECTs."""
        conn = self._conn()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    def _q(self, sql: str, args: tuple | list = ()) -> sqlite3.Cursor:
        return self._conn().execute(sql, args)

    def close(self) -> None:
        self._closed = True
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for c in conns:
            try:
                c.close()
            except sqlite3.Error:
                pass
        self._local = threading.local()

    def disable_autocheckpoint(self) -> None:
        """For this thread's connection: commits never run a WAL checkpoint (its fsync is a latency
        spike of tens of ms); call `checkpoint()` from another thread instead (AsyncStore does)."""
        self._conn().execute("PRAGMA wal_autocheckpoint = 0")

    def checkpoint(self, mode: str = "PASSIVE") -> tuple[int, int, int]:
        """Copy the WAL into the database file without blocking writers: (busy, wal pages, copied)."""
        if mode not in ("PASSIVE", "FULL", "RESTART", "TRUNCATE"):
            raise ValueError(mode)
        row = self._conn().execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        return int(row[0]), int(row[1]), int(row[2])

    def schema_version(self) -> int:
        return int(self._conn().execute("PRAGMA user_version").fetchone()[0])

    def journal_mode(self) -> str:
        return str(self._conn().execute("PRAGMA journal_mode").fetchone()[0]).lower()
