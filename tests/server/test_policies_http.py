"""Fallbacks, circuit breakers and hedged requests over HTTP (issue 27), on one fake-engine server.

Its models (each a fake engine core; tokens are not the point):
- steady: always answers; every other model falls back to it;
- flaky: TEST-ONLY fail_fraction 0.5 (every second request fails at submission); its breaker
  opens on one failure and half-opens after 0.5 s;
- short: a 64-token context (a longer prompt falls back);
- stall: every request's first output comes 3 s late; fallback after a 0.3 s first-token timeout;
- busy: one request at a time, slow steps (its queue fills: 429 queue_full falls back);
- hedgy: version a stalls every request for 2 s, version b does not (hedges go from a to b).
"""
from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from lockgate.bench.procs import ServerProcess, parse_metrics
from lockgate.gateway.routing import pick, sticky_point
from tests.server.conftest import start_server, wait_for

ADMIN = "sk-admin-policies-test"
CONFIG = {
    "models": [
        {"name": "steady", "versions": [{"version": "v1"}]},
        {"name": "flaky", "versions": [{"version": "v1", "fail_fraction": 0.5}], "fallbacks": ["steady"],
         "breaker": {"consecutive_failures": 1, "open_s": 0.5}},
        {"name": "short", "versions": [{"version": "v1", "engine": {"max_model_len": 64}}], "fallbacks": ["steady"]},
        {"name": "stall", "versions": [{"version": "v1", "engine": {"fake_stall_fraction": 1.0, "fake_stall_s": 3}}],
         "fallbacks": ["steady"], "first_token_timeout_s": 0.3},
        {"name": "busy", "versions": [{"version": "v1", "engine": {"max_num_seqs": 1, "fake_step_delay_s": 0.05}}],
         "fallbacks": ["steady"], "first_token_timeout_s": 30.0},
        {"name": "hedgy", "versions": [
            {"version": "a", "traffic": 50, "engine": {"fake_stall_fraction": 1.0, "fake_stall_s": 2}},
            {"version": "b", "traffic": 50}]},
    ],
}


@dataclass
class Env:
    srv: ServerProcess
    admin: httpx.Client
    a: httpx.Client  # tenant a: may use every model
    b: httpx.Client  # tenant b: may not use steady
    a_key: str
    tenant_a: str
    h: httpx.Client  # tenant h: interactive class, hedge: true (its safe requests are hedged without the header)
    tenant_h: str
    i: httpx.Client  # tenant i: interactive class, no hedge unless a request asks
    tenant_i: str

    def usage_rows(self, tenant_id: str) -> list[dict]:
        r = self.admin.get("/admin/usage", params={"tenant_id": tenant_id, "limit": 1000})
        assert r.status_code == 200, r.text
        return r.json()["data"]

    def row(self, request_id: str, tenant_id: str | None = None) -> dict:
        found: list[dict] = []

        def settled() -> bool:
            rows = self.usage_rows(tenant_id or self.tenant_a)
            found[:] = [x for x in rows if x["request_id"] == request_id]
            return bool(found)

        assert wait_for(settled, 10), f"no ledger row for {request_id}"
        return found[0]


def _client(srv: ServerProcess, key: str) -> httpx.Client:
    return httpx.Client(base_url=srv.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp: Path = tmp_path_factory.mktemp("policies")
    (tmp / "models.json").write_text(json.dumps(CONFIG))
    srv = start_server(tmp, "--config", str(tmp / "models.json"), "--load-format", "fake", "--num-kv-blocks", "256",
                       "--admin-key", ADMIN, "--data-dir", str(tmp / "data"), "--max-queued-requests", "2",
                       "--no-slo-admission", "--hedge-budget", "1.0")
    admin = _client(srv, ADMIN)
    keys, ids = [], []
    for name, models in (("a", ["*"]), ("b", ["flaky", "short"])):
        t = admin.post("/admin/tenants", json={"name": name, "models": models,
                                                "prices": {"steady": {"prompt": 1.0, "completion": 2.0},
                                                           "*": {"prompt": 10.0, "completion": 20.0}}}).json()
        ids.append(t["id"])
        keys.append(admin.post(f"/admin/tenants/{t['id']}/keys", json={"name": name}).json()["key"])
    # The hedging tenants run in the interactive class: its TTFT window holds only their requests, so
    # the hedge delay is the class's 0.5 s target (fewer than 20 answers measured).
    hedging = []
    for name, hedge in (("h", True), ("i", False)):
        t = admin.post("/admin/tenants", json={"name": name, "hedge": hedge, "priority": "interactive"}).json()
        assert t["hedge"] is hedge
        key = admin.post(f"/admin/tenants/{t['id']}/keys", json={"name": name}).json()["key"]
        hedging += [_client(srv, key), t["id"]]
    yield Env(srv, admin, _client(srv, keys[0]), _client(srv, keys[1]), keys[0], ids[0], *hedging)
    srv.stop()


def _chat(c: httpx.Client, model: str, text: str = "hello there", max_tokens: int = 3, **kw: object) -> httpx.Response:
    return c.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": text}],
                                                "max_tokens": max_tokens, "temperature": 0, **kw})


def _metrics(env: Env) -> dict[str, float]:
    return parse_metrics(env.srv.metrics_text(ADMIN))


def _metric(m: dict[str, float], name: str, **labels: str) -> float:
    """One series' value, whatever order its labels come in (0 when absent)."""
    want = {f'{k}="{v}"' for k, v in labels.items()}
    for key, value in m.items():
        if key.startswith(name + "{") and want <= set(key[len(name) + 1:-1].split(",")):
            return value
    return 0.0


def _errors(env: Env, model: str) -> float:
    return _metric(_metrics(env), "lockgate:model_version_requests_total", model_name=model, outcome="error")


def _breaker(env: Env, model: str) -> dict:
    return env.admin.get(f"/admin/models/{model}").json()["versions"][0]["breaker"]


# ---- fallbacks -------------------------------------------------------------------------------

def test_failure_falls_back_billed_at_the_serving_model_with_attempts_in_the_ledger(env: Env) -> None:
    """flaky fails its 2nd request at submission: that request is served by steady (its name in
    `model` and x-lockgate-model, steady's price), the ledger row lists flaky's attempt; then the
    breaker is open, so the 3rd request skips flaky at no cost; after 0.5 s a probe succeeds (the
    3rd submission to flaky is a good one) and the breaker closes."""
    ok = _chat(env.a, "flaky")
    assert ok.status_code == 200, ok.text
    assert ok.json()["model"] == "flaky"
    moved = _chat(env.a, "flaky")
    assert moved.status_code == 200, moved.text
    assert moved.json()["model"] == "steady"
    assert moved.headers["x-lockgate-model"] == "steady"
    row = env.row(moved.json()["id"])
    assert row["model"] == "steady"
    assert json.loads(row["attempts"]) == [{"model": "flaky", "version": "v1", "status": 503,
                                            "code": "engine_unavailable"}]
    usage = moved.json()["usage"]  # billed at steady's price (1 and 2 USD per 1M), not flaky's (10, 20)
    assert row["cost_nusd"] == usage["prompt_tokens"] * 1000 + usage["completion_tokens"] * 2000
    assert _breaker(env, "flaky")["state"] == "open"
    errors_before = _errors(env, "flaky")
    assert errors_before >= 1
    skipped = _chat(env.a, "flaky")
    assert skipped.status_code == 200 and skipped.json()["model"] == "steady"
    assert json.loads(env.row(skipped.json()["id"])["attempts"])[0]["code"] == "circuit_open"
    m = _metrics(env)
    assert _errors(env, "flaky") == errors_before  # skipped: nothing submitted to it
    assert _metric(m, "lockgate:circuit_breaker_state", model_name="flaky", replica="", state="open") == 1.0
    assert _metric(m, "lockgate:fallbacks_total", model_name="flaky", reason="circuit_open", to="steady") >= 1
    time.sleep(0.6)
    probe = _chat(env.a, "flaky")
    assert probe.status_code == 200 and probe.json()["model"] == "flaky"  # the half-open probe succeeded
    b = _breaker(env, "flaky")
    assert b["state"] == "closed" and b["transitions"] == 3  # closed -> open -> half_open -> closed


def test_a_fallback_the_tenant_may_not_use_is_skipped(env: Env) -> None:
    """Tenant b may use flaky but not steady: when flaky cannot serve, b gets flaky's own error,
    and never learns of steady."""
    got = []
    for _ in range(4):  # at least one lands on a failing submission or the open breaker
        r = _chat(env.b, "flaky")
        got.append(r.status_code)
        if r.status_code != 200:
            assert r.status_code == 503
            assert "steady" not in r.text
    assert 503 in got


def test_context_length_falls_back_to_a_longer_model(env: Env) -> None:
    long_prompt = " ".join(["apple river stone cloud"] * 30)  # well over 64 tokens
    r = _chat(env.a, "short", long_prompt, max_tokens=2)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "steady"
    attempts = json.loads(env.row(r.json()["id"])["attempts"])
    assert attempts == [{"model": "short", "version": "v1", "status": 400, "code": "context_length_exceeded"}]
    fits = _chat(env.a, "short", "hi", max_tokens=2)
    assert fits.status_code == 200 and fits.json()["model"] == "short"


def test_no_first_token_in_time_falls_back_and_counts_against_the_version(env: Env) -> None:
    t0 = time.monotonic()
    r = _chat(env.a, "stall", stream=False)
    took = time.monotonic() - t0
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "steady"
    assert took < 2.5  # not the 3 s stall
    assert json.loads(env.row(r.json()["id"])["attempts"])[0]["code"] == "first_token_timeout"
    # Streamed too, through the openai SDK: the stream comes from steady from its first chunk.
    client = openai.OpenAI(base_url=env.srv.base_url + "/v1", api_key=env.a_key, max_retries=0)
    chunks = list(client.chat.completions.create(model="stall", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=3, temperature=0, stream=True))
    assert {c.model for c in chunks} == {"steady"}
    assert _errors(env, "stall") >= 2


def test_a_stream_that_started_is_never_moved(env: Env) -> None:
    """busy's first token comes well inside its 30 s timeout, its status line only then; the whole
    answer (30 steps of 50 ms) is served by busy to the end, with no fallback."""
    with env.a.stream("POST", "/v1/chat/completions", json={
            "model": "busy", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 30,
            "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200
        body = "".join(r.iter_text())
    models = {json.loads(line[6:])["model"] for line in body.splitlines()
              if line.startswith("data: {")}
    assert models == {"busy"}
    assert body.rstrip().endswith("data: [DONE]")


def test_a_full_queue_falls_back(env: Env) -> None:
    """busy runs one request at a time and queues 2 (--max-queued-requests): with 3 long ones in,
    the next is refused there (queue_full) and served by steady."""
    def long_one(_: int) -> httpx.Response:
        return _chat(env.a, "busy", max_tokens=24)

    def in_flight() -> int:
        return env.admin.get("/admin/models/busy").json()["versions"][0]["in_flight"]

    with ThreadPoolExecutor(3) as pool:
        futures = []
        for i in range(3):  # one at a time: the first running before the others queue behind it
            futures.append(pool.submit(long_one, i))
            assert wait_for(lambda: in_flight() >= i + 1, 10)
            time.sleep(0.2)
        r = _chat(env.a, "busy", max_tokens=2)
        results = [f.result() for f in futures]
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "steady"
    assert json.loads(env.row(r.json()["id"])["attempts"])[0]["code"] == "queue_full"
    assert all(x.status_code == 200 for x in results)


# ---- hedged requests -------------------------------------------------------------------------

def _user_on_a(prefix: str) -> str:
    """A `user` the sticky 50/50 split sends to hedgy's stalling version a (routing.py's rule)."""
    return next(u for u in (f"{prefix}-{i}" for i in range(100))
                if pick({"a": 50.0, "b": 50.0}, sticky_point("hedgy", u)) == "a")


def _hedgy(env: Env, user: str, client: httpx.Client | None = None, **headers: str) -> httpx.Response:
    return (client or env.a).post("/v1/chat/completions", headers=headers, json={
        "model": "hedgy", "user": user, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
        "temperature": 0})


def test_a_hedge_wins_against_a_stall_and_the_loser_is_not_billed(env: Env) -> None:
    """Requests sticky on version a stall 2 s; hedged (the header), the copy on version b answers
    first, after the class's TTFT p95 (its 0.5 s target until 20 answers are measured)."""
    user = _user_on_a("user")
    t0 = time.monotonic()
    plain = _hedgy(env, user, env.i)
    assert plain.headers["x-lockgate-model-version"] == "a" and time.monotonic() - t0 >= 1.9  # the stall
    before = _metrics(env)
    t0 = time.monotonic()
    r = _hedgy(env, user, env.i, **{"x-lockgate-hedge": "true"})
    took = time.monotonic() - t0
    assert r.status_code == 200, r.text
    assert 0.5 <= took < 1.5
    row = env.row(r.json()["id"], env.tenant_i)
    assert row["hedged"] == 1 and row["model_version"] == "b"
    assert row["completion_tokens"] == r.json()["usage"]["completion_tokens"] == 3  # one copy's tokens
    after = _metrics(env)
    won = _metric(after, "lockgate:hedged_requests_total", outcome="won")
    assert won == _metric(before, "lockgate:hedged_requests_total", outcome="won") + 1
    # The loser was aborted at once: nothing left running on version a.
    assert wait_for(lambda: env.admin.get("/admin/models/hedgy").json()["versions"][0]["in_flight"] == 0, 5)


@pytest.mark.parametrize("headers,body,message", [
    ({"x-lockgate-hedge": "true"}, {"stream": True}, "streamed request cannot be hedged"),
    ({"x-lockgate-hedge": "true"}, {"temperature": 0.7}, "greedy (temperature 0) or seeded"),
    ({"x-lockgate-hedge": "maybe"}, {}, "must be true or false"),
])
def test_bad_hedge_requests(env: Env, headers: dict, body: dict, message: str) -> None:
    r = env.a.post("/v1/chat/completions", headers=headers, json={
        "model": "steady", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == "x-lockgate-hedge" and message in err["message"]


def test_a_seeded_sampled_request_may_be_hedged(env: Env) -> None:
    r = env.a.post(
        "/v1/chat/completions", headers={"x-lockgate-hedge": "true"},
        json={"model": "steady", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
              "temperature": 0.8, "seed": 7})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "steady"


def test_a_tenant_that_opted_in_is_hedged_without_the_header(env: Env) -> None:
    user = _user_on_a("tenant-user")
    t0 = time.monotonic()
    r = _hedgy(env, user, env.h)
    assert r.status_code == 200 and time.monotonic() - t0 < 1.5
    assert env.row(r.json()["id"], env.tenant_h)["hedged"] == 1
    streamed = env.h.post("/v1/chat/completions", json={  # not safe to hedge: served as asked, no 400
        "model": "steady", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True})
    assert streamed.status_code == 200
