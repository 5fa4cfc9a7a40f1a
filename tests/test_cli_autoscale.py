"""`lockgate autoscale simulate | plan`: a small comparison end to end (table, PNG, result.json), a
replayed bench trace, a plan, and bad input refused with exit 2 and one line."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lockgate.cli import app

runner = CliRunner()
SMALL = ["--max-replicas", "2", "--target-in-flight", "20", "--cold-start", "5"]  # no calibration probes


def invoke(*args: str):
    return runner.invoke(app, ["autoscale", *args])


def test_simulate_compares_the_three_policies(tmp_path):
    r = invoke("simulate", "--pattern", "ramp", "--peak-qps", "12", "--duration", "90", *SMALL,
               "--out", str(tmp_path))
    assert r.exit_code == 0, r.output
    for word in ("fixed", "hpa", "lockgate", "interactive", "attainment", "replica-s", "events"):
        assert word in r.output
    png = tmp_path / "timeline.png"
    assert f"timeline: {png}" in r.output and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    res = json.loads((tmp_path / "result.json").read_text())
    assert set(res["policies"]) == {"fixed", "hpa", "lockgate"}
    assert res["calibration"]["max_replicas"] == 2 and res["replica_seconds_vs_fixed"]["fixed"] == 1.0
    assert 0 <= res["policies"]["lockgate"]["classes"]["interactive"]["attainment"] <= 1


def test_simulate_replays_a_bench_trace_with_one_policy(tmp_path):
    rec = tmp_path / "records.jsonl"
    rec.write_text("".join(json.dumps({"scheduled_s": i * 0.2, "priority_class": "interactive",
                                       "prompt_tokens": 64, "output_tokens": 8}) + "\n" for i in range(50)))
    r = invoke("simulate", "--trace", str(rec), "--policy", "lockgate", *SMALL, "--out", str(tmp_path / "o"),
               "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    assert list(res["policies"]) == ["lockgate"] and res["requests"] == 50


def test_plan_prints_replicas_and_cost():
    r = invoke("plan", "--peak-qps", "5", "--growth", "100%/quarter", "--quarters", "1",
               "--price-per-replica-hour", "1.5", "--json")
    assert r.exit_code == 0, r.output
    res = json.loads(r.output)
    now, later = res["plan"]
    assert now["label"] == "now" and later["peak_qps"] == 10 and later["replicas"] >= now["replicas"] >= 1
    assert now["monthly_cost"] == pytest.approx(now["replicas"] * 1.5 * 730)


@pytest.mark.parametrize("args, message", [
    (["simulate"], "one of --trace"),
    (["simulate", "--pattern", "burst", "--trace", "x"], "one of --trace"),
    (["simulate", "--pattern", "sawtooth"], "unknown pattern"),
    (["simulate", "--pattern", "burst", "--policy", "vpa"], "unknown policy"),
    (["simulate", "--pattern", "burst", "--peak-qps", "nan"], "--peak-qps"),
    (["simulate", "--pattern", "burst", "--peak-qps", "-5"], "--peak-qps"),
    (["simulate", "--pattern", "burst", "--peak-qps", str(2**70)], "--peak-qps"),
    (["simulate", "--pattern", "burst", "--duration", "0"], "--duration"),
    (["simulate", "--pattern", "burst", "--max-replicas", str(2**70)], "--max-replicas"),
    (["simulate", "--pattern", "burst", "--min-replicas", "-1"], "--min-replicas"),
    (["simulate", "--pattern", "burst", "--min-replicas", "3", "--max-replicas", "2"], "--min-replicas"),
    (["simulate", "--pattern", "burst", "--cold-start", "inf"], "--cold-start"),
    (["simulate", "--trace", "/nonexistent/records.jsonl"], "cannot read trace"),
    (["simulate", "--pattern", "burst", "--profile", "/nonexistent/result.json"], "cannot read profile"),
    (["plan", "--peak-qps", "0"], "--peak-qps"),
    (["plan", "--peak-qps", "nan"], "--peak-qps"),
    (["plan", "--peak-qps", "10", "--growth", "lots"], "growth must look like"),
    (["plan", "--peak-qps", "10", "--price-per-replica-hour", "-1"], "--price-per-replica-hour"),
    (["plan", "--peak-qps", "10", "--quarters", str(2**70)], "--quarters"),
])
def test_bad_input_exits_2_with_one_line(args, message):
    r = invoke(*args)
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert "Traceback" not in r.output


def test_an_empty_trace_exits_2(tmp_path):
    (tmp_path / "records.jsonl").write_text("\n")
    r = invoke("simulate", "--trace", str(tmp_path))
    assert r.exit_code == 2 and "empty" in r.output
