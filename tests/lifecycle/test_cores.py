"""The usable cores shared among the engine processes: at start-up and for a version that
`POST /admin/models` adds at run time (lifecycle/cores.py). Nothing starts: the engine configs
the versions would start with are checked."""
from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from lockgate.engine.config import EngineConfig
from lockgate.gateway.classes import ClassTable
from lockgate.lifecycle import cores, ray_cluster
from lockgate.lifecycle.admin import ModelAdmin
from lockgate.lifecycle.autoscale_types import AutoscaleConfig
from lockgate.lifecycle.registry import EngineOptions, ModelRegistry
from lockgate.lifecycle.spec import VersionSpec, validate
from lockgate.lifecycle.version import ModelVersion, State
from lockgate.observability.metrics import ServerMetrics

BASE = EngineConfig(load_format="fake")


@pytest.fixture
def four_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cores, "usable_cores", lambda: 4)
    monkeypatch.setattr(ray_cluster, "active", lambda: None)


def test_start_up_shares_the_cores_unless_a_version_sets_its_own(monkeypatch: pytest.MonkeyPatch,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(cores, "usable_cores", lambda: 8)
    monkeypatch.setattr(ray_cluster, "active", lambda: None)
    a, b = EngineConfig(), EngineConfig(num_threads=1)
    cores.share_threads([cores.Engines("a", 3, a), cores.Engines("b", 1, b)])
    assert (a.num_threads, b.num_threads) == (2, 1)
    auto = VersionSpec("c", replicas=1, autoscale=AutoscaleConfig(min_replicas=1, max_replicas=4))
    c = EngineConfig()
    cores.share_threads([cores.of_spec(auto, c)])  # counted at its bound: 4 engines
    assert c.num_threads == 2
    explicit = EngineConfig(num_threads=4)  # 4 replicas x 4 threads on 8 cores
    with caplog.at_level("WARNING", logger="lockgate.lifecycle"):
        cores.share_threads([cores.Engines("a", 4, explicit)])
    assert explicit.num_threads == 4 and "4 engine processes ask for 16 threads in all on 8 usable cores" in caplog.text
    one = EngineConfig()
    cores.share_threads([cores.Engines("a", 1, one)])
    assert one.num_threads is None  # one engine: its core takes every usable core (engine/threads.py)
    monkeypatch.setattr(ray_cluster, "active", lambda: object())
    on_ray = EngineConfig()
    cores.share_threads([cores.Engines("a", 4, on_ray)])
    assert on_ray.num_threads is None  # Ray sets an actor's threads from its num_cpus


class Admin:
    """A registry with versions that never start, and its ModelAdmin (the `/admin/models` handler)."""

    def __init__(self) -> None:
        async def audit(*_: Any) -> None:
            return None

        metrics = ServerMetrics("m", lambda: None)  # type: ignore[arg-type, return-value]
        self.registry = ModelRegistry(EngineOptions(ClassTable(), ray=None), metrics, audit)
        self.registry.load_in_background = lambda version: None  # type: ignore[method-assign]
        self.admin = ModelAdmin(self.registry, BASE)

    def running(self, version: str, replicas: int = 1) -> ModelVersion:
        """A version started with the server (one engine alone: no thread count, every core)."""
        spec = VersionSpec("m", version=version, replicas=replicas)
        v = self.registry.new_version(spec, validate(spec, BASE))
        self.registry.register(v)
        v.state = State.READY
        return v

    def load(self, version: str, **engine: Any) -> EngineConfig:
        body = {"name": "m", "version": version, "path": "default", **engine}
        asyncio.run(self.admin.load(json.dumps(body).encode(), "test"))
        return self.registry.models["m"].versions[version].engine_config


def test_a_version_added_at_run_time_gets_its_share(four_cores: None, caplog: pytest.LogCaptureFixture) -> None:
    a = Admin()
    first = a.running("v1")
    assert first.engine_config.num_threads is None
    with caplog.at_level("INFO", logger="lockgate.lifecycle"):
        assert a.load("v2").num_threads == 2  # 2 engine processes on 4 cores
    assert first.engine_config.num_threads is None  # a running engine keeps its threads until a restart
    assert "m@v1 started alone with every usable core (4 threads)" in caplog.text
    assert "threads in all" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="lockgate.lifecycle"):
        assert a.load("v3", num_threads=4).num_threads == 4  # explicit: kept
    # v1 at its share (1), v2's 2, v3's 4: 7 threads for 3 engines on 4 cores
    assert "3 engine processes ask for 7 threads in all on 4 usable cores" in caplog.text


def test_run_time_count_takes_replicas_and_bounds_and_skips_draining(four_cores: None,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cores, "usable_cores", lambda: 12)
    a = Admin()
    a.running("v1", replicas=2)
    a.running("v2").state = State.DRAINING  # stopping: not counted
    a.running("v3").state = State.FAILED  # stopped: not counted
    assert a.load("v4").num_threads == 4  # 2 + 1 engine processes on 12 cores
    # v1's 2, v4's 1, and v5 autoscaled up to 3: 6 engine processes
    assert a.load("v5", autoscale={"min_replicas": 1, "max_replicas": 3}).num_threads == 2
