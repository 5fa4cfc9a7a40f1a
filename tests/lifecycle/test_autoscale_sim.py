"""The autoscaler on the simulator (fake clock): a burst is met within the panic window, the cost
counts starting replicas, scale to zero and back with the activator, and the traces' loaders."""
from __future__ import annotations

import json
import math

import pytest

from lockgate.engine.frontend.queue_view import QueueView
from lockgate.engine.sim import SimRequest
from lockgate.gateway.classes import ClassTable
from lockgate.lifecycle.autoscale_patterns import generate, load_trace, peak_rate, rate_fn
from lockgate.lifecycle.autoscale_signals import class_loads
from lockgate.lifecycle.autoscale_sim import SimSetup, compare, simulate_autoscale
from lockgate.lifecycle.autoscale_types import AutoscaleConfig

# One simulated replica (the default step model) serves about 14 req/s of the default mix within
# the SLOs, holding about 30 requests at 80% of that.
SETUP = SimSetup(cold_start_s=10.0)


def steady(rate: float, start: float, end: float, prefix: str, prio: int = 0) -> list[SimRequest]:
    n = int((end - start) * rate)
    return [SimRequest(f"{prefix}{i}", tenant="t", priority=prio, prompt_len=128, output_len=24,
                       arrival_s=start + i / rate) for i in range(n)]


def test_a_burst_is_met_within_the_panic_window_and_costs_less_than_fixed():
    reqs = steady(6, 0, 200, "base") + steady(30, 100, 160, "burst")
    cfg = AutoscaleConfig(min_replicas=1, max_replicas=6, target_in_flight=20)
    runs = compare(reqs, cfg, SETUP, initial=1)
    lg, fixed = runs["lockgate"], runs["fixed"]
    ups = [d for d in lg.decisions if d.desired > d.current]
    assert ups and 100 <= ups[0].t <= 100 + cfg.panic_window_s  # seen within the panic window
    assert any(d.mode == "panic" for d in lg.decisions if 100 <= d.t <= 100 + cfg.panic_window_s)
    assert all(d.desired <= 2 * d.current for d in ups)
    assert lg.peak_replicas >= 3 and lg.replica_seconds < 0.8 * fixed.replica_seconds
    assert fixed.scale_events == 0 and math.isclose(fixed.replica_seconds, 6 * fixed.end_s, rel_tol=1e-9)
    assert all(r.finish_s is not None for r in lg.results.values())
    # The burst's own requests waited for the new replicas' cold start at most, not for the backlog.
    assert lg.outcome("interactive").attainment > 0.8
    assert lg.to_json()["classes"]["interactive"]["requests"] == len(reqs)


def test_scale_to_zero_and_back_the_held_requests_start_a_replica_at_once():
    reqs = steady(4, 0, 20, "a") + steady(4, 400, 410, "b")
    cfg = AutoscaleConfig(min_replicas=0, max_replicas=3, target_in_flight=20, scale_down_cooldown_s=30)
    run = simulate_autoscale(reqs, cfg, SETUP, initial=1)
    zero = [d for d in run.decisions if d.desired == 0 and d.changed]
    assert len(zero) == 1 and zero[0].t >= 20 + cfg.stable_window_s
    back = next(d for d in run.decisions if d.t >= 400 and d.changed)
    assert back.current == 0 and back.desired >= 1 and "activator" in back.reason
    assert back.t - 400 <= cfg.interval_s and back.figures["held"] >= 1
    first = run.results["b0"]
    # held until a replica is ready: the cold start (10 s) plus at most one decision interval
    assert SETUP.cold_start_s <= first.ttft <= SETUP.cold_start_s + cfg.interval_s + 1.0
    assert all(r.finish_s is not None for r in run.results.values())
    # Zero replicas cost nothing: far less than one replica kept for the whole run.
    assert run.replica_seconds < 0.5 * run.end_s


def test_the_policies_differ_on_one_trace():
    reqs = generate("ramp", 24, 150, seed=3)
    runs = compare(reqs, AutoscaleConfig(min_replicas=1, max_replicas=3, target_in_flight=20), SETUP, initial=1)
    assert set(runs) == {"fixed", "hpa", "lockgate"}
    assert runs["fixed"].peak_replicas == 3 and runs["fixed"].scale_events == 0
    hpa_changes = [d for d in runs["hpa"].decisions if d.changed]
    assert hpa_changes and all(b.t - a.t >= 15 for a, b in zip(hpa_changes, hpa_changes[1:]))
    assert runs["lockgate"].replica_seconds < runs["fixed"].replica_seconds
    tl = runs["lockgate"].timeline
    assert tl[0].t == 0 and tl[-1].arrival_rate > tl[0].arrival_rate  # a ramp
    assert max(b.total for b in tl) <= 3 + 1e-9


def test_class_loads_wait_only_for_a_class_that_queues():
    now = [0.0]
    view = QueueView(clock=lambda: now[0])
    classes = ClassTable()
    assert [c.predicted_wait_s for c in class_loads(view, classes, 100, 0.0)] == [0.0, 0.0, 0.0]
    for i in range(40):  # a backlog drains at 10 req/s
        view.add(f"q{i}", 1, 1, 100)
    for i in range(30):
        now[0] += 0.1
        view.leave(f"q{i}", served=True)
    loads = {c.name: c for c in class_loads(view, classes, 100, 0.0)}
    assert loads["interactive"].predicted_wait_s == 0.0 and loads["interactive"].queued == 0
    assert loads["standard"].queued == 10 and 0.5 < loads["standard"].predicted_wait_s < 2.0
    assert loads["batch"].predicted_wait_s == 0.0


def test_patterns_and_traces(tmp_path):
    d = generate("diurnal", 20, 600, seed=1)
    assert d == generate("diurnal", 20, 600, seed=1)  # seeded
    assert 0.8 * 20 <= peak_rate(d) <= 1.3 * 20 and rate_fn("diurnal", 20, 600)(0) == pytest.approx(2.0)
    assert {r.tenant for r in d} == {"interactive", "standard", "batch"}
    with pytest.raises(ValueError, match="unknown pattern"):
        generate("sine", 10, 10)
    with pytest.raises(ValueError, match="positive"):
        generate("burst", float("nan"), 10)
    lines = [{"index": 0, "priority_class": "interactive", "scheduled_s": 5.0, "prompt_tokens": 40, "output_tokens": 7},
             {"index": 1, "priority_class": "nope", "scheduled_s": 6.5, "prompt_tokens": 0, "max_tokens": 9}]
    f = tmp_path / "records.jsonl"
    f.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    tr = load_trace(tmp_path)
    assert [(r.arrival_s, r.priority, r.prompt_len, r.output_len) for r in tr] == [(0.0, 0, 40, 7), (1.5, 1, 128, 9)]
    f.write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_trace(f)
    f.write_text('{"scheduled_s": -1}\n')
    with pytest.raises(ValueError, match="arrival"):
        load_trace(f)
    with pytest.raises(ValueError, match="cannot read"):
        load_trace(tmp_path / "missing.jsonl")
    with pytest.raises(ValueError, match="empty"):
        simulate_autoscale([], AutoscaleConfig())
