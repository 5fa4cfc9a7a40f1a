"""The autoscaler's decisions on a fake clock, driven by a toy fleet (replicas start after a cold
start, each serves 16 in flight and drains 20 requests/s; the excess queues and waits)."""
from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from lockgate.lifecycle.autoscale_types import AutoscaleConfig, ClassLoad, Decision, FleetSample
from lockgate.lifecycle.autoscaler import Autoscaler

PER_REPLICA = 16
DRAIN = 20.0


@dataclass
class ToyFleet:
    ready: int
    cold_start_s: float = 10.0
    starting: list[float] = field(default_factory=list)  # ready-at times
    decisions: list[Decision] = field(default_factory=list)

    def sample(self, t: float, in_flight: int, held: int = 0) -> FleetSample:
        while self.starting and self.starting[0] <= t:
            self.starting.pop(0)
            self.ready += 1
        queued = max(0, in_flight - self.ready * PER_REPLICA)
        wait = queued / (self.ready * DRAIN) if self.ready else 0.0
        kv = min(1.0, in_flight / (self.ready * 40)) if self.ready else 0.0
        return FleetSample(t, self.ready, len(self.starting), in_flight if self.ready else 0, kv,
                           [ClassLoad("interactive", 0.5, wait, queued)], held=held)

    def apply(self, d: Decision) -> None:
        self.decisions.append(d)
        if d.desired > d.current:
            self.starting += [d.t + self.cold_start_s] * (d.desired - d.current)
        while self.ready + len(self.starting) > d.desired:
            if self.starting:
                self.starting.pop()
            else:
                self.ready -= 1

    def run(self, scaler: Autoscaler, load: Callable[[float], int], t0: float, t1: float,
            held: Callable[[float], int] = lambda t: 0) -> None:
        t = t0
        while t < t1:
            self.apply(scaler.decide(self.sample(t, load(t), held(t))))
            t += scaler.config.interval_s


def changes(fleet: ToyFleet) -> list[Decision]:
    return [d for d in fleet.decisions if d.changed]


def test_a_burst_scales_up_within_the_panic_window():
    cfg = AutoscaleConfig(min_replicas=1, max_replicas=16)
    scaler, fleet = Autoscaler(cfg), ToyFleet(ready=1)
    fleet.run(scaler, lambda t: 10, 0, 120)
    assert changes(fleet) == []  # 10 in flight: one replica is enough
    fleet.run(scaler, lambda t: 150, 120, 300)
    first = changes(fleet)[0]
    assert 120 <= first.t <= 120 + cfg.panic_window_s
    assert first.mode == "panic" and first.desired == 2  # at most 2x per decision
    for d in changes(fleet):
        assert d.desired <= 2 * max(d.current, 1)
        assert d.reason and "in_flight" in d.figures and "need_wait" in d.figures
    assert fleet.ready == math.ceil(150 / PER_REPLICA * (1 + cfg.scale_up_headroom))  # the need and its headroom
    assert all(not (d.desired < d.current) for d in fleet.decisions)  # never down during the burst


def test_a_noisy_steady_load_does_not_flap():
    cfg = AutoscaleConfig(min_replicas=1, max_replicas=16)
    scaler, fleet = Autoscaler(cfg), ToyFleet(ready=4)
    rng = random.Random(7)
    fleet.run(scaler, lambda t: int(rng.uniform(30, 70)), 0, 1800)
    ups = [d for d in changes(fleet) if d.desired > d.current]
    downs = [d for d in changes(fleet) if d.desired < d.current]
    assert fleet.ready in (4, 5)
    assert len(ups) + len(downs) <= 1  # at most one settling move in half an hour, never back and forth


def test_scale_down_waits_for_the_cooldown_and_at_most_halves():
    cfg = AutoscaleConfig(min_replicas=1, max_replicas=16, scale_down_cooldown_s=120)
    scaler, fleet = Autoscaler(cfg), ToyFleet(ready=1)
    fleet.run(scaler, lambda t: 200, 0, 200)
    assert fleet.ready == math.ceil(200 / PER_REPLICA * (1 + cfg.scale_up_headroom)) == 15
    last_up = max(d.t for d in changes(fleet))
    fleet.run(scaler, lambda t: 5, 200, 1200)
    downs = [d for d in changes(fleet) if d.desired < d.current]
    assert downs and fleet.ready == 1
    prev = last_up
    for d in downs:
        assert d.t - prev >= cfg.scale_down_cooldown_s  # after the cooldown since the last scale event
        assert d.desired >= d.current // 2  # by at most half
        assert "scale down" in d.reason and d.mode == "stable"
        prev = d.t
    # The first reduction waits for a whole stable window of low load too (the last high sample: t=198).
    assert downs[0].t >= 198 + cfg.stable_window_s


def test_scale_to_zero_and_back():
    cfg = AutoscaleConfig(min_replicas=0, max_replicas=4, scale_down_cooldown_s=30)
    scaler, fleet = Autoscaler(cfg), ToyFleet(ready=1)
    fleet.run(scaler, lambda t: 3 if t < 20 else 0, 0, 200)
    zero = [d for d in changes(fleet) if d.desired == 0]
    assert len(zero) == 1 and zero[0].t >= 18 + cfg.stable_window_s  # idle since t=18 and "zero" in zero[0].reason
    assert fleet.ready == 0
    # Requests arrive at zero: the activator holds them, and the very next decision starts a replica.
    d = scaler.decide(fleet.sample(300.0, 0, held=3))
    assert d.current == 0 and d.desired == 1 and "activator" in d.reason
    fleet.apply(d)
    fleet.run(scaler, lambda t: 3, 302, 330)
    assert fleet.ready == 1 and not any(x.desired == 0 for x in fleet.decisions if x.t > 300)


def test_no_scale_to_zero_with_min_one_or_while_anything_is_in_flight():
    scaler, fleet = Autoscaler(AutoscaleConfig(min_replicas=1, max_replicas=4)), ToyFleet(ready=2)
    fleet.run(scaler, lambda t: 0, 0, 600)
    assert fleet.ready == 1
    scaler, fleet = Autoscaler(AutoscaleConfig(min_replicas=0, max_replicas=4)), ToyFleet(ready=1)
    fleet.run(scaler, lambda t: 1 if int(t) % 50 == 0 else 0, 0, 600)  # a trickle, once in 50 s
    assert fleet.ready == 1


def test_the_bounds_are_read_at_every_decision():
    cfg = AutoscaleConfig(min_replicas=1, max_replicas=16)
    scaler, fleet = Autoscaler(cfg), ToyFleet(ready=1)
    fleet.run(scaler, lambda t: 400, 0, 60)
    assert fleet.ready + len(fleet.starting) == 16
    scaler.config.max_replicas = 6  # a PATCH
    d = scaler.decide(fleet.sample(60, 400))
    assert d.desired == 6 and "max_replicas" in d.reason  # the bounds win over the rate limits
    scaler = Autoscaler(AutoscaleConfig(min_replicas=1, max_replicas=8))
    assert scaler.decide(ToyFleet(ready=1).sample(0, 0)).desired == 1
    scaler.config.min_replicas = 5
    d = scaler.decide(ToyFleet(ready=1).sample(2, 0))
    assert d.desired == 5 and "min_replicas" in d.reason


def test_fixed_and_hpa_policies():
    d = Autoscaler(AutoscaleConfig(min_replicas=0, max_replicas=5, policy="fixed")).decide(
        FleetSample(0.0, 5, 0, 0, 0.0))
    assert d.desired == 5 and "fixed" in d.reason
    cfg = AutoscaleConfig(min_replicas=0, max_replicas=40, policy="hpa")
    scaler, fleet = Autoscaler(cfg), ToyFleet(ready=1)
    fleet.run(scaler, lambda t: 200, 0, 14)
    ups = changes(fleet)
    assert [d.desired for d in ups] == [5]  # max(+100%, +4 pods) per 15 s from 1
    fleet.run(scaler, lambda t: 200, 14, 120)
    ups = changes(fleet)
    assert all(b.t - a.t >= 15 for a, b in zip(ups, ups[1:]))  # one sync every 15 s
    assert fleet.ready + len(fleet.starting) == math.ceil(200 / (16 * 0.7))
    n = fleet.ready
    fleet.run(scaler, lambda t: 0, 120, 400)
    assert fleet.ready == n  # the 300 s scale-down stabilization
    fleet.run(scaler, lambda t: 0, 400, 460)
    assert fleet.ready == 1  # down at once after it, and never below 1 (min_replicas 0)


def test_bad_policy_and_bounds_are_refused():
    with pytest.raises(ValueError, match="min_replicas"):
        AutoscaleConfig(min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError, match="unknown autoscale policy"):
        Autoscaler(AutoscaleConfig(policy="nope"))  # type: ignore[arg-type]


def test_demand_shed_at_admission_scales_up_though_nothing_queues():
    # Admission refuses what it cannot serve in time, so the queue stays short and the wait low;
    # the refusals are the demand the fleet misses.
    cfg = AutoscaleConfig(min_replicas=1, max_replicas=8, interval_s=2.0)
    scaler = Autoscaler(cfg)
    calm = [scaler.decide(FleetSample(t, 2, 0, 8, 0.1, [ClassLoad("interactive", 0.5, 0.0, 0)], arrived=40))
            for t in (0.0, 2.0, 4.0)]
    assert all(d.desired == 2 for d in calm)
    # Half refused, sustained over the panic window (one sample of it is not a burst): twice the replicas.
    shed = [scaler.decide(FleetSample(t, 2, 0, 8, 0.1, [ClassLoad("interactive", 0.5, 0.0, 0)], arrived=40,
                                      refused=20)) for t in (6.0, 8.0, 10.0, 12.0)]
    assert shed[0].desired == 2
    assert shed[1].desired == 4 and "20 of 40 refused at admission" in shed[1].reason
    assert shed[1].figures["need_shed"] == pytest.approx(4.0)
    assert shed[2].mode == "panic" and shed[2].desired == 4  # half refused for the whole panic window
    # Everything refused: at most the 2x limit at once.
    scaler = Autoscaler(cfg)
    d = scaler.decide(FleetSample(0.0, 3, 0, 8, 0.1, [], arrived=30, refused=30))
    assert d.desired == 6
