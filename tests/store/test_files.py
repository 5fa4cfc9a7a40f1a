"""The data directory is created 0700 and the database files 0600; an existing directory open to
group or others is refused (store, gateway and CLI) with the chmod that fixes it."""
from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lockgate.cli import app
from lockgate.gateway.gateway import Gateway, GatewayConfig
from lockgate.store.files import UnsafeDataDir, private_dir
from lockgate.store.sqlite import DB_FILENAME, SQLiteStore, StoreError, open_store


@pytest.fixture(autouse=True)
def umask_022() -> Iterator[None]:
    """The common default umask: the one that made data directories 0755 and databases 0644."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_a_fresh_data_dir_is_0700_and_the_database_files_0600(tmp_path: Path) -> None:
    d = tmp_path / "a" / "data"  # parents too
    s = open_store(d)
    try:
        s.list_tenants()
        names = sorted(p.name for p in d.iterdir())
        assert names == ["lockgate.db", "lockgate.db-shm", "lockgate.db-wal"], names  # WAL mode, files open
        assert _mode(d) == 0o700
        assert all(_mode(d / n) == 0o600 for n in names), {n: oct(_mode(d / n)) for n in names}
    finally:
        s.close()


@pytest.mark.parametrize("mode", [0o755, 0o750, 0o711, 0o701, 0o770, 0o707])
def test_an_existing_data_dir_open_to_others_is_refused(tmp_path: Path, mode: int) -> None:
    d = tmp_path / "data"
    d.mkdir()
    os.chmod(d, mode)
    with pytest.raises(UnsafeDataDir) as exc:
        open_store(d)
    msg = str(exc.value)
    assert f"chmod 700 {d}" in msg and f"{mode:04o}" in msg, msg
    assert list(d.iterdir()) == [] and _mode(d) == mode  # nothing created, nothing changed behind our back
    with pytest.raises(UnsafeDataDir):
        SQLiteStore(d / DB_FILENAME)  # the constructor applies the rule too
    assert list(d.iterdir()) == []
    os.chmod(d, 0o700)  # the fix the message names
    open_store(d).close()


def test_a_path_with_spaces_gets_a_quoted_chmod(tmp_path: Path) -> None:
    d = tmp_path / "my data"
    d.mkdir(mode=0o755)
    with pytest.raises(UnsafeDataDir, match=f"chmod 700 '{d}'"):
        private_dir(d)


def test_loose_database_files_in_a_private_dir_are_narrowed(tmp_path: Path) -> None:
    """Files an older version made 0644 (behind a directory now 0700) become 0600 on open."""
    open_store(tmp_path).close()
    for name in ("lockgate.db", "lockgate.db-wal"):
        p = tmp_path / name
        p.touch()
        os.chmod(p, 0o644)
    s = open_store(tmp_path)
    try:
        s.list_tenants()
        assert {p.name: _mode(p) for p in tmp_path.iterdir()} == {
            "lockgate.db": 0o600, "lockgate.db-wal": 0o600, "lockgate.db-shm": 0o600}
    finally:
        s.close()


def test_a_file_where_the_data_dir_should_be_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "data").write_text("not a directory")
    with pytest.raises((OSError, StoreError), match="exists and is not a directory"):
        open_store(tmp_path / "data")


def test_the_gateway_creates_its_data_dir_0700_and_refuses_an_open_one(tmp_path: Path) -> None:
    async def start(d: Path) -> None:
        gw = Gateway(GatewayConfig(data_dir=str(d), admin_key="root"))
        try:
            await gw.start()
        finally:
            await gw.stop()

    fresh = tmp_path / "fresh"
    asyncio.run(start(fresh))
    assert _mode(fresh) == 0o700 and _mode(fresh / DB_FILENAME) == 0o600
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    with pytest.raises(UnsafeDataDir, match=f"chmod 700 {shared}"):
        asyncio.run(start(shared))
    assert list(shared.iterdir()) == []


def test_the_cli_refuses_an_open_data_dir_with_the_fix(tmp_path: Path) -> None:
    d = tmp_path / "data"
    d.mkdir(mode=0o755)
    runner = CliRunner()
    for args in (["tenants", "list"], ["keys", "list"], ["usage"], ["audit", "verify"]):
        r = runner.invoke(app, [*args, "--data-dir", str(d)])
        assert r.exit_code == 1, (args, r.output)
        assert f"chmod 700 {d}" in r.stderr and r.stdout == "", (args, r.stderr)
        assert r.exception is None or isinstance(r.exception, SystemExit), r.exception  # no traceback
    assert list(d.iterdir()) == []
    os.chmod(d, 0o700)
    r = runner.invoke(app, ["tenants", "list", "--data-dir", str(d)])
    assert r.exit_code == 0 and '"data": []' in r.stdout, r.output
    assert _mode(d / DB_FILENAME) == 0o600


def test_lockgate_serve_refuses_an_open_data_dir_before_starting(tmp_path: Path) -> None:
    d = tmp_path / "data"
    d.mkdir(mode=0o755)
    r = CliRunner().invoke(app, ["serve", "--data-dir", str(d), "--load-format", "fake", "--port", "1"])
    assert r.exit_code == 2, r.output
    assert f"chmod 700 {d}" in r.stderr and "0755" in r.stderr, r.stderr
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception  # no traceback
    assert list(d.iterdir()) == [] and _mode(d) == 0o755


def _open_at_barrier(path: str, barrier: object, errors: object) -> None:
    barrier.wait()  # type: ignore[attr-defined]
    try:
        SQLiteStore(path).close()
    except Exception as e:  # reported to the parent; a child's traceback would be lost
        errors.put(f"{type(e).__name__}: {e}")  # type: ignore[attr-defined]


def test_processes_creating_one_database_together_all_open_it(tmp_path: Path) -> None:
    """API workers start together on a fresh data dir: switching a brand-new file to WAL can be
    refused with 'database is locked' without the busy timeout applying; every opener must get in."""
    import multiprocessing
    ctx = multiprocessing.get_context("fork")
    errors = ctx.Queue()
    for round_ in range(8):
        d = private_dir(tmp_path / f"round{round_}")
        barrier = ctx.Barrier(6)
        procs = [ctx.Process(target=_open_at_barrier, args=(str(d / DB_FILENAME), barrier, errors))
                 for _ in range(6)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
        found = []
        while not errors.empty():
            found.append(errors.get())
        assert found == []
        store = SQLiteStore(d / DB_FILENAME)
        assert store.journal_mode() == "wal"
        store.close()
