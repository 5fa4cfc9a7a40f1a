"""The capacity planner: its answer is the simulator's (N replicas meet the SLOs at the planned
peak, N-1 do not), growth compounds, and step costs are fitted back from a bench result."""
from __future__ import annotations

import json
import math

import pytest

from lockgate.engine.sim import StepCost
from lockgate.lifecycle.autoscale_profile import fit_profile, load_profile
from lockgate.lifecycle.autoscale_sim import SimSetup
from lockgate.lifecycle.capacity import HOURS_PER_MONTH, Planner, calibrate, parse_growth, plan


def small_planner() -> Planner:
    return Planner(SimSetup(), duration_s=20.0, seed=2)


def test_the_planners_answer_is_the_simulators():
    planner = small_planner()
    result = plan(planner, 24.0, price_per_replica_hour=2.0)
    (row,) = result.rows
    n = row.replicas
    assert n >= 2 and row.monthly_cost == pytest.approx(n * 2.0 * HOURS_PER_MONTH)
    assert 5 < result.capacity_qps < 30 and result.target_in_flight >= 1
    # Checked again on fresh simulations: N replicas meet every class's objective at the peak...
    check = small_planner()
    assert check.run(24.0, n).meets_slos
    # ...and N-1 do not.
    assert not check.run(24.0, n - 1).meets_slos


def test_growth_adds_quarters_and_replicas_follow():
    assert parse_growth("30%/quarter") == pytest.approx(0.30)
    assert parse_growth("10%/month") == pytest.approx(1.1 ** 3 - 1)
    assert parse_growth("50% / year") == pytest.approx(1.5 ** 0.25 - 1)
    for bad in ("30", "30%", "-5%/quarter", "nan%/month", "30%/week", ""):
        with pytest.raises(ValueError, match="growth"):
            parse_growth(bad)
    result = plan(small_planner(), 6.0, parse_growth("100%/quarter"), quarters=2)
    assert [r.label for r in result.rows] == ["now", "+1 quarter", "+2 quarters"]
    assert [r.peak_qps for r in result.rows] == pytest.approx([6.0, 12.0, 24.0])
    reps = [r.replicas for r in result.rows]
    assert reps == sorted(reps) and reps[-1] > reps[0] and result.rows[0].monthly_cost is None
    for bad in (0.0, -1.0, math.nan, math.inf, 2.0 ** 70):
        with pytest.raises(ValueError, match="peak"):
            plan(small_planner(), bad)


def test_calibrate_given_everything_runs_no_probe():
    planner = small_planner()
    cal = calibrate(planner, 30.0, max_replicas=3, target_in_flight=12.0)
    assert (cal.max_replicas, cal.target_in_flight, cal.capacity_qps) == (3, 12.0, 10.0) and not planner.probes
    assert cal.replicas_at(1.0) == 1 and cal.replicas_at(25.0) == 3 and cal.replicas_at(1e9) == 3


def bench_result(cost: StepCost, points: list[tuple[float, float]], prompt: float, output: float) -> dict:
    """A result.json as `lockgate bench` writes it, for runs at (total token rate, TPOT) on `cost`'s
    steps: TPOT = base + per_token x rate x TPOT, TTFT min = base + per_token x prompt."""
    def summary(rate: float, tpot: float) -> dict:
        return {"overall": {"ok": 100, "prompt_tokens": prompt * 100, "output_tokens": output * 100,
                            "total_token_rate": rate, "tpot": {"p50": tpot},
                            "ttft": {"min": cost.base_s + cost.per_token_s * prompt}}}
    probes = [{"rate": i, "summary": summary(r, t)} for i, (r, t) in enumerate(points)]
    return {"schema": "lockgate-bench/1", "summary": probes[0]["summary"], "sweep": {"probes": probes}}


def test_step_costs_are_fitted_back_from_a_bench_result(tmp_path):
    cost = StepCost(0.02, 1e-4)
    pts = []
    for rate in (500.0, 1500.0, 3000.0):  # tokens/s; TPOT solves TPOT = base + k x rate x TPOT
        pts.append((rate, cost.base_s / (1 - cost.per_token_s * rate)))
    prof = fit_profile(bench_result(cost, pts, 200.0, 50.0))
    assert prof.cost.base_s == pytest.approx(0.02, rel=1e-6) and prof.cost.per_token_s == pytest.approx(1e-4, rel=1e-6)
    assert (prof.prompt_mean, prof.output_mean, prof.points) == (200.0, 50.0, 4)
    f = tmp_path / "result.json"
    f.write_text(json.dumps(bench_result(cost, pts[:1], 200.0, 50.0)))
    one = load_profile(tmp_path)  # one run: two equations, still exact
    assert one.cost.base_s == pytest.approx(0.02, rel=1e-6)
    for text, match in (("{}", "not a lockgate bench"), ("nope", "not JSON"),
                        (json.dumps({"schema": "lockgate-bench/1", "summary": {"overall": {"ok": 0}}}), "no run")):
        f.write_text(text)
        with pytest.raises(ValueError, match=match):
            load_profile(f)
    with pytest.raises(ValueError, match="cannot read"):
        load_profile(tmp_path / "missing.json")
