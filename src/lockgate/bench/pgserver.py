"""`PgServer`: a throwaway PostgreSQL server in a temporary directory, for tests and benchmarks.

It runs the machine's PostgreSQL binaries (`$LOCKGATE_PG_BIN`, else
/usr/lib/postgresql/<newest>/bin, else `pg_ctl` on PATH). PostgreSQL refuses
to run as root: as root the server runs as the `postgres` user (`runuser`),
in a directory that user owns. It listens on loopback TCP on a free port and
a Unix socket in its directory, trusts local connections (nothing else can
reach loopback-only tests), and keeps PostgreSQL's durability defaults
(fsync and synchronous_commit on), so benchmarks measure what production pays.

    with PgServer() as pg:
        url = pg.create_database("t1")   # postgresql://postgres@127.0.0.1:PORT/t1
        pg.stop(); pg.start()            # an outage, and recovery on the same data
"""
from __future__ import annotations

import atexit
import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PG_BIN_ENV = "LOCKGATE_PG_BIN"
SUPERUSER = "postgres"


class PgUnavailable(RuntimeError):
    """No PostgreSQL binaries on this machine (install them: `make install` does on Debian)."""


def find_bin() -> Path:
    env = os.environ.get(PG_BIN_ENV)
    if env and (Path(env) / "postgres").exists():
        return Path(env)
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=lambda p: int(p.split("/")[4]))
    if found:
        return Path(found[-1]).parent
    which = shutil.which("pg_ctl")
    if which:
        return Path(which).resolve().parent
    raise PgUnavailable(f"no PostgreSQL binaries: set {PG_BIN_ENV} or install postgresql")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    def __init__(self, port: int | None = None, bin_dir: Path | None = None, *, durable: bool = True) -> None:
        """`durable=False` (tests): no fsync. Benchmarks keep PostgreSQL's defaults."""
        self.durable = durable
        self.bin = bin_dir or find_bin()
        self.port = port or _free_port()
        self.root = Path(tempfile.mkdtemp(prefix="lockgate-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.as_root = os.geteuid() == 0
        self.proc: subprocess.Popen[bytes] | None = None
        try:
            if self.as_root:
                shutil.chown(self.root, SUPERUSER, SUPERUSER)
                os.chmod(self.root, 0o700)
            self._run([str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", SUPERUSER, "-E", "UTF8",
                       "--no-sync"], timeout=120)
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise
        # The server runs in its own session (a Ctrl-C to ours does not reach it): stopped and removed
        # at our exit too, should the owner not close() it.
        atexit.register(self.close)

    def _cmd(self, argv: list[str]) -> list[str]:
        return ["runuser", "-u", SUPERUSER, "--", *argv] if self.as_root else argv

    def _run(self, argv: list[str], timeout: float) -> None:
        r = subprocess.run(self._cmd(argv), capture_output=True, timeout=timeout, cwd=self.root)
        if r.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed: {r.stderr.decode(errors='replace')[-2000:]}")

    @property
    def url(self) -> str:
        return self.url_for("postgres")

    def url_for(self, db: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{db}"

    def start(self, timeout: float = 30.0) -> PgServer:
        if self.proc is not None and self.proc.poll() is None:
            return self
        log = open(self.log, "ab")
        self.proc = subprocess.Popen(
            self._cmd([str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port), "-k", str(self.root),
                       "-c", "listen_addresses=127.0.0.1", "-c", "max_connections=200",
                       *([] if self.durable else ["-c", "fsync=off", "-c", "full_page_writes=off"])]),
            stdout=log, stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                raise RuntimeError(f"postgres exited: {self.log.read_text(errors='replace')[-2000:]}")
            if self.ready():
                return self
            time.sleep(0.05)
        self.stop(immediate=True)  # not left running behind the error
        raise TimeoutError(f"postgres did not accept connections in {timeout} s")

    def ready(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.url, connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def create_database(self, name: str) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        if not name.replace("_", "").isalnum():
            raise ValueError(f"database name {name!r}: letters, digits and _ only")
        with psycopg.connect(self.url, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url_for(name)

    def stop(self, timeout: float = 30.0, *, immediate: bool = False) -> None:
        """A fast shutdown (connections cut, nothing committed lost), or with `immediate` a crash
        (no checkpoint: recovery replays the WAL at the next start); `start()` brings it back."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            # To the group: under runuser the postmaster is its child.
            os.killpg(self.proc.pid, signal.SIGQUIT if immediate else signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def close(self) -> None:
        atexit.unregister(self.close)
        self.stop(immediate=True)  # its files are deleted next: no checkpoint worth waiting for
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PgServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
