"""The capacity planner: replicas for a forecast peak, found on the same simulator the autoscaler is
evaluated on (`autoscale_sim.py`), and what they cost.

- A replica's capacity: the highest constant rate (Poisson arrivals, the workload's sizes and
  class mix) one simulated replica serves while every class keeps its objective's share of
  requests within its TTFT target (`AutoscaleRun.meets_slos`); geometric growth, then bisection.
- Replicas for a peak: from peak / capacity, the fewest N for which N simulated replicas meet
  the SLOs at the peak rate (so N-1 do not). The headroom the SLOs need (Poisson bursts, the
  slowest class's tail, routing imbalance) is whatever the simulator needs beyond peak/capacity.
- Growth (`30%/quarter`, `10%/month`, `50%/year`): each next quarter's peak and its replicas.
- Cost: replicas x price per replica-hour x 730 hours a month (peak provisioning: what a fixed
  fleet costs; an autoscaled one pays less off-peak, see `lockgate autoscale simulate`).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from lockgate.lifecycle.autoscale_patterns import Workload, constant
from lockgate.lifecycle.autoscale_sim import AutoscaleRun, SimSetup, simulate_autoscale
from lockgate.lifecycle.autoscale_types import AutoscaleConfig

HOURS_PER_MONTH = 730.0  # 8760 / 12
MAX_REPLICAS = 1024  # the planner's search stops here
TARGET_LOAD = 0.8  # the suggested in-flight target: what a replica holds at this share of its capacity
_GROWTH = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*%\s*/\s*(month|quarter|year)\s*$")


@dataclass(slots=True)
class Probe:
    rate: float
    replicas: int
    meets: bool
    attainment: dict[str, float]
    in_flight: float = 0.0  # mean requests in flight per replica (Little's law over the run)


@dataclass(slots=True)
class Planner:
    """Runs probes on the simulator: one setup (step costs, KV, classes), one workload, one seed."""

    setup: SimSetup = field(default_factory=SimSetup)
    workload: Workload = field(default_factory=Workload)
    duration_s: float = 60.0  # each probe's arrivals
    seed: int = 0
    probes: list[Probe] = field(default_factory=list)

    def run(self, rate: float, replicas: int) -> AutoscaleRun:
        reqs = constant(rate, self.duration_s, self.seed, self.setup.classes, self.workload)
        if not reqs:
            raise ValueError(f"{rate:g} req/s for {self.duration_s:g} s gives no request")
        cfg = AutoscaleConfig(min_replicas=replicas, max_replicas=replicas, policy="fixed")
        return simulate_autoscale(reqs, cfg, self.setup, initial=replicas)

    def meets(self, rate: float, replicas: int) -> bool:
        run = self.run(rate, replicas)
        self.probes.append(Probe(rate, replicas, run.meets_slos,
                                 {c.name: round(c.attainment, 5) for c in run.classes if c.requests},
                                 run.mean_in_flight / replicas))
        return run.meets_slos

    def in_flight_at(self, rate: float) -> float:
        """Mean requests in flight on one replica at `rate` (a probe, unless one ran there already)."""
        for p in reversed(self.probes):
            if p.replicas == 1 and p.rate == rate:
                return p.in_flight
        self.meets(rate, 1)
        return self.probes[-1].in_flight

    def target_in_flight(self, capacity: float) -> float:
        """The per-replica in-flight target this suggests for the autoscalers: what one replica holds
        at `TARGET_LOAD` of its capacity (at the capacity itself queues already grow steeply)."""
        return max(1.0, round(self.in_flight_at(TARGET_LOAD * capacity), 1))

    def replica_capacity(self, start: float = 1.0, tolerance: float = 0.05) -> float:
        """The highest rate one replica serves within the SLOs (to `tolerance`, relative)."""
        lo, hi = 0.0, start
        while self.meets(hi, 1):
            lo, hi = hi, hi * 2
            if hi > 1e6:
                raise ValueError("one replica meets the SLOs at any rate: the step costs are ~0")
        if lo == 0.0:  # even `start` fails: search down
            while not self.meets(hi / 2, 1):
                hi /= 2
                if hi < 1e-3:
                    raise ValueError("one replica cannot meet the SLOs at any rate (a step longer than a target?)")
            lo = hi / 2
        while hi - lo > tolerance * lo:
            mid = (lo + hi) / 2
            if self.meets(mid, 1):
                lo = mid
            else:
                hi = mid
        return lo

    def replicas_for(self, peak_qps: float, capacity: float, start: int | None = None) -> int:
        """The fewest replicas meeting the SLOs at `peak_qps` (N meet, N-1 do not)."""
        n = max(1, start if start is not None else math.ceil(peak_qps / capacity))
        if self.meets(peak_qps, n):
            while n > 1 and self.meets(peak_qps, n - 1):
                n -= 1
            return n
        while True:
            n += 1
            if n > MAX_REPLICAS:
                raise ValueError(f"more than {MAX_REPLICAS} replicas needed for {peak_qps:g} req/s")
            if self.meets(peak_qps, n):
                return n


def parse_growth(text: str) -> float:
    """'30%/quarter' -> 0.30 per quarter (monthly and yearly rates compounded to a quarter)."""
    m = _GROWTH.match(text or "")
    if not m:
        raise ValueError(f"growth must look like 30%/quarter, 10%/month or 50%/year, got {text!r}")
    g = float(m.group(1)) / 100
    if g > 100:
        raise ValueError(f"growth {text!r} is more than 10000% per period")
    per = {"quarter": 1.0, "month": 3.0, "year": 0.25}[m.group(2)]
    return (1 + g) ** per - 1


@dataclass(slots=True)
class PlanRow:
    label: str  # "now", "+1 quarter", ...
    peak_qps: float
    replicas: int
    monthly_cost: float | None

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "peak_qps": round(self.peak_qps, 3), "replicas": self.replicas,
                "monthly_cost": None if self.monthly_cost is None else round(self.monthly_cost, 2)}


@dataclass(slots=True)
class Plan:
    capacity_qps: float  # one replica within the SLOs
    target_in_flight: float  # the autoscalers' per-replica target it suggests
    rows: list[PlanRow]
    probes: list[Probe]

    def to_json(self) -> dict[str, Any]:
        return {"replica_capacity_qps": round(self.capacity_qps, 3),
                "suggested_target_in_flight": self.target_in_flight,
                "plan": [r.to_json() for r in self.rows], "probes": len(self.probes)}


def plan(planner: Planner, peak_qps: float, growth_per_quarter: float | None = None, quarters: int = 4,
         price_per_replica_hour: float | None = None) -> Plan:
    if not (math.isfinite(peak_qps) and 0 < peak_qps <= 1e6):
        raise ValueError(f"peak rate must be a number of requests/s in (0, 1e6], got {peak_qps}")
    if price_per_replica_hour is not None and not (math.isfinite(price_per_replica_hour)
                                                   and 0 <= price_per_replica_hour <= 1e6):
        raise ValueError(f"price per replica-hour must be a number in [0, 1e6], got {price_per_replica_hour}")
    cap = planner.replica_capacity(start=max(0.5, min(peak_qps, 8.0)))
    peaks = [("now", peak_qps)]
    if growth_per_quarter is not None:
        peaks += [(f"+{q} quarter{'s' if q > 1 else ''}", peak_qps * (1 + growth_per_quarter) ** q)
                  for q in range(1, quarters + 1)]
    rows: list[PlanRow] = []
    n: int | None = None
    for label, peak in peaks:
        n = planner.replicas_for(peak, cap, start=max(n or 1, math.ceil(peak / cap)))
        cost = None if price_per_replica_hour is None else n * price_per_replica_hour * HOURS_PER_MONTH
        rows.append(PlanRow(label, peak, n, cost))
    return Plan(cap, planner.target_in_flight(cap), rows, planner.probes)


@dataclass(slots=True)
class Calibration:
    """The fleet a trace is compared on: one replica's capacity, the in-flight target it suggests,
    and the fixed fleet that meets the SLOs at the trace's peak (the autoscalers' max_replicas)."""

    capacity_qps: float
    target_in_flight: float
    peak_qps: float
    max_replicas: int

    def replicas_at(self, rate: float) -> int:
        """Replicas for `rate` by capacity alone (the autoscaled fleets' start), within max_replicas."""
        return min(self.max_replicas, max(1, math.ceil(rate / self.capacity_qps)))

    def to_json(self) -> dict[str, Any]:
        return {"replica_capacity_qps": round(self.capacity_qps, 3), "target_in_flight": self.target_in_flight,
                "trace_peak_qps": round(self.peak_qps, 3), "max_replicas": self.max_replicas}


def calibrate(planner: Planner, peak_qps: float, max_replicas: int | None = None,
              target_in_flight: float | None = None) -> Calibration:
    """What is not given, from the simulator: the target from one replica's capacity, and
    max_replicas as the planner's answer for `peak_qps`. Both given: no search (the capacity is
    then taken as peak / max_replicas)."""
    if max_replicas is not None and target_in_flight is not None:
        return Calibration(peak_qps / max_replicas, target_in_flight, peak_qps, max_replicas)
    cap = planner.replica_capacity(start=max(0.5, min(peak_qps, 8.0)))
    target = target_in_flight if target_in_flight is not None else planner.target_in_flight(cap)
    n = max_replicas if max_replicas is not None else planner.replicas_for(peak_qps, cap)
    return Calibration(cap, target, peak_qps, n)
