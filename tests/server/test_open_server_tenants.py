"""An open server (no admin key, no tenants) whose data directory gets its first tenant from the
CLI meanwhile: it stays open until restarted (its clients keep working, it says so once in its
log), and a restart on that data directory requires keys."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from lockgate.cli import app as cli_app
from lockgate.cli_admin import FIRST_TENANT_NOTE
from tests.server.conftest import ServerProcess, start_server, wait_for

MODEL = "SmolLM2-135M-Instruct"
WARNING = "but this server started open and stays open (no keys needed) until it is restarted"


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    tmp = tmp_path_factory.mktemp("open-server")
    data = tmp / "data"  # does not exist yet: the CLI creates it with the first tenant
    srv = start_server(tmp, "--load-format", "fake", "--data-dir", str(data))
    yield srv, data
    srv.stop()


def _complete(base: str, headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.post(f"{base}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2},
                      headers=headers or {}, timeout=30)


def test_the_first_tenant_leaves_a_running_open_server_open_until_restarted(
        open_server: tuple[ServerProcess, Path], tmp_path: Path) -> None:
    srv, data = open_server
    assert _complete(srv.base_url).status_code == 200
    r = CliRunner().invoke(cli_app, ["tenants", "create", "--name", "acme", "--data-dir", str(data)])
    assert r.exit_code == 0, r.stderr
    assert FIRST_TENANT_NOTE in r.stderr  # the operator is told what it means for servers
    tenant = json.loads(r.stdout)["id"]
    r = CliRunner().invoke(cli_app, ["keys", "create", tenant, "--data-dir", str(data)])
    key = json.loads(r.stdout)["key"]
    # The server notices the tenants within its refresh interval, says so once, and stays open.
    assert wait_for(lambda: WARNING in srv.log_text(), 15), srv.log_text()[-2000:]
    assert srv.log_text().count(WARNING) == 1
    for headers in ({}, {"Authorization": f"Bearer {key}"}):
        assert _complete(srv.base_url, headers).status_code == 200
    admin = httpx.get(f"{srv.base_url}/admin/tenants", timeout=30)  # as before: no admin API when open
    assert admin.status_code == 403 and admin.json()["error"]["code"] == "admin_disabled"
    # A server started on that data directory now requires keys.
    keyed = start_server(tmp_path, "--load-format", "fake", "--data-dir", str(data))
    try:
        assert _complete(keyed.base_url).status_code == 401
        assert _complete(keyed.base_url, {"Authorization": f"Bearer {key}"}).status_code == 200
    finally:
        keyed.stop()
