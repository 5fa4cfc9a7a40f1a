"""Replicas and the KV-cache-aware router over HTTP, on fake-engine replicas (issue 19).

Two servers for the module: `fleet` (3 replicas, keyed, two tenants) for routing, headers,
the ledger and bad input; `chaos` (2 replicas) for SIGKILL, SIGSTOP and scaling under load.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest

from lockgate.bench.procs import ServerProcess, pid_alive, parse_metrics
from tests.server.conftest import start_server, wait_for

ADMIN = "sk-admin-replicas-test"
MODEL = "fleet"
REPLICA_HEADER = "x-lockgate-replica"


@dataclass
class Fleet:
    srv: ServerProcess
    admin: httpx.Client
    a: httpx.Client  # tenant A's inference key
    b: httpx.Client  # tenant B's


def _client(srv: ServerProcess, key: str) -> httpx.Client:
    return httpx.Client(base_url=srv.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def _replicas(admin: httpx.Client, version: str = "v1") -> list[dict]:
    model = admin.get(f"/admin/models/{MODEL}").json()
    return next(v for v in model["versions"] if v["version"] == version)["replicas"]["list"]


def _all_ready(admin: httpx.Client, n: int) -> bool:
    reps = _replicas(admin)
    return len(reps) == n and all(r["state"] == "ready" and r["healthy"] for r in reps)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("fleet")
    srv = start_server(tmp, "--model", f"{MODEL}=default", "--replicas", "3", "--load-format", "fake",
                       "--fake-step-delay", "0.005", "--fake-token-delay", "0.0001", "--num-kv-blocks", "512",
                       "--admin-key", ADMIN, "--data-dir", str(tmp / "data"), "--max-num-seqs", "8")
    admin = _client(srv, ADMIN)
    assert wait_for(lambda: _all_ready(admin, 3), 60)
    keys = []
    for name in ("a", "b"):
        t = admin.post("/admin/tenants", json={"name": name, "models": ["*"]}).json()
        keys.append(admin.post(f"/admin/tenants/{t['id']}/keys", json={"name": name}).json()["key"])
    yield Fleet(srv, admin, _client(srv, keys[0]), _client(srv, keys[1]))
    srv.stop()


def _complete(c: httpx.Client, prompt: str, max_tokens: int = 2, **kw: object) -> httpx.Response:
    return c.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens, **kw})


def _words(seed: int, n: int) -> str:
    """A prompt of about `n` tokens, distinct per seed (plain words the tokenizer keeps whole)."""
    vocab = ["apple", "river", "stone", "cloud", "green", "table", "music", "light", "paper", "ocean"]
    return " ".join(f"{vocab[(seed * 7 + i * 3) % 10]}{(seed * 31 + i) % 97}" for i in range(n // 3))


def _routed(fleet: Fleet) -> dict[str, float]:
    return {k: v for k, v in parse_metrics(fleet.srv.metrics_text(ADMIN)).items()
            if k.startswith("lockgate:replica_requests_routed")}


def test_header_ledger_and_metrics_name_the_replica(fleet: Fleet) -> None:
    r = _complete(fleet.a, "hello there")
    assert r.status_code == 200, r.text
    name = r.headers[REPLICA_HEADER]
    assert name.startswith(f"{MODEL}@v1/") and int(name.rsplit("/", 1)[1]) in (0, 1, 2)
    rid = r.json()["id"]
    assert wait_for(lambda: any(row["request_id"] == rid for row in fleet.admin.get(
        "/admin/usage", params={"group_by": "request", "limit": 1000}).json()["data"]), 20)
    row = next(row for row in fleet.admin.get("/admin/usage", params={"group_by": "request", "limit": 1000}
                                              ).json()["data"] if row["request_id"] == rid)
    assert row["replica"] == name
    m = parse_metrics(fleet.srv.metrics_text(ADMIN))
    for i in range(3):
        lbl = f'{{model_name="{MODEL}",replica="{i}",version="v1"}}'
        assert f"vllm:num_requests_running{lbl}" in m and f"vllm:kv_cache_usage_perc{lbl}" in m
        assert m[f"lockgate:replica_up{lbl}"] == 1.0
    reps = _replicas(fleet.admin)
    assert [r["replica"] for r in reps] == [f"{MODEL}@v1/{i}" for i in range(3)]
    assert len({r["pid"] for r in reps}) == 3 and all(pid_alive(r["pid"]) for r in reps)
    assert all(r["kv_events"]["publisher"].startswith("ipc://") for r in reps)  # for tools reading vLLM's schema
    assert fleet.srv.engine_pids() and len(fleet.srv.engine_pids()) == 3  # their own processes
    assert httpx.get(f"{fleet.srv.base_url}/health").json() == {"status": "ok"}


def test_shared_system_prompt_does_not_pin(fleet: Fleet) -> None:
    """Once a system prompt is in most of the traffic it is cached everywhere as far as routing
    goes: a burst behind it spreads instead of piling onto the replica that cached it first."""
    system = _words(7, 400)

    def ask(i: int) -> httpx.Response:
        return fleet.a.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 8, "messages": [
            {"role": "system", "content": system}, {"role": "user", "content": f"user question number {i}"}]})

    first = [ask(i) for i in range(10)]
    assert all(r.status_code == 200 for r in first)
    with ThreadPoolExecutor(24) as pool:
        rs = list(pool.map(ask, range(10, 34)))
    assert all(r.status_code == 200 for r in rs)
    counts = Counter(r.headers[REPLICA_HEADER] for r in rs)
    # Spread, not pinned: every replica takes part and none takes most of the burst (how evenly
    # depends on when each request sees the others' load, which a busy machine shifts).
    assert len(counts) == 3 and max(counts.values()) <= 16, counts


def test_prefix_groups_stick_and_spread(fleet: Fleet) -> None:
    """Requests of one shared-prefix group go where the group's prefix is cached; groups spread."""
    where: dict[int, list[str]] = {}
    for rnd in range(4):
        for g in range(6):
            r = _complete(fleet.a, _words(100 + g, 300) + f" question {rnd}")
            assert r.status_code == 200, r.text
            where.setdefault(g, []).append(r.headers[REPLICA_HEADER])
    for g, names in where.items():
        assert len(set(names[1:])) == 1 and names[1] == names[0], (g, names)  # sticks after the first
    assert len({names[0] for names in where.values()}) >= 2  # groups do not all land on one replica
    hits = _complete(fleet.a, _words(100, 300) + " question 9").json()["usage"]
    assert hits["prompt_tokens_details"]["cached_tokens"] >= 256


def test_burst_spreads(fleet: Fleet) -> None:
    """32 simultaneous requests (no prefix in common): counted in flight as routed, so they spread."""
    with ThreadPoolExecutor(32) as pool:
        rs = list(pool.map(lambda i: _complete(fleet.a, _words(1000 + i, 60), max_tokens=8), range(32)))
    assert all(r.status_code == 200 for r in rs)
    counts = Counter(r.headers[REPLICA_HEADER] for r in rs)
    assert len(counts) == 3 and min(counts.values()) >= 6, counts


def test_tenant_b_never_hits_tenant_a_blocks(fleet: Fleet) -> None:
    prompt = _words(555, 300)
    assert _complete(fleet.a, prompt).status_code == 200
    again = _complete(fleet.a, prompt)
    assert again.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= 256
    before = _routed(fleet)
    b = _complete(fleet.b, prompt)
    assert b.status_code == 200
    assert b.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    after = _routed(fleet)
    prefix = sum(v for k, v in after.items() if 'reason="prefix"' in k) - \
        sum(v for k, v in before.items() if 'reason="prefix"' in k)
    assert prefix == 0  # B's identical prompt matched nothing of A's in the router's index either


def test_bad_replica_input(fleet: Fleet) -> None:
    admin = fleet.admin
    for bad in (0, 33, -1, 2**70, "3", 2.5, True, None):
        r = admin.post("/admin/models", json={"name": "x", "version": "v1", "path": "default", "replicas": bad})
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["error"]["param"] == "replicas", r.text
    for body, status, code in (
            ({"replicas": {"v1": 0}}, 400, None), ({"replicas": {"v1": 2**70}}, 400, None),
            ({"replicas": {"v1": "2"}}, 400, None), ({"replicas": None}, 400, None), ({"replicas": {}}, 400, None),
            ({"replicas": {"nope": 2}}, 404, "model_not_found"), ({"replicas": ["v1"]}, 400, None)):
        r = admin.patch(f"/admin/models/{MODEL}", json=body)
        assert r.status_code == status, (body, r.text)
        if code:
            assert r.json()["error"]["code"] == code
    r = admin.patch(f"/admin/models/{MODEL}", json={"replicas": {"v1": 32}, "traffic": {"v1": 100}})
    assert r.status_code in (200, 409)
    if r.status_code == 200:  # 32 fit under the server's bound: put it back
        admin.patch(f"/admin/models/{MODEL}", json={"replicas": {"v1": 3}})
    assert r.status_code == 200 or r.json()["error"]["code"] == "too_many_engines"
    assert _complete(fleet.a, "still serving").status_code == 200
    tenant_key = fleet.a.headers["Authorization"]
    r = httpx.patch(f"{fleet.srv.base_url}/admin/models/{MODEL}", json={"replicas": {"v1": 1}},
                    headers={"Authorization": tenant_key})
    assert r.status_code in (401, 403)
    assert len(_replicas(admin)) == 3


# ---- killing and scaling ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def chaos(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("chaos")
    srv = start_server(tmp, "--model", f"{MODEL}=default", "--replicas", "2", "--load-format", "fake",
                       "--fake-step-delay", "0.02", "--admin-key", ADMIN, "--data-dir", str(tmp / "data"),
                       "--max-num-seqs", "2", "--drain-timeout", "20")
    admin = _client(srv, ADMIN)
    assert wait_for(lambda: _all_ready(admin, 2), 60)
    t = admin.post("/admin/tenants", json={"name": "a", "models": ["*"]}).json()
    key = admin.post(f"/admin/tenants/{t['id']}/keys", json={"name": "a"}).json()["key"]
    yield Fleet(srv, admin, _client(srv, key), _client(srv, key))
    srv.stop()


def _usage_rows(fleet: Fleet) -> list[dict]:
    return fleet.admin.get("/admin/usage", params={"group_by": "request", "limit": 10000}).json()["data"]


def test_killed_replica_loses_nothing_not_started_and_restarts(chaos: Fleet) -> None:
    reps = _replicas(chaos.admin)
    victim = reps[1]
    rows_before = len(_usage_rows(chaos))
    # 16 requests of 20 tokens at 0.02 s a step, 2 running per replica: most wait in the queues.
    with ThreadPoolExecutor(16) as pool:
        futs = [pool.submit(_complete, chaos.a, _words(3000 + i, 30), 20) for i in range(16)]
        assert wait_for(lambda: _replicas(chaos.admin)[1]["in_flight"] >= 4, 10)
        os.kill(victim["pid"], signal.SIGKILL)
        degraded = wait_for(lambda: httpx.get(f"{chaos.srv.base_url}/health").json().get("status") == "degraded", 5,
                            0.01)
        rs = [f.result() for f in futs]
    failed = [r for r in rs if r.status_code != 200]
    assert degraded
    assert len(failed) <= 2, [r.text for r in failed]  # only those running on it (max_num_seqs 2) fail
    for r in failed:
        assert r.json()["error"]["code"] == "engine_dead", r.text
    ok = [r for r in rs if r.status_code == 200]
    assert all(r.headers[REPLICA_HEADER] for r in ok)
    assert wait_for(lambda: len(_usage_rows(chaos)) == rows_before + 16, 20)  # one ledger row each
    ids = [row["request_id"] for row in _usage_rows(chaos)]
    assert len(ids) == len(set(ids))
    assert wait_for(lambda: _all_ready(chaos.admin, 2), 30)  # restarted by its supervisor
    now = _replicas(chaos.admin)[1]
    assert now["restarts"] == 1 and now["pid"] != victim["pid"]
    assert httpx.get(f"{chaos.srv.base_url}/health").json() == {"status": "ok"}
    counts = Counter(_complete(chaos.a, _words(4000 + i, 30)).headers[REPLICA_HEADER] for i in range(8))
    assert f"{MODEL}@v1/1" in counts  # it takes traffic again


def test_stalled_replica_gets_no_new_request(chaos: Fleet) -> None:
    victim = _replicas(chaos.admin)[0]
    os.kill(victim["pid"], signal.SIGSTOP)
    try:
        time.sleep(2.7)  # idle and silent past the heartbeat: no new request within this
        with ThreadPoolExecutor(6) as pool:
            rs = list(pool.map(lambda i: _complete(chaos.a, _words(5000 + i, 30)), range(6)))
        assert all(r.status_code == 200 for r in rs)
        assert {r.headers[REPLICA_HEADER] for r in rs} == {f"{MODEL}@v1/1"}
    finally:
        os.kill(victim["pid"], signal.SIGCONT)


def test_scale_up_and_down_under_load_loses_nothing(chaos: Fleet) -> None:
    stop = threading.Event()
    results: list[httpx.Response] = []

    def load() -> None:
        i = 0
        while not stop.is_set():
            results.append(_complete(chaos.a, _words(6000 + i, 30), 4))
            i += 1

    threads = [threading.Thread(target=load) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        assert chaos.admin.patch(f"/admin/models/{MODEL}", json={"replicas": {"v1": 1}}).status_code == 200
        assert wait_for(lambda: len(_replicas(chaos.admin)) == 1, 30)
        seen = len(results)
        assert wait_for(lambda: len(results) > seen + 8, 30)
        assert chaos.admin.patch(f"/admin/models/{MODEL}", json={"replicas": {"v1": 3}}).status_code == 200
        assert wait_for(lambda: _all_ready(chaos.admin, 3), 60)
        seen = len(results)
        assert wait_for(lambda: len(results) > seen + 12, 30)
        assert chaos.admin.patch(f"/admin/models/{MODEL}", json={"replicas": {"v1": 1}}).status_code == 200
        assert wait_for(lambda: len(_replicas(chaos.admin)) == 1, 30)
        seen = len(results)
        assert wait_for(lambda: len(results) > seen + 8, 30)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert results and all(r.status_code == 200 for r in results), [r.text for r in results if r.status_code != 200]
    assert {r.headers[REPLICA_HEADER] for r in results} >= {f"{MODEL}@v1/1", f"{MODEL}@v1/2"}  # new ones served
    assert wait_for(lambda: len(chaos.srv.engine_pids()) == 1, 20)
    audit = chaos.admin.get("/admin/audit", params={"limit": 100}).json()["data"]
    changes = [e["details"]["replicas"]["v1"] for e in audit if e["action"] == "model.replicas"]
    assert changes[-3:] == [{"before": 2, "after": 1}, {"before": 1, "after": 3}, {"before": 3, "after": 1}]
