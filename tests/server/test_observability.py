"""Observability over real HTTP on fake-engine servers: metrics after a known set of requests
(counts and sums per tenant and class, engine-side timings), the SLO report and gauges, the
JSON request log, the ledger's queue time, and the shipped alert rules and dashboard."""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import ServerProcess, start_server, wait_for

ADMIN = "obs-admin-key"
ROOT = Path(__file__).resolve().parents[2]
PRICE = {"prompt": 2.0, "completion": 8.0}  # USD per 1M tokens
# Classes: the "strict" targets cannot be met (every request is bad); "fast" ones are loose.
CLASSES = {"default": "fast", "classes": [
    {"name": "fast", "ttft_p95_s": 30, "tpot_p95_s": 10, "max_queued": 64, "objective": 0.99},
    {"name": "strict", "ttft_p95_s": 1e-6, "tpot_p95_s": 1e-6, "max_queued": 64, "objective": 0.9},
]}
FAKE = ["--load-format", "fake", "--fake-step-delay", "0.01", "--max-model-len", "512"]


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("obs")
    (tmp / "classes.json").write_text(json.dumps(CLASSES))
    srv = start_server(tmp, *FAKE, "--admin-key", ADMIN, "--data-dir", str(tmp / "data"),
                       "--class-config", str(tmp / "classes.json"), "--no-slo-admission",
                       "--request-log-file", str(tmp / "requests.jsonl"), "--metrics-max-tenants", "1")
    srv.request_log = tmp / "requests.jsonl"  # type: ignore[attr-defined]
    yield srv
    srv.stop()


def _admin(srv: ServerProcess) -> httpx.Client:
    return httpx.Client(base_url=srv.base_url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)


def _tenant(srv: ServerProcess, name: str, priority: str) -> tuple[str, str]:
    with _admin(srv) as c:
        r = c.post("/admin/tenants", json={"name": name, "priority": priority, "prices": {"*": PRICE}})
        assert r.status_code == 201, r.text
        tid = r.json()["id"]
        r = c.post(f"/admin/tenants/{tid}/keys", json={"name": "k"})
        assert r.status_code == 201, r.text
        return tid, r.json()["key"]


def _samples(srv: ServerProcess) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = srv.metrics_text()  # with the admin key: /metrics needs one on a keyed server
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def _sum(samples: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lbls), v in samples.items() if n == name and want <= lbls)


def _post(srv: ServerProcess, key: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """A request; streamed ones are read to the end and their usage chunk returned as `usage`."""
    r = httpx.post(f"{srv.base_url}{path}", headers={"Authorization": f"Bearer {key}"}, json=body, timeout=60)
    assert r.status_code == 200, r.text
    if not body.get("stream"):
        return r.json()
    events = [json.loads(ln[6:]) for ln in r.text.splitlines() if ln.startswith("data: {")]
    return {"id": events[0]["id"], "usage": events[-1]["usage"]}


def _log_rows(path: Path) -> dict[str, dict[str, Any]]:
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return {r["request_id"]: r for r in rows}


def test_metrics_logs_ledger_and_slo_after_a_known_set_of_requests(keyed: ServerProcess) -> None:
    a_id, a_key = _tenant(keyed, "alpha", "fast")
    b_id, b_key = _tenant(keyed, "beta", "strict")
    before = _samples(keyed)
    sent: list[tuple[str, str, dict[str, Any]]] = []  # (tenant, class, response)
    # alpha (class fast; the first tenant seen keeps its label): 3 completions, one with n=2, one chat.
    for i in range(3):
        sent.append((a_id, "fast", _post(keyed, a_key, "/v1/completions",
                                         {"prompt": f"alpha prompt number {i}", "max_tokens": 4 + i})))
    sent.append((a_id, "fast", _post(keyed, a_key, "/v1/completions",
                                     {"prompt": "two choices please", "max_tokens": 5, "n": 2})))
    sent.append((a_id, "fast", _post(keyed, a_key, "/v1/chat/completions",
                                     {"messages": [{"role": "user", "content": "hello alpha"}], "max_tokens": 3})))
    # beta (class strict; over the label cap of 1: "other"): 2 streamed chats.
    for i in range(2):
        sent.append((b_id, "strict", _post(keyed, b_key, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": f"beta says {i}"}], "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}})))
    engine_requests = {a_id: 3 + 2 + 1, b_id: 2}  # n=2 runs two engine requests
    http_requests = {a_id: 5, b_id: 2}
    label = {a_id: a_id, b_id: "other"}

    log_path: Path = keyed.request_log  # type: ignore[attr-defined]
    assert wait_for(lambda: len(_log_rows(log_path)) >= len(sent), 10)
    after = _samples(keyed)

    def delta(name: str, **labels: str) -> float:
        return _sum(after, name, **labels) - _sum(before, name, **labels)

    prompt = sum(r["usage"]["prompt_tokens"] for _, _, r in sent)
    completion = sum(r["usage"]["completion_tokens"] for _, _, r in sent)
    cached = sum(r["usage"]["prompt_tokens_details"]["cached_tokens"] for _, _, r in sent)
    # Every engine step's tokens: prompt tokens computed (not those from the prefix cache) + tokens sampled.
    # The n=2 request's prompt is under one KV block (16 tokens), so its second child computes it again.
    twice = next(r["usage"]["prompt_tokens"] for _, _, r in sent if len(r.get("choices", [])) == 2)
    assert twice < 16
    assert delta("lockgate:iteration_tokens_total_sum") == prompt - cached + twice + completion
    steps = delta("lockgate:iteration_tokens_total_count")
    assert steps >= max(r["usage"]["completion_tokens"] for _, _, r in sent)
    assert delta("lockgate:engine_step_seconds_count") == steps
    assert delta("lockgate:engine_step_seconds_sum") >= 0.01 * steps  # the fake engine sleeps 10 ms a step

    for tid, cls in ((a_id, "fast"), (b_id, "strict")):
        mine = [r for t, _, r in sent if t == tid]
        lbl = {"tenant": label[tid], "class": cls}
        assert delta("lockgate:request_success_total", **lbl) == engine_requests[tid]  # one per choice
        assert delta("lockgate:time_to_first_token_seconds_count", **lbl) == http_requests[tid]
        assert delta("lockgate:e2e_request_latency_seconds_count", **lbl) == http_requests[tid]
        for hist in ("queue", "prefill", "decode", "inference"):
            assert delta(f"lockgate:request_{hist}_time_seconds_count", **lbl) == engine_requests[tid], hist
        assert delta("lockgate:request_queue_time_seconds_sum", **lbl) >= 0
        assert delta("lockgate:prompt_tokens_total", **lbl) == sum(r["usage"]["prompt_tokens"] for r in mine)
        assert delta("lockgate:generation_tokens_total", **lbl) == sum(r["usage"]["completion_tokens"] for r in mine)
        # The fake engine never stops early: each request's longest choice is its max_tokens.
        longest = sum(r["usage"]["completion_tokens"] // (2 if len(r.get("choices", [])) == 2 else 1) for r in mine)
        assert delta("lockgate:request_max_num_generation_tokens_sum", **lbl) == longest
        cost = sum(r["usage"]["prompt_tokens"] * PRICE["prompt"] + r["usage"]["completion_tokens"] * PRICE["completion"]
                   for r in mine) / 1e6
        assert delta("lockgate:cost_usd_total", **lbl) == pytest.approx(cost)

    # The request log: one parsable line per request, no prompt text.
    rows = _log_rows(log_path)
    text = log_path.read_text()
    assert "alpha prompt number" not in text and "beta says" not in text
    for tid, cls, resp in sent:
        row = rows[resp["id"]]
        assert row["tenant_id"] == tid and row["tenant"] in ("alpha", "beta") and row["key_id"].startswith("key_")
        assert row["class"] == cls and row["status"] == 200 and row["finish_reason"] == "length"
        assert row["prompt_tokens"] == resp["usage"]["prompt_tokens"]
        assert row["completion_tokens"] == resp["usage"]["completion_tokens"]
        assert row["queue_s"] is not None and row["queue_s"] >= 0
        assert 0 < row["ttft_s"] <= row["e2e_s"] and row["cost_usd"] > 0
        assert row["stream"] == (cls == "strict") and "prompt" not in row

    # The ledger's queue time is the engine's (the same number the log carries).
    with _admin(keyed) as c:
        assert wait_for(lambda: len(c.get("/admin/usage", params={"tenant_id": a_id}).json()["data"]) >= 5, 10)
        ledger = c.get("/admin/usage", params={"tenant_id": a_id}).json()["data"]
        for row in ledger:
            assert row["queue_time_s"] is not None
            assert row["queue_time_s"] == pytest.approx(rows[row["request_id"]]["queue_s"], abs=1e-5)

        # SLO: every strict request is bad (its targets cannot be met); fast ones met theirs.
        slo = c.get("/admin/slo").json()
    by_class = {x["class"]: x for x in slo["classes"]}
    good_fast = sum(1 for _, cls, r in sent if cls == "fast" and rows[r["id"]]["ttft_s"] <= 30)
    assert (by_class["fast"]["requests"], by_class["fast"]["good"]) == (5, good_fast)
    strict = by_class["strict"]
    assert (strict["requests"], strict["good"], strict["attainment"]) == (2, 0, 0.0)
    assert strict["burn_rates"]["5m"] == pytest.approx(1 / (1 - 0.9))  # all bad, 10 % allowed
    assert strict["error_budget_remaining"] == pytest.approx(1 - 2 / (0.1 * 2))
    assert strict["alerts"] == {"fast_burn": False, "slow_burn": True}  # burn 10: above 6, below 14.4
    assert _sum(after, "lockgate:slo_burn_rate", **{"class": "strict", "window": "1h"}) == pytest.approx(10.0)
    assert _sum(after, "lockgate:slo_attainment", **{"class": "strict"}) == 0.0
    assert _sum(after, "lockgate:slo_requests_total", **{"class": "strict", "outcome": "bad"}) == 2


def test_slo_routes_need_the_admin_scope(keyed: ServerProcess) -> None:
    _, key = _tenant(keyed, "gamma", "fast")
    for path in ("/admin/slo", "/slo"):
        r = httpx.get(f"{keyed.base_url}{path}", headers={"Authorization": f"Bearer {key}"}, timeout=10)
        assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_scope", (path, r.text)
        assert httpx.get(f"{keyed.base_url}{path}", timeout=10).status_code == 401
        with _admin(keyed) as c:
            body = c.get(path).json()
        assert body["object"] == "slo" and [x["class"] for x in body["classes"]] == ["fast", "strict"]


def _exposed_names(srv: ServerProcess) -> set[str]:
    """Every series name the exposition offers: histograms as _bucket/_sum/_count, counters as _total."""
    text = srv.metrics_text()  # with the admin key: /metrics needs one on a keyed server
    names: set[str] = set()
    for fam in text_string_to_metric_families(text):
        if fam.type == "histogram":
            names |= {fam.name + s for s in ("_bucket", "_sum", "_count")}
        elif fam.type == "counter":
            names.add(fam.name + "_total")
        else:
            names.add(fam.name)
        names |= {s.name for s in fam.samples}
    return names


def _lockgate_names(text: str) -> set[str]:
    return set(re.findall(r"lockgate:[a-zA-Z0-9_:]+", text))


def test_shipped_alert_rules_and_dashboard_use_real_metrics(keyed: ServerProcess) -> None:
    exposed = _exposed_names(keyed)
    rules = yaml.safe_load((ROOT / "deploy/prometheus/lockgate-alerts.yaml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    assert {r["alert"] for g in rules["groups"] for r in g["rules"]} >= {
        "LockgateSLOFastBurn", "LockgateSLOSlowBurn", "LockgateEngineDown", "LockgateQueueSaturated",
        "LockgateHighErrorRate"}
    assert all(r.get("labels", {}).get("severity") for g in rules["groups"] for r in g["rules"])
    dash = json.loads((ROOT / "deploy/grafana/lockgate.json").read_text())
    targets = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    queries = [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    for what, texts in (("alert rules", exprs), ("dashboard", targets + queries)):
        used = set().union(*(_lockgate_names(t) for t in texts))
        assert len(used) >= 10, (what, used)
        assert not used - exposed, f"{what} name metrics the server does not export: {sorted(used - exposed)}"
    # Both burn-rate alerts pair a long and a short window.
    fast = next(r["expr"] for g in rules["groups"] for r in g["rules"] if r["alert"] == "LockgateSLOFastBurn")
    assert 'window="1h"' in fast and 'window="5m"' in fast and "14.4" in fast


@pytest.fixture(scope="module")
def open_srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = start_server(tmp_path_factory.mktemp("obs-open"), *FAKE, "--log-prompts")
    yield srv
    srv.stop()


def test_open_mode_logs_prompts_to_stderr_and_serves_slo(open_srv: ServerProcess) -> None:
    url = open_srv.base_url
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "a memorable prompt", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200
    rid = r.json()["id"]
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "chat words"}],
                                                      "max_tokens": 2, "priority": "batch"}, timeout=60)
    chat_id = r.json()["id"]

    def rows() -> dict[str, dict[str, Any]]:
        out = {}
        for ln in open_srv.log_text().splitlines():
            if ln.startswith("{") and '"event":"request"' in ln:
                row = json.loads(ln)
                out[row["request_id"]] = row
        return out

    assert wait_for(lambda: chat_id in rows(), 10)
    row, chat = rows()[rid], rows()[chat_id]
    assert row["prompt"] == "a memorable prompt" and row["tenant_id"] is None and row["cost_usd"] is None
    assert chat["prompt"] == [{"role": "user", "content": "chat words"}] and chat["class"] == "batch"
    slo = httpx.get(f"{url}/slo", timeout=10).json()
    assert {x["class"]: x["requests"] for x in slo["classes"]} == {"interactive": 0, "standard": 1, "batch": 1}
    assert httpx.get(f"{url}/admin/slo", timeout=10).json()["error"]["code"] == "admin_disabled"
    m = _samples(open_srv)
    assert _sum(m, "lockgate:request_success_total", tenant="none", **{"class": "batch"}) == 1
    assert _sum(m, "lockgate:cost_usd_total") == 0  # no prices without keys
