"""`lockgate tenants | keys | usage | audit` end to end on a real --data-dir."""
from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lockgate.cli import app
from lockgate.gateway.tenants import hash_key
from lockgate.store.models import UsageRecord
from lockgate.store.sqlite import DB_FILENAME, open_store

runner = CliRunner()


def lg(data_dir: Path, *args: str, code: int = 0):
    r = runner.invoke(app, [*args, "--data-dir", str(data_dir)])
    assert r.exit_code == code, (args, r.exit_code, r.stdout, r.stderr, r.exception)
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception  # never a traceback
    return r


def out(data_dir: Path, *args: str) -> dict:
    return json.loads(lg(data_dir, *args).stdout)


def test_tenant_lifecycle(tmp_path: Path) -> None:
    d = tmp_path / "data"  # created on first use
    t = out(d, "tenants", "create", "--name", "acme", "--models", "m1,m2", "--rpm", "60", "--tpm", "1000",
            "--max-concurrency", "2", "--max-tokens", "128", "--priority", "batch", "--budget-usd", "9.5",
            "--budget-period", "day", "--price", "*=1,2", "--price", "m1=0.5,1,0.1")
    assert (d / DB_FILENAME).exists()
    assert t["models"] == ["m1", "m2"] and t["rpm"] == 60 and t["priority"] == "batch" and t["budget_usd"] == 9.5
    assert t["prices"]["m1"] == {"prompt": 0.5, "completion": 1.0, "cached_prompt": 0.1, "cache_hit": 0.0}
    assert out(d, "tenants", "get", t["id"]) == t
    u = out(d, "tenants", "update", t["id"], "--rpm", "5", "--unset", "budget_usd")
    assert u["rpm"] == 5 and u["budget_usd"] is None and u["tpm"] == 1000
    j = out(d, "tenants", "create", "--json", '{"name": "from json", "rpm": 3}', "--tpm", "7")
    assert j["name"] == "from json" and j["rpm"] == 3 and j["tpm"] == 7
    assert [x["id"] for x in out(d, "tenants", "list")["data"]] == [t["id"], j["id"]]
    assert out(d, "tenants", "delete", t["id"])["deleted"] is True
    assert [x["id"] for x in out(d, "tenants", "list")["data"]] == [j["id"]]
    r = lg(d, "tenants", "get", t["id"], code=1)
    assert "not found" in r.stderr
    audit = out(d, "audit", "list")["data"]
    assert [(a["actor"], a["action"]) for a in audit] == [("cli", "tenant.create"), ("cli", "tenant.update"),
                                                          ("cli", "tenant.create"), ("cli", "tenant.delete")]


@pytest.mark.parametrize("args,needle", [
    (["tenants", "create", "--name", "a", "--rpm", str(2**70)], "rpm"),
    (["tenants", "create", "--name", "a", "--budget-usd", "-1"], "budget_usd"),
    (["tenants", "create", "--name", "a", "--budget-usd", "nan"], "budget_usd"),
    (["tenants", "create", "--name", "a", "--priority", "urgent"], "priority"),
    (["tenants", "create"], "name"),
    (["tenants", "create", "--json", '{"name": "a", "rmp": 1}'], "rmp"),
    (["tenants", "update", "ten_nope", "--rpm", "1"], "not found"),
    (["keys", "create", "ten_nope"], "not found"),
    (["keys", "revoke", "key_nope"], "not found"),
    (["usage", "--group-by", "week"], "group_by"),
    (["usage", "--since", "last tuesday"], "since"),
])
def test_bad_input_is_a_clear_error(tmp_path: Path, args: list[str], needle: str) -> None:
    r = lg(tmp_path, *args, code=1)
    assert r.stderr.startswith("error: ") and needle in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize("args,needle", [
    (["tenants", "create", "--name", "a", "--price", "nonsense"], "--price"),
    (["tenants", "create", "--name", "a", "--price", "*=a,b"], "numbers"),
    (["tenants", "create", "--json", "{"], "--json"),
    (["tenants", "create", "--json", "[]"], "--json"),
])
def test_bad_option_syntax_exits_2(tmp_path: Path, args: list[str], needle: str) -> None:
    r = lg(tmp_path, *args, code=2)
    assert needle in r.stderr


def test_keys_create_list_revoke(tmp_path: Path) -> None:
    t = out(tmp_path, "tenants", "create", "--name", "a")
    k = out(tmp_path, "keys", "create", t["id"], "--name", "ci", "--scope", "inference", "--scope", "admin",
            "--expires-at", "2099-06-01T00:00:00Z", "--rpm", "3")
    assert k["key"].startswith("lg-") and k["scopes"] == ["inference", "admin"] and k["rpm"] == 3
    listed = out(tmp_path, "keys", "list", "--tenant-id", t["id"])["data"]
    assert [x["id"] for x in listed] == [k["id"]] and "key" not in listed[0]
    assert k["key"] not in lg(tmp_path, "keys", "list").stdout
    store = open_store(tmp_path)
    assert store.get_key_by_hash(hash_key(k["key"])) is not None
    store.close()
    assert out(tmp_path, "keys", "revoke", k["id"])["revoked_at"] is not None
    assert out(tmp_path, "keys", "list")["data"][0]["revoked_at"] is not None
    assert k["key"].encode() not in (tmp_path / DB_FILENAME).read_bytes()
    lg(tmp_path, "keys", "create", t["id"], "--scope", "root", code=1)
    lg(tmp_path, "keys", "create", t["id"], "--expires-at", "2001-01-01", code=1)


def test_usage_json_and_csv(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    store.settle([UsageRecord("r1", "ten_a", "k", "m1", 10, 5, 0, None, 0.1, 0.2, "stop", 200, 0.5, 1_700_000_000.0),
                  UsageRecord("r2", "ten_b", "k", "m2", 20, 5, 3, None, None, None, "abort", 499, 1.5,
                              1_700_000_100.0)])
    store.close()
    rows = out(tmp_path, "usage")["data"]
    assert [r["request_id"] for r in rows] == ["r2", "r1"]
    assert [r["request_id"] for r in out(tmp_path, "usage", "--tenant-id", "ten_a")["data"]] == ["r1"]
    assert [r["request_id"] for r in out(tmp_path, "usage", "--model", "m2")["data"]] == ["r2"]
    assert out(tmp_path, "usage", "--since", "1700000050")["data"][0]["request_id"] == "r2"
    assert out(tmp_path, "usage", "--until", "2023-11-14T22:14:00Z")["data"][0]["request_id"] == "r1"
    text = lg(tmp_path, "usage", "--group-by", "model", "--format", "csv").stdout
    got = list(csv.DictReader(io.StringIO(text)))
    assert [(r["model"], r["requests"], r["cost_usd"]) for r in got] == [("m2", "1", "1.5"), ("m1", "1", "0.5")]
    day = out(tmp_path, "usage", "--group-by", "day")["data"]
    assert day == [{"day": "2023-11-14", "requests": 2, "prompt_tokens": 30, "completion_tokens": 10,
                    "cached_tokens": 3, "cost_usd": 2.0, "cost_nusd": 2_000_000_000, "errors": 0}]


def test_audit_verify_detects_a_tampered_file(tmp_path: Path) -> None:
    t = out(tmp_path, "tenants", "create", "--name", "a", "--rpm", "5")
    out(tmp_path, "tenants", "update", t["id"], "--rpm", "6")
    out(tmp_path, "tenants", "update", t["id"], "--rpm", "7")
    v = out(tmp_path, "audit", "verify")
    assert v["ok"] is True and v["records"] == 3 and v["first_bad"] is None
    with sqlite3.connect(tmp_path / DB_FILENAME) as raw:
        raw.execute("""UPDATE audit SET details = '{"rpm":600}' WHERE id = 2""")
    r = lg(tmp_path, "audit", "verify", code=1)
    v = json.loads(r.stdout)
    assert v["ok"] is False and v["first_bad"] == 2 and "broken at record 2" in r.stderr


def test_a_newer_database_is_refused_clearly(tmp_path: Path) -> None:
    open_store(tmp_path).close()
    with sqlite3.connect(tmp_path / DB_FILENAME) as raw:
        raw.execute("PRAGMA user_version = 999")
    r = lg(tmp_path, "tenants", "list", code=1)
    assert "newer" in r.stderr


def test_env_data_dir(tmp_path: Path) -> None:
    r = runner.invoke(app, ["tenants", "create", "--name", "env"], env={"LOCKGATE_DATA_DIR": str(tmp_path / "envdir")})
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["name"] == "env" and (tmp_path / "envdir" / DB_FILENAME).exists()


def test_real_process_errors_without_a_traceback(tmp_path: Path) -> None:
    env = {**os.environ, "LOCKGATE_DATA_DIR": str(tmp_path / "envdir")}
    r = subprocess.run([sys.executable, "-m", "lockgate.cli", "tenants", "update", "ten_nope", "--rpm", "1"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.startswith("error: ") and "not found" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and (tmp_path / "envdir" / DB_FILENAME).exists()
