"""The CLI a newcomer meets first: `lockgate --help` without the server's or the engine's imports,
`keys list TENANT_ID` as `keys create TENANT_ID`, the note the first tenant prints, and `serve` on a
port in use failing before the lifecycle is imported."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lockgate.cli import app
from lockgate.cli_admin import FIRST_TENANT_NOTE

runner = CliRunner()

# Runs `lockgate --help` as the entry point does, then names the heavy packages it imported.
_PROBE = """
import sys
sys.argv = ["lockgate", "--help"]
from lockgate.cli import main
try:
    main()
except SystemExit:
    pass
heavy = [m for m in ("torch", "fastapi", "uvicorn", "numpy", "transformers", "lockgate.server.app",
                     "lockgate.lifecycle.registry", "lockgate.engine.llm_engine") if m in sys.modules]
print("HEAVY=" + ",".join(heavy))
"""


def test_help_imports_neither_torch_nor_fastapi() -> None:
    r = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "serve" in r.stdout and "tenants" in r.stdout  # the commands are all listed
    assert r.stdout.strip().splitlines()[-1] == "HEAVY=", r.stdout[-300:]


# `lockgate serve ARGS...` as the entry point runs it; its exit status, then the heavy modules it imported.
_SERVE_PROBE = """
import sys
sys.argv = ["lockgate", "serve", *sys.argv[1:]]
from lockgate.cli import main
code = 0
try:
    main()
except SystemExit as e:
    code = e.code
heavy = [m for m in ("torch", "fastapi", "uvicorn", "lockgate.lifecycle.build", "lockgate.lifecycle.registry",
                     "lockgate.server.config", "lockgate.server.app") if m in sys.modules]
print(f"CODE={code} HEAVY=" + ",".join(heavy))
"""


def test_serve_on_a_port_in_use_fails_before_the_option_checks_import_the_lifecycle(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = subprocess.run([sys.executable, "-c", _SERVE_PROBE, "--port", str(port), "--data-dir",
                            str(tmp_path / "data")], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip().splitlines()[-1] == "CODE=1 HEAVY=", (r.stdout[-300:], r.stderr[-2000:])
    assert f"error: port {port} on 127.0.0.1 is already in use" in r.stderr and "--port" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "data").exists()


def test_a_bad_option_lets_the_held_port_go(tmp_path: Path) -> None:
    from lockgate.server.launch import serve

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(ValueError, match="replicas") as refused:  # holds serve's frame (and what it bound)
        serve(port=port, replicas=0, data_dir=str(tmp_path / "data"))
    with socket.socket() as again:
        again.bind(("127.0.0.1", port))  # EADDRINUSE if serve had kept it
    assert refused.value is not None


def test_serve_help_still_lists_its_options() -> None:
    r = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "300", "TERMINAL_WIDTH": "300"})
    assert r.exit_code == 0 and "--generation-config" in r.stdout and "--port" in r.stdout


def test_cli_schemas_global_namespace_is_the_gateways() -> None:
    from lockgate.cli_schemas import GLOBAL as CLI_GLOBAL
    from lockgate.gateway.schemas import GLOBAL

    assert CLI_GLOBAL == GLOBAL


def _lg(data_dir: Path, *args: str, code: int = 0):
    r = runner.invoke(app, [*args, "--data-dir", str(data_dir)])
    assert r.exit_code == code, (args, r.exit_code, r.stdout, r.stderr)
    return r


def test_keys_list_takes_the_tenant_as_keys_create_does(tmp_path: Path) -> None:
    d = tmp_path / "data"
    first = _lg(d, "tenants", "create", "--name", "a")
    assert FIRST_TENANT_NOTE in first.stderr  # the data dir's first tenant: what it means for servers
    a = json.loads(first.stdout)["id"]
    second = _lg(d, "tenants", "create", "--name", "b")
    assert FIRST_TENANT_NOTE not in second.stderr
    b = json.loads(second.stdout)["id"]
    ka = json.loads(_lg(d, "keys", "create", a).stdout)["id"]
    kb = json.loads(_lg(d, "keys", "create", b).stdout)["id"]
    positional = json.loads(_lg(d, "keys", "list", a).stdout)
    assert [k["id"] for k in positional["data"]] == [ka]
    assert json.loads(_lg(d, "keys", "list", "--tenant-id", a).stdout) == positional  # the option still works
    assert json.loads(_lg(d, "keys", "list", a, "--tenant-id", a).stdout) == positional  # both, agreeing
    assert {k["id"] for k in json.loads(_lg(d, "keys", "list").stdout)["data"]} == {ka, kb}
    r = _lg(d, "keys", "list", a, "--tenant-id", b, code=2)
    assert "error: TENANT_ID" in r.stderr and "disagree" in r.stderr and r.stdout == ""
    r = _lg(d, "keys", "list", "ten_nope", code=1)
    assert "not found" in r.stderr
