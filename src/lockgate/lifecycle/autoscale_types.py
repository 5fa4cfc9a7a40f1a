"""The autoscaler's plain data: its settings, what it observes of a fleet, what it decides.

Shared by the autoscaler's policies (`autoscaler.py`), the loop that drives a live
fleet (`autoscale_loop.py`), the simulator (`autoscale_sim.py`) and the capacity
planner (`capacity.py`), so the same code decides on a real fleet and on a trace.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

PolicyName = Literal["lockgate", "hpa", "fixed"]
POLICY_NAMES: tuple[str, ...] = ("lockgate", "hpa", "fixed")


@dataclass(slots=True)
class AutoscaleConfig:
    """One version's autoscaler. Defaults follow Knative's (60 s stable window, 6 s panic window entered
    at twice the target, at most 2x per decision) and scale down only after a cooldown, by draining."""

    min_replicas: int = 1
    max_replicas: int = 1
    policy: PolicyName = "lockgate"
    interval_s: float = 2.0  # one decision this often
    stable_window_s: float = 60.0
    panic_window_s: float = 6.0
    panic_threshold: float = 2.0  # enter panic when the panic window's load is this many times the target
    max_scale_up_rate: float = 2.0  # desired <= ceil(rate * current) per decision (from 0: up to 1... see policy)
    max_scale_down_rate: float = 2.0  # desired >= floor(current / rate) per decision
    scale_down_cooldown_s: float = 30.0  # no scale-down this long after any scale event
    activation_timeout_s: float = 60.0  # at zero replicas, a request waits this long for one to start
    # Per replica: the in-flight requests one replica serves well (Knative's container concurrency target),
    # and the KV-cache usage above which a replica counts as full.
    target_in_flight: float = 16.0
    target_kv_usage: float = 0.8
    # The lockgate policy: scale up when a class's predicted wait exceeds this fraction of its TTFT target.
    wait_fraction: float = 0.5
    # The HPA-style policy: target utilization (in-flight / target_in_flight) and its tolerance.
    hpa_target_utilization: float = 0.7
    hpa_tolerance: float = 0.1
    # The lockgate policy: a scale-up asks for this much more than the need (fewer, larger steps on a
    # rising load), and a scale-down waits while any class's predicted wait is above this fraction of
    # its scale-up threshold within the stable window.
    scale_up_headroom: float = 0.2
    down_wait_ratio: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) must be between 0 and max_replicas "
                             f"({self.max_replicas})")


@dataclass(slots=True)
class ClassLoad:
    """One SLO class as admission sees it now."""

    name: str
    ttft_target_s: float
    predicted_wait_s: float  # the admission estimate for a request of this class arriving now (0: none queued)
    queued: int  # requests of this class waiting for their first token


@dataclass(slots=True)
class FleetSample:
    """What the autoscaler sees of one version's fleet at time `t` (seconds on its clock)."""

    t: float
    ready: int  # replicas taking requests
    starting: int  # replicas loading (decided, not ready yet)
    in_flight: int  # requests on the fleet: queued + running
    kv_usage: float  # mean over ready replicas, 0..1
    classes: list[ClassLoad] = field(default_factory=list)
    held: int = 0  # requests held at zero replicas, waiting for one to start (the activator)
    # Since the previous sample: requests that asked admission, and those it refused (429). Shed demand
    # never reaches the queue, so the wait alone would understate it.
    arrived: int = 0
    refused: int = 0


@dataclass(slots=True)
class Decision:
    """One decision: how many replicas the fleet should have, and why (audit, metric, log, admin view)."""

    t: float
    current: int  # ready + starting when decided
    desired: int
    mode: Literal["stable", "panic"]
    reason: str  # one line, e.g. "interactive predicted wait 0.41 s > 0.25 s (50% of 0.5 s)"
    figures: dict[str, Any] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return self.desired != self.current

    def to_json(self) -> dict[str, Any]:
        return {"t": self.t, "current": self.current, "desired": self.desired, "mode": self.mode,
                "reason": self.reason, "figures": self.figures}
