"""Workloads for the simulator's tests (one engine, tests/engine/test_sim.py, and a fleet,
tests/lifecycle/test_fleet_sim.py)."""
from __future__ import annotations

from lockgate.engine.config import EngineConfig
from lockgate.engine.sim import SimRequest

BLOCK = 16


def config(policy: str = "priority", **kw) -> EngineConfig:
    return EngineConfig(scheduling_policy=policy, block_size=BLOCK, **kw)


def stream(prefix: str, start: float, end: float, interval: float, **kw) -> list[SimRequest]:
    """Periodic arrivals in [start, end)."""
    out, t, i = [], start, 0
    while t < end:
        out.append(SimRequest(f"{prefix}{i}", arrival_s=t, **kw))
        t += interval
        i += 1
    return out
