"""`lockgate bench` end to end against a live fake-engine server of known capacity."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from typer.testing import CliRunner

from lockgate.bench.procs import free_port
from lockgate.bench.workload import Workload, WorkloadConfig
from lockgate.cli import app
from tests.bench.conftest import CAPACITY_RPS, MAX_NUM_SEQS, MAX_QUEUED, OUTPUT_LEN, STEP_DELAY_S
from tests.server.conftest import ServerProcess

LOCKGATE = str(Path(sys.executable).with_name("lockgate"))
MODEL = "SmolLM2-135M-Instruct"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
runner = CliRunner()


def bench(*args: str, code: int = 0) -> Any:
    r = runner.invoke(app, ["bench", *args])
    assert r.exit_code == code, (args, r.exit_code, r.stdout, r.stderr, r.exception)
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception  # never a traceback
    return r


def load(out: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    res = json.loads((out / "result.json").read_text())
    recs = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    return res, recs


def nulls(x: Any, path: str = "") -> list[str]:
    """Paths of every null in a JSON value; a timeline slice may lack latency (nothing was sent in it)."""
    if x is None:
        return [path]
    if isinstance(x, dict):
        return [p for k, v in x.items() for p in nulls(v, f"{path}.{k}")
                if not (".timeline" in path and k.endswith("_s") and k != "t_s")]
    if isinstance(x, list):
        return [p for i, v in enumerate(x) for p in nulls(v, f"{path}[{i}]")]
    return []


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    with Image.open(path) as im:
        im.verify()
        assert im.size[0] > 400 and im.size[1] > 300


def success_count(srv: ServerProcess) -> float:
    return sum(v for k, v in srv.metrics().items()  # every tenant and class label set
               if k.startswith("lockgate:request_success_total{") and 'finished_reason="length"' in k)


@pytest.fixture(scope="module")
def full_run(fake_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The real command in its own process: constant 15 req/s for 2 s, two tenants, an SLO, every output."""
    out = tmp_path_factory.mktemp("full")
    p = subprocess.run([LOCKGATE, "bench", "--base-url", f"{fake_server.base_url}/v1", "--rate", "15",
                        "--arrivals", "constant", "--duration", "2", "--input-len", "32", "--output-len",
                        str(OUTPUT_LEN), "--ignore-eos", "--slo", "ttft_p95<2,tpot_p95<500ms",
                        "--tenant", "a::3:interactive", "--tenant", "b::1:batch", "--seed", "1",
                        "--label", "full", "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    return out, p.stdout


def test_full_report_every_field_filled(full_run: tuple[Path, str]) -> None:
    out, stdout = full_run
    res, recs = load(out)
    assert nulls(res) == []
    assert res["schema"] == "lockgate-bench/1" and res["label"] == "full"
    assert res["target"]["model"] == MODEL  # found through GET /v1/models
    assert res["config"]["shape"] == "rate" and res["config"]["rate"] == 15
    assert "api_key" not in res["config"]
    n = 30  # constant arrivals: 15/s for 2 s
    assert res["requests"]["count"] == n == len(recs) and res["requests"]["by_status"] == {"ok": n}
    g = res["summary"]["overall"]
    assert (g["requests"], g["ok"], g["cancelled"], g["rejected"], g["errors"]) == (n, n, 0, 0, 0)
    # ignore_eos: every request ran to max_tokens (usage counts tokens; a chunk may carry several when the
    # server's output falls behind, so chunks can be fewer)
    assert g["output_tokens"] == n * OUTPUT_LEN
    assert all(r["output_tokens"] == OUTPUT_LEN and 1 <= r["chunks"] <= OUTPUT_LEN and r["prompt_tokens"] >= 32
               for r in recs)
    assert sum(r["chunks"] for r in recs) >= 0.9 * n * OUTPUT_LEN  # mostly one token per chunk
    assert g["itl"]["count"] == sum(r["chunks"] - 1 for r in recs)
    for m in ("ttft", "tpot", "itl", "e2e"):
        d = g[m]
        assert d["min"] <= d["p50"] <= d["p90"] <= d["p95"] <= d["p99"] <= d["max"], m
    # the fake engine sleeps STEP_DELAY_S every step: no token can come faster on average
    assert g["tpot"]["p50"] >= 0.95 * STEP_DELAY_S
    assert g["e2e"]["p50"] >= g["ttft"]["p50"] + (OUTPUT_LEN - 1) * 0.95 * STEP_DELAY_S
    dur = res["summary"]["duration_s"]
    assert 1.9 < dur < 30
    assert g["request_rate"] == pytest.approx(n / dur)
    assert g["total_token_rate"] == pytest.approx((g["prompt_tokens"] + g["output_tokens"]) / dur)
    assert g["goodput"] == pytest.approx(g["goodput_fraction"] * n / dur)
    assert [t["term"] for t in g["slo"]] == ["ttft_p95<2", "tpot_p95<0.5"]
    # tenants split 3:1 by weight (seeded), classes follow them
    s = res["summary"]
    assert set(s["by_tenant"]) == {"a", "b"} and set(s["by_class"]) == {"interactive", "batch"}
    assert sum(t["requests"] for t in s["by_tenant"].values()) == n
    assert s["by_tenant"]["a"]["requests"] > s["by_tenant"]["b"]["requests"]
    assert s["by_class"]["batch"]["requests"] == s["by_tenant"]["b"]["requests"]
    w = res["summary"]["timeline"][0]["t_s"], res["summary"]["timeline"][1]["t_s"]
    width = w[1] - w[0]
    assert sum(b["sent_rate"] * width for b in s["timeline"]) == pytest.approx(n)
    for name in ("latency_cdf.png", "timeline.png"):
        assert_png(out / name)
    assert not (out / "sweep.png").exists()
    for text in ("Latency (ms)", "Throughput", "SLO", "By tenant", "By priority class", "result.json"):
        assert text in stdout


def test_cancelled_streams_are_cancelled(fake_server: ServerProcess, tmp_path: Path) -> None:
    before = success_count(fake_server)
    bench("--base-url", fake_server.base_url, "--model", MODEL, "--concurrency", "4", "--num-requests", "20",
          "--cancel-fraction", "0.5", "--input-len", "8", "--output-len", "24", "--ignore-eos", "--seed", "3",
          "--out", str(tmp_path), "--no-plots")
    res, recs = load(tmp_path)
    g = res["summary"]["overall"]
    cancelled = [r for r in recs if r["status"] == "cancelled"]
    planned = [Workload(WorkloadConfig(input_len=8, output_len=24, cancel_fraction=0.5, seed=3)).spec(i).cancel_after
               for i in range(20)]
    assert 3 <= len(cancelled) <= 17
    assert g["cancelled"] == len(cancelled) == res["requests"]["cancel_planned"] == sum(c > 0 for c in planned)
    assert g["ok"] == 20 - len(cancelled) and g["errors"] == g["rejected"] == 0
    for r in cancelled:  # the client stopped reading at its planned chunk, before the end
        assert r["chunks"] == r["cancel_after"] == planned[r["index"]] < r["max_tokens"]
    assert all(r["output_tokens"] == 24 for r in recs if r["status"] == "ok")
    # the server saw the disconnects: cancelled streams did not run to their length there (a stream
    # cancelled a few tokens before its end may still finish before the server notices)
    late = sum(r["max_tokens"] - r["cancel_after"] <= 5 for r in cancelled)
    done = success_count(fake_server) - before
    assert g["ok"] <= done <= g["ok"] + late


def test_ramp_with_a_tenants_file(fake_server: ServerProcess, tmp_path: Path) -> None:
    f = tmp_path / "tenants.json"
    f.write_text(json.dumps([{"name": "gold", "weight": 1, "class": "interactive"},
                             {"name": "bulk", "key": "", "weight": 1, "class": "batch"}]))
    bench("--base-url", fake_server.base_url, "--ramp", "4:26", "--duration", "1", "--arrivals", "constant",
          "--input-len", "8", "--output-len", "4", "--ignore-eos", "--tenants", str(f), "--seed", "2",
          "--out", str(tmp_path / "out"), "--no-plots")
    res, recs = load(tmp_path / "out")
    assert res["config"]["shape"] == "ramp" and res["config"]["tenants_file"] == str(f)
    assert len(recs) == 15  # the area under a 4 -> 26 req/s ramp over 1 s
    starts = sorted(r["scheduled_s"] for r in recs)
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert gaps[0] > 2 * gaps[-1]  # the rate rose
    assert {r["tenant"]: r["priority_class"] for r in recs} == {"gold": "interactive", "bulk": "batch"}
    assert res["summary"]["overall"]["ok"] + res["summary"]["overall"]["rejected"] == 15


def test_synthetic_prompts_are_about_n_tokens(fake_server: ServerProcess) -> None:
    import random

    from lockgate.bench.workload import words

    for n in (16, 100, 1000):
        text = words(n, random.Random(n))
        count = httpx.post(f"{fake_server.base_url}/tokenize", json={"model": MODEL, "prompt": text},
                           timeout=30).json()["count"]
        assert abs(count - n) <= max(2, 0.05 * n), (n, count)


def test_chat_endpoint_with_prompts_file_and_prefix_groups(fake_server: ServerProcess, tmp_path: Path) -> None:
    f = tmp_path / "prompts.jsonl"
    f.write_text('{"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 4}\n'
                 '{"prompt": "Name three colors.", "max_tokens": 6}\n')
    out = tmp_path / "out"
    bench("--base-url", f"{fake_server.base_url}/v1", "--endpoint", "chat", "--prompts", str(f), "--concurrency",
          "2", "--num-requests", "6", "--prefix-groups", "2", "--prefix-len", "50", "--out", str(out), "--no-plots")
    res, recs = load(out)
    assert res["summary"]["overall"]["ok"] == 6
    assert sorted({r["max_tokens"] for r in recs}) == [4, 6]
    # the chat template and the 50-token shared prefix (a system message) are in the prompt
    assert all(r["prompt_tokens"] > 50 for r in recs)
    assert all(r["output_tokens"] <= r["max_tokens"] for r in recs)


def test_sweep_finds_the_known_capacity(fake_server: ServerProcess, tmp_path: Path) -> None:
    r = bench("--base-url", f"{fake_server.base_url}/v1", "--model", MODEL, "--sweep", "--slo", "e2e_p90<0.5",
              "--arrivals", "constant", "--sweep-start", "8", "--duration", "1", "--input-len", "16",
              "--output-len", str(OUTPUT_LEN), "--ignore-eos", "--sweep-tolerance", "0.2", "--out", str(tmp_path))
    res, _ = load(tmp_path)
    sw = res["sweep"]
    assert sw["found"] and sw["bracketed"]
    assert 0.5 * CAPACITY_RPS <= sw["best_rate"] <= 1.5 * CAPACITY_RPS, (sw["best_rate"], CAPACITY_RPS)
    rates = [p["rate"] for p in sw["probes"]]
    assert rates[:3] == [8, 16, 32] or rates[0] == 8  # growth from the start rate
    passed = [p["rate"] for p in sw["probes"] if p["passed"]]
    failed = [p["rate"] for p in sw["probes"] if not p["passed"]]
    assert max(passed) == sw["best_rate"] and min(failed) > sw["best_rate"]
    assert (min(failed) - sw["best_rate"]) / sw["best_rate"] <= 0.2  # bisected to the tolerance
    assert all(p["reason"].startswith("e2e_p90=") for p in sw["probes"] if not p["passed"])
    # overload shows: above capacity the server completes about its capacity, not the offered rate
    top = max(sw["probes"], key=lambda p: p["rate"])
    assert top["summary"]["overall"]["request_rate"] < 0.8 * top["rate"]
    assert res["summary"]["overall"]["slo_passed"]  # the reported probe is the best passing one
    assert "Highest rate meeting the SLO" in r.stdout
    assert_png(tmp_path / "sweep.png")


def test_rejections_by_status_and_code(fake_server: ServerProcess, tmp_path: Path) -> None:
    srv = fake_server
    before = srv.metrics().get("lockgate:requests_rejected_total", 0.0)
    n = 48
    r = bench("--base-url", srv.base_url, "--burst", str(n), "--burst-interval", "1", "--num-requests", str(n),
              "--input-len", "8", "--output-len", "3", "--ignore-eos", "--out", str(tmp_path), "--no-plots")
    res, recs = load(tmp_path)
    g = res["summary"]["overall"]
    rejected = [x for x in recs if x["status"] == "rejected"]
    # what got in: the queue, the running batch, and what finished while the burst arrived
    assert g["rejected"] == len(rejected) >= n - MAX_QUEUED - 2 * MAX_NUM_SEQS
    assert g["ok"] + g["rejected"] == n
    assert {(x["http_status"], x["error_code"]) for x in rejected} == {(429, "queue_full")}
    [f] = g["failures"]
    assert (f["status"], f["http_status"], f["code"], f["count"]) == ("rejected", 429, "queue_full", len(rejected))
    assert g["error_rate"] == pytest.approx(len(rejected) / n)
    assert srv.metrics()["lockgate:requests_rejected_total"] - before == len(rejected)  # the server agrees
    assert "queue_full" in r.stdout


@pytest.fixture(scope="module")
def closed_loop_run(fake_server: ServerProcess, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("one-client")
    bench("--base-url", fake_server.base_url, "--concurrency", "1", "--num-requests", "6", "--input-len", "32",
          "--output-len", str(OUTPUT_LEN), "--ignore-eos", "--label", "one-client", "--out", str(out), "--no-plots")
    return out


def test_compare_two_runs(full_run: tuple[Path, str], closed_loop_run: Path) -> None:
    a, _ = load(full_run[0])
    b, _ = load(closed_loop_run)
    r = bench("--compare", str(full_run[0] / "result.json"), str(closed_loop_run / "result.json"))
    assert "A: full" in r.stdout and "B: one-client" in r.stdout
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:5]]
            for line in r.stdout.splitlines() if line.count("│") >= 5}
    ga, gb = a["summary"]["overall"], b["summary"]["overall"]
    va, vb, ratio = rows["completed requests/s"]
    assert float(va) == pytest.approx(ga["request_rate"], abs=1e-3)
    assert float(vb) == pytest.approx(gb["request_rate"], abs=1e-3)
    assert float(ratio.rstrip("x")) == pytest.approx(gb["request_rate"] / ga["request_rate"], abs=0.006)
    # one client at a time completes fewer requests per second than 15 req/s offered to 4 slots
    assert gb["request_rate"] < ga["request_rate"]
    va, vb, ratio = rows["TTFT p95 (ms)"]
    assert float(ratio.rstrip("x")) == pytest.approx(gb["ttft"]["p95"] / ga["ttft"]["p95"], abs=0.006)
    assert "sweep: highest rate within SLO (req/s)" not in rows  # neither run swept


@pytest.mark.parametrize("args, fragment", [
    (["--rate", "0"], "--rate must be > 0"),
    (["--rate", "-3"], "--rate must be > 0"),
    (["--rate", "1", "--slo", "ttft<0.5"], "bad SLO term"),
    (["--rate", "1", "--slo", "ttft_p95<fast"], "bad SLO term"),
    (["--rate", "1", "--prompts", "/nonexistent/prompts.jsonl"], "no such file"),
    (["--rate", "1", "--arrivals", "gamma"], "--arrivals"),
    (["--rate", "1", "--endpoint", "embeddings"], "--endpoint"),
    (["--rate", "1", "--len-dist", "zipf"], "--len-dist"),
    ([], "choose one load shape"),
    (["--rate", "1", "--concurrency", "2"], "choose one load shape"),
    (["--sweep"], "--sweep needs --slo"),
    (["--sweep", "--slo", "ttft_p95<1", "--rate", "3"], "--sweep picks the rates"),
    (["--ramp", "1:x", "--duration", "5"], "--ramp"),
    (["--ramp", "1:5"], "--ramp needs --duration"),
    (["--burst", "5"], "--burst-interval"),
    (["--rate", "1", "--tenant", "acme"], "name:key:weight"),
    (["--rate", "1", "--cancel-fraction", "1.5"], "--cancel-fraction"),
    (["--rate", "1", "--duration", "0"], "--duration"),
    (["--rate", "1", "--prefix-groups", "2"], "--prefix-len"),
    (["--rate", "1", "--base-url", "localhost:8000"], "--base-url"),
    (["--compare", "/nonexistent/a.json", "/nonexistent/b.json"], "no such file"),
])
def test_bad_input_exits_2(args: list[str], fragment: str) -> None:
    r = bench(*args, code=2)
    assert "error:" in r.stderr and fragment in r.stderr, r.stderr


def test_bad_option_types_exit_2() -> None:
    r = runner.invoke(app, ["bench", "--rate", "fast"])
    assert r.exit_code == 2 and "Invalid value" in r.stderr


def test_compare_rejects_a_file_that_is_not_a_result(tmp_path: Path) -> None:
    f = tmp_path / "x.json"
    f.write_text('{"hello": 1}')
    r = bench("--compare", str(f), str(f), code=2)
    assert "not a lockgate bench result" in r.stderr


def test_unreachable_server_exits_1() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"
    r = bench("--base-url", url, "--rate", "5", "--num-requests", "2", code=1)
    assert "cannot list models" in r.stderr
    r = bench("--base-url", url, "--model", MODEL, "--concurrency", "1", "--num-requests", "2", "--no-progress",
              code=1)
    assert "connection_error" in r.stdout and "no request succeeded" in r.stderr
