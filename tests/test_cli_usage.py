"""`lockgate usage` (rows, totals per group, JSON / CSV / table) and `lockgate usage compare`, end to end
on a real --data-dir."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lockgate.cli import app
from lockgate.store.models import UsageRecord
from lockgate.store.money import nano
from lockgate.store.sqlite import open_store

runner = CliRunner()
T0 = 1_700_000_000.0  # 2023-11-14T22:13:20Z


def lg(data_dir: Path, *args: str, code: int = 0):
    r = runner.invoke(app, [*args, "--data-dir", str(data_dir)])
    assert r.exit_code == code, (args, r.exit_code, r.stdout, r.stderr, r.exception)
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception  # never a traceback
    return r


def out(data_dir: Path, *args: str) -> dict:
    return json.loads(lg(data_dir, *args).stdout)


def _rec(rid: str, key: str, version: str, cost: float, at: float, *, tenant: str = "ten_a", completion: int = 11,
         ttft: float = 0.2, e2e: float = 1.2, finish: str = "stop", status: int = 200) -> UsageRecord:
    return UsageRecord(rid, tenant, key, "m", 100, completion, 0, None, ttft, e2e, finish, status, cost, at,
                       model_version=version, user="u1", priority_class="standard")


RECS = [
    _rec("a1", "key_1", "v1", 0.000056, T0),
    _rec("a2", "key_1", "v1", 0.000056, T0 + 10, finish="error", status=500),
    _rec("a3", "key_2", "v2", 0.000028, T0 + 20, ttft=0.1, e2e=0.6),
    _rec("a4", "key_2", "v2", 0.000028, T0 + 30, ttft=0.1, e2e=0.6),
    _rec("b1", "key_3", "v1", 0.5, T0 + 40, tenant="ten_b"),
]


@pytest.fixture
def d(tmp_path: Path) -> Path:
    s = open_store(tmp_path)
    s.settle(RECS)
    s.close()
    return tmp_path


def test_group_by_key_exact_totals(d: Path) -> None:
    got = out(d, "usage", "--group-by", "key", "--tenant-id", "ten_a")
    assert [(g["key"], g["requests"], g["cost_nusd"], g["errors"]) for g in got["data"]] == [
        ("key_1", 2, 112_000, 1), ("key_2", 2, 56_000, 0)]
    assert got["total"]["cost_nusd"] == 168_000 and got["total"]["cost_usd"] == 0.000168
    both = out(d, "usage", "--group-by", "tenant,version")["data"]
    assert [(g["tenant"], g["version"], g["requests"]) for g in both] == [
        ("ten_b", "m@v1", 1), ("ten_a", "m@v1", 2), ("ten_a", "m@v2", 2)]
    assert [r["request_id"] for r in out(d, "usage", "--version", "m@v2", "--outcome", "ok")["data"]] == ["a4", "a3"]
    assert [r["request_id"] for r in out(d, "usage", "--key-id", "key_1", "--outcome", "error")["data"]] == ["a2"]
    assert out(d, "usage", "--group-by", "user", "--tenant-id", "ten_a")["data"][0]["user"] == "u1"


def test_csv_and_default_json_when_piped(d: Path) -> None:
    text = lg(d, "usage", "--group-by", "version", "--format", "csv").stdout
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [(r["version"], r["cost_usd"], r["cost_nusd"]) for r in rows] == [("m@v1", "0.500112", "500112000"),
                                                                             ("m@v2", "0.000056", "56000")]
    # not a terminal: JSON, as scripts expect
    assert json.loads(lg(d, "usage").stdout)["total"]["requests"] == len(RECS)


def test_table_prints_costs_rounded(d: Path) -> None:
    text = lg(d, "usage", "--group-by", "key", "--format", "table").stdout
    assert "usage by key" in text and "key_1" in text and "total" in text
    assert "$0.000112" in text and "$0.5000" in text and "$0.5002" in text  # key_3, and the total
    assert "e-05" not in text and "5.6" not in text
    rows = lg(d, "usage", "--format", "table", "--tenant-id", "ten_a").stdout
    assert "$0.000056" in rows and "a1" in rows
    empty = lg(d, "usage", "--format", "table", "--tenant-id", "ten_nobody").stdout
    assert "no usage" in empty


def test_compare_two_versions(d: Path) -> None:
    c = out(d, "usage", "compare", "--a-version", "m@v1", "--b-version", "m@v2", "--tenant-id", "ten_a")
    a, b = c["a"], c["b"]
    assert (a["requests"], b["requests"]) == (2, 2) and (a["cost_nusd"], b["cost_nusd"]) == (112_000, 56_000)
    assert c["change"]["cost_usd"] == pytest.approx(-0.5)
    assert a["cost_per_1k_tokens_usd"] == pytest.approx(0.000112 * 1000 / 222)
    assert a["error_rate"] == 0.5 and b["error_rate"] == 0.0 and c["change"]["error_rate"] == -1.0
    assert a["ttft_s"]["p50"] == pytest.approx(0.2) and b["ttft_s"]["p99"] == pytest.approx(0.1)
    assert a["tpot_s"]["p95"] == pytest.approx(0.1) and b["tpot_s"]["p50"] == pytest.approx(0.05)
    assert c["change"]["tpot_s"]["p50"] == pytest.approx(-0.5)
    table = lg(d, "usage", "compare", "--a-version", "m@v1", "--b-version", "m@v2", "--format", "table").stdout
    assert "cost per 1k tokens" in table and "TPOT p95" in table and "-50.0%" in table
    win = out(d, "usage", "compare", "--a-since", str(T0), "--a-until", str(T0 + 15), "--b-since", str(T0 + 15),
              "--b-until", "2023-11-15")
    assert win["a"]["requests"] == 2 and win["b"]["requests"] == 3


@pytest.mark.parametrize("args,needle", [
    (["usage", "--group-by", "week"], "tenant, key, model, version, class, user, day, hour, outcome"),
    (["usage", "--group-by", "key,model,key"], "more than once"),
    (["usage", "--since", "2023-11-15", "--until", "2023-11-14"], "until"),
    (["usage", "--outcome", "fine"], "outcome"),
    (["usage", "--limit", "0"], "limit"),
    (["usage", "--limit", str(2**70)], "limit"),
    (["usage", "--key-id", "k" * 100_000], "too long"),
    (["usage", "compare"], "a_version"),
    (["usage", "compare", "--a-version", "m@v1"], "b_version"),
    (["usage", "compare", "--a-since", "2023-11-15", "--a-until", "2023-11-14", "--b-version", "m@v1"], "a_until"),
])
def test_bad_input_is_a_clear_error(d: Path, args: list[str], needle: str) -> None:
    r = lg(d, *args, code=1)
    assert r.stderr.startswith("error: ") and needle in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""


@pytest.mark.parametrize("args", [["usage", "--format", "xml"], ["usage", "compare", "--format", "csv"],
                                  ["usage", "--limit", "ten"]])
def test_bad_option_syntax_exits_2(d: Path, args: list[str]) -> None:
    r = lg(d, *args, code=2)
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_sums_in_nano_usd_match_the_rows(d: Path) -> None:
    total = out(d, "usage", "--group-by", "day")["total"]
    assert total["cost_nusd"] == sum(nano(r.cost_usd) for r in RECS)


def test_compare_takes_the_groups_data_dir_and_refuses_misplaced_filters(d: Path) -> None:
    r = runner.invoke(app, ["usage", "--data-dir", str(d), "compare", "--a-version", "m@v1", "--b-version", "m@v2"])
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["a"]["requests"] == 3  # a1, a2 and ten_b's b1
    r = runner.invoke(app, ["usage", "--data-dir", str(d), "--tenant-id", "ten_a", "compare", "--a-version", "m@v1",
                            "--b-version", "m@v2"])
    assert r.exit_code == 2 and "--tenant-id" in r.stderr and r.stdout == ""  # never silently all tenants
