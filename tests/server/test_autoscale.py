"""The autoscaler on a live server with fake-engine replicas (issue 20): scale to zero and back
through the activator, the activation timeout's 503, PATCH setting an autoscaler's bounds,
scale-down by draining (no request cut short), decisions audited, shown and exported.

One server for the module, its windows shrunk to a second or two so the life of an
autoscaled version fits in a test; the policies themselves are tested on the simulator
(tests/lifecycle/test_autoscaler.py).
"""
from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from lockgate.bench.procs import ServerProcess, parse_metrics
from tests.server.conftest import start_server, wait_for

ADMIN = "sk-admin-autoscale-test"
FAST = {"interval_s": 0.2, "stable_window_s": 1.5, "panic_window_s": 0.5, "scale_down_cooldown_s": 0.5}


@dataclass
class Srv:
    srv: ServerProcess
    admin: httpx.Client
    user: httpx.Client  # a tenant's inference key


def _config(tmp: Path) -> Path:
    engine = {"load_format": "fake", "fake_step_delay_s": 0.005, "fake_token_delay_s": 0.0001}
    cfg = {"models": [{"name": "auto", "versions": [
        # zero to two replicas, a generous activation timeout
        {"version": "v1", "path": "default", "traffic": 100, "engine": engine,
         "autoscale": {"min_replicas": 0, "max_replicas": 2, "activation_timeout_s": 30, **FAST}},
        # an activation timeout far below a replica's start: a held request gets 503
        {"version": "v2", "path": "default", "traffic": 0, "engine": engine,
         "autoscale": {"min_replicas": 0, "max_replicas": 1, "activation_timeout_s": 0.1, **FAST}},
        # a fixed pair: PATCH with bounds gives it an autoscaler
        {"version": "v3", "path": "default", "traffic": 0, "engine": engine, "replicas": 2},
    ]}]}
    path = tmp / "models.json"
    path.write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def auto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Srv]:
    tmp = tmp_path_factory.mktemp("autoscale")
    srv = start_server(tmp, "--config", str(_config(tmp)), "--admin-key", ADMIN, "--data-dir", str(tmp / "data"))
    admin = httpx.Client(base_url=srv.base_url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
    tenant = admin.post("/admin/tenants", json={"name": "t", "models": ["*"]}).json()
    key = admin.post(f"/admin/tenants/{tenant['id']}/keys", json={"name": "k"}).json()["key"]
    user = httpx.Client(base_url=srv.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    yield Srv(srv, admin, user)
    srv.stop()


def _version(s: Srv, version: str) -> dict:
    model = s.admin.get("/admin/models/auto").json()
    return next(v for v in model["versions"] if v["version"] == version)


def _replicas(s: Srv, version: str) -> dict:
    return _version(s, version)["replicas"]


def _complete(s: Srv, model: str, max_tokens: int = 2, **kw: object) -> httpx.Response:
    return s.user.post("/v1/completions", json={"model": model, "prompt": "hello there", "max_tokens": max_tokens,
                                                 **kw})


def _audit(s: Srv, action: str) -> list[dict]:
    return [r for r in s.admin.get("/admin/audit").json()["data"] if r["action"] == action]


def test_scale_to_zero_then_a_request_activates_a_replica(auto: Srv) -> None:
    # Idle for a stable window: the autoscaler takes v1 to zero, and says why.
    assert wait_for(lambda: _replicas(auto, "v1")["ready"] == 0 and not _replicas(auto, "v1")["list"], 20)
    reps = _replicas(auto, "v1")
    last = reps["autoscale"]["last_decision"]
    assert last["desired"] == 0 and "zero" in last["reason"]
    assert auto.admin.get("/health").status_code == 200  # at zero the server can still serve
    down = [r for r in _audit(auto, "model.autoscale") if r["target"] == "auto@v1"]
    assert down and down[-1]["actor"] == "system" and down[-1]["details"]["desired"] == 0
    assert "figures" in down[-1]["details"] and down[-1]["details"]["current"] >= 1

    # A request at zero is held while a replica starts, then served.
    r = _complete(auto, "auto")
    assert r.status_code == 200, r.text
    assert r.headers["x-lockgate-replica"].startswith("auto@v1/")
    reps = _replicas(auto, "v1")
    assert reps["ready"] >= 1 and reps["cold_start_s"] and reps["cold_start_s"][-1] > 0
    cold = reps["list"][0]["cold_start"]
    assert cold["total_s"] == pytest.approx(cold["core_ready_s"] + cold["warm_up_s"], abs=0.002)
    up = [r for r in _audit(auto, "model.autoscale") if r["target"] == "auto@v1" and r["details"]["desired"] >= 1]
    assert up and "activator" in up[-1]["details"]["reason"]
    metrics = parse_metrics(auto.srv.metrics_text(ADMIN))
    assert metrics['lockgate:autoscale_scale_events_total{direction="down",mode="stable",model_name="auto",'
                   'version="v1"}'] >= 1
    assert any(k.startswith("lockgate:replica_cold_start_seconds{") and 'version="v1"' in k for k in metrics)
    assert metrics['lockgate:autoscale_replica_bounds{bound="max",model_name="auto",version="v1"}'] == 2
    assert metrics['lockgate:autoscale_held_requests{model_name="auto",version="v1"}'] == 0
    assert auto.admin.get("/admin/audit/verify").json()["ok"] is True


def test_activation_timeout_is_a_503_with_retry_after_and_leaks_nothing(auto: Srv) -> None:
    assert wait_for(lambda: _replicas(auto, "v2")["ready"] == 0 and not _replicas(auto, "v2")["list"], 20)
    r = _complete(auto, "auto@v2")
    assert r.status_code == 503, r.text
    err = r.json()["error"]
    assert err["code"] == "engine_unavailable" and "became ready within 0.1 s" in err["message"]
    assert 1 <= int(r.headers["retry-after"]) <= 300
    assert _replicas(auto, "v2")["autoscale"]["held"] == 0
    # The activation it asked for goes on: the next request finds the replica up.
    assert wait_for(lambda: _replicas(auto, "v2")["ready"] == 1, 20)
    assert _complete(auto, "auto@v2").status_code == 200
    usage = auto.admin.get("/admin/models/auto").json()
    assert next(v for v in usage["versions"] if v["version"] == "v2")["in_flight"] == 0


def test_patch_sets_bounds_and_scale_down_drains_in_flight_requests(auto: Srv) -> None:
    # Bounds on a fixed version give it an autoscaler; min 2 holds both replicas.
    r = auto.admin.patch("/admin/models/auto", json={"replicas": {"v3": {"min_replicas": 2, "max_replicas": 2}}})
    assert r.status_code == 200, r.text
    reps = _replicas(auto, "v3")
    assert reps["autoscale"]["min_replicas"] == 2 and reps["autoscale"]["max_replicas"] == 2
    assert wait_for(lambda: _replicas(auto, "v3")["ready"] == 2, 20)
    audit = _audit(auto, "model.replicas")[-1]
    assert audit["details"]["replicas"]["v3"] == {"before": 2, "after": {"min_replicas": 2, "max_replicas": 2}}

    # Streams in flight on both replicas, then the bounds drop to one: a replica drains, none is cut short.
    results: list[tuple[int, str]] = []

    def stream() -> None:
        with auto.user.stream("POST", "/v1/completions", json={
                "model": "auto@v3", "prompt": "count", "max_tokens": 150, "stream": True}) as resp:
            body = "".join(resp.iter_text())
            results.append((resp.status_code, body))

    threads = [threading.Thread(target=stream) for _ in range(6)]
    for t in threads:
        t.start()
    assert wait_for(lambda: _version(auto, "v3")["in_flight"] >= 6, 10)
    r = auto.admin.patch("/admin/models/auto", json={"replicas": {"v3": 1}})  # a number pins both bounds
    assert r.status_code == 200, r.text
    assert _replicas(auto, "v3")["autoscale"]["max_replicas"] == 1
    for t in threads:
        t.join(60)
    assert len(results) == 6
    assert all(code == 200 and "[DONE]" in body and '"error"' not in body for code, body in results)
    assert wait_for(lambda: len(_replicas(auto, "v3")["list"]) == 1, 20)


@pytest.mark.parametrize("body, fragment", [
    ({"replicas": {"v1": {"min_replicas": 3, "max_replicas": 2}}}, "min_replicas (3) is above max_replicas (2)"),
    ({"replicas": {"v1": {"min_replicas": 0, "max_replicas": 2**70}}}, "replicas.v1"),
    ({"replicas": {"v1": {"min_replicas": -1, "max_replicas": 2}}}, "replicas.v1"),
    ({"replicas": {"v1": {"min_replicas": 0}}}, "max_replicas"),
    ({"replicas": {"v1": {"min_replicas": 0, "max_replicas": 2, "policy": "x"}}}, "replicas.v1"),
    ({"replicas": {"v1": 0}}, "replicas.v1"),
])
def test_bad_bounds_are_400_and_change_nothing(auto: Srv, body: dict, fragment: str) -> None:
    before = _replicas(auto, "v1")["autoscale"]
    r = auto.admin.patch("/admin/models/auto", json=body)
    assert r.status_code == 400, r.text
    assert fragment in r.json()["error"]["message"]
    after = _replicas(auto, "v1")["autoscale"]
    assert (after["min_replicas"], after["max_replicas"]) == (before["min_replicas"], before["max_replicas"])


def test_bad_autoscale_at_load_is_400(auto: Srv) -> None:
    for extra, fragment in (({"autoscale": {"min_replicas": 2, "max_replicas": 1}}, "above max_replicas"),
                            ({"autoscale": {"max_replicas": 1, "panic_window_s": 600, "stable_window_s": 60}},
                             "panic_window_s"),
                            ({"autoscale": {"policy": "magic"}}, "autoscale.policy"),
                            ({"placement": {"num_gpus": -1}}, "placement.num_gpus"),
                            ({"placement": {"resources": {"GPU": 1}}}, "num_gpus"),
                            ({"placement": {"resources": {"bad name!": 1}}}, "placement.resources")):
        r = auto.admin.post("/admin/models", json={"name": "other", "version": "v1", "path": "default", **extra})
        assert r.status_code == 400, (extra, r.text)
        assert fragment in r.json()["error"]["message"], (extra, r.text)
    assert auto.admin.get("/admin/models/other").status_code == 404
