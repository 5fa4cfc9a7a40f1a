"""`--store postgresql://...` from the command line: the admin CLI on a real PostgreSQL, changes it
makes reaching a running server, bad URLs refused before anything starts, and a password never
shown in a message, a log or the data directory."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from lockgate.bench.procs import free_port
from lockgate.cli import app
from lockgate.store.postgres import PostgresStore, describe, split_url
from lockgate.store.store_error import StoreError
from tests.server.conftest import ServerProcess, wait_for

runner = CliRunner()


def lg(*args: str, code: int = 0, env: dict[str, str] | None = None):
    r = runner.invoke(app, list(args), env=env)
    assert r.exit_code == code, (args, r.exit_code, r.stdout, r.stderr, r.exception)
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception  # never a traceback
    return r


def test_the_admin_cli_on_postgresql_reaches_a_running_server_within_2_s(pg_url: str, tmp_path: Path) -> None:
    srv = ServerProcess(["--load-format", "fake", "--admin-key", "adm", "--store", pg_url,
                         "--data-dir", str(tmp_path / "unused")], tmp_path / "server.log")
    try:
        # Through the environment, as a password would be given (never the command line).
        t = json.loads(lg("tenants", "create", "--name", "from-cli", env={"LOCKGATE_STORE_URL": pg_url}).stdout)
        key = json.loads(lg("keys", "create", t["id"], "--name", "k", "--store", pg_url).stdout)["key"]
        auth = {"Authorization": f"Bearer {key}"}

        def served() -> bool:
            return httpx.post(f"{srv.base_url}/v1/completions", headers=auth,
                              json={"prompt": "hi", "max_tokens": 1}).status_code == 200

        assert wait_for(served, 2.0)  # the new tenant and key, picked up by the server
        key_id = json.loads(lg("keys", "list", "--tenant-id", t["id"], "--store", pg_url).stdout)["data"][0]["id"]
        lg("keys", "revoke", key_id, "--store", pg_url)
        assert wait_for(lambda: not served(), 2.0)
        rows = json.loads(lg("usage", "--tenant-id", t["id"], "--store", pg_url).stdout)["data"]
        assert len(rows) >= 1 and rows[0]["tenant_id"] == t["id"]
        assert json.loads(lg("audit", "verify", "--store", pg_url).stdout)["ok"] is True
        assert not (tmp_path / "unused").exists()  # with --store nothing is written in --data-dir
    finally:
        srv.stop()


@pytest.mark.parametrize("url,needle", [
    ("mysql://u@h/db", "postgresql://"),
    ("postgresql://u@127.0.0.1/db?pool_size=0", "pool_size must be between 1 and 256"),
    ("postgresql://u@127.0.0.1/db?pool_size=" + str(2**70), "pool_size must be between 1 and 256"),
    ("postgresql://u@127.0.0.1/db?pool_size=lots", "pool_size must be a whole number"),
])
def test_a_bad_store_url_is_refused_before_anything_starts(url: str, needle: str, tmp_path: Path) -> None:
    with pytest.raises(StoreError, match=needle):
        split_url(url)
    r = subprocess.run([sys.executable, "-m", "lockgate.server", "--load-format", "fake", "--store", url],
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2 and needle in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = lg("tenants", "list", "--store", url, code=1)
    assert needle in r.stderr


def test_an_unreachable_store_names_where_but_never_the_password(pg_server, tmp_path: Path) -> None:
    secret = "s3cr3t-Pa55"
    dead = f"postgresql://postgres:{secret}@127.0.0.1:1/nothing"  # nothing listens on port 1
    with pytest.raises(StoreError) as e:
        PostgresStore(dead, connect_timeout_s=2)
    assert "postgresql://postgres@127.0.0.1:1/nothing" in str(e.value) and secret not in str(e.value)
    assert secret not in describe(dead)
    r = lg("tenants", "list", env={"LOCKGATE_STORE_URL": dead}, code=1)
    assert "cannot connect" in r.stderr and secret not in r.stderr + r.stdout
    # The server: exits non-zero at start, naming the database, never the password.
    env = {**os.environ, "LOCKGATE_STORE_URL": dead}
    r = subprocess.run([sys.executable, "-m", "lockgate.server", "--port", str(free_port()), "--load-format", "fake",
                        "--admin-key", "a"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert r.returncode != 0 and "postgresql://postgres@127.0.0.1:1/nothing" in r.stderr
    assert secret not in r.stderr + r.stdout


def test_sslmode_is_honoured(pg_server) -> None:
    # The test server speaks no TLS: sslmode=require must refuse it (a plain connection would not).
    url = pg_server.create_database("ssl_check") + "?sslmode=require"
    with pytest.raises(StoreError, match="SSL"):
        PostgresStore(url, connect_timeout_s=2)
    s = PostgresStore(url.replace("require", "disable") + "&pool_size=2")
    assert s.pool_size == 2 and s.schema_version() >= 7
    s.close()
