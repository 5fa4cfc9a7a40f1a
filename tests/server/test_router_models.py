"""Router models over HTTP (issue 27): `model: "auto"` goes to the model the router's rules choose
for the prompt (code, language, length, tenant, header), named in the response's `model`, the
`x-lockgate-model` header, the ledger's `router` column, the metrics and `/admin/models`.

One server for the module: three fake-engine models (the real tokenizer, no weights) and one
router, in keyed mode with four tenants (two unrestricted, one allowed the router and the small
model only, one allowed the small model only).
"""
from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from tests.server.conftest import ServerProcess, start_server, wait_for

ADMIN = "adm-router"
ENGINE = {"load_format": "fake", "fake_step_delay_s": 0.002, "fake_token_delay_s": 0.0001}
CONFIG = {
    "models": [
        {"name": "small", "versions": [{"version": "v1", "path": "default", "engine": {**ENGINE, "max_model_len": 256}}]},
        {"name": "coder", "versions": [{"version": "v1", "path": "default", "engine": ENGINE}]},
        {"name": "multi", "aliases": ["multilingual"],
         "versions": [{"version": "v1", "path": "default", "engine": {**ENGINE, "max_model_len": 2048}}]},
    ],
    "routers": [{"name": "auto", "default": "small", "rules": [
        {"name": "by-header", "when": {"header": {"X-Route": "multi"}}, "model": "multilingual"},
        {"name": "beta", "when": {"tenants": ["beta"]}, "model": "coder"},
        {"name": "code", "when": {"code": True}, "model": "coder"},
        {"name": "long", "when": {"min_prompt_tokens": 300}, "model": "multi@v1"},
        {"name": "languages", "when": {"languages": ["fr", "de"]}, "model": "multi"},
    ]}],
}
CODE = "Fix this:\n\n```python\ndef add(a, b):\n    return a - b\n```\n"
PROSE = "Tell me a fun fact about octopuses."


@dataclass
class Env:
    srv: ServerProcess
    data: Path
    admin: httpx.Client
    keys: dict[str, str]  # tenant name -> key

    def client(self, tenant: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.srv.base_url}/v1", api_key=self.keys[tenant], max_retries=0, timeout=60)

    def post(self, tenant: str, path: str, body: dict, **headers: str) -> httpx.Response:
        return httpx.post(f"{self.srv.base_url}{path}", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {self.keys[tenant]}", **headers})


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("routers")
    cfg = tmp / "models.json"
    cfg.write_text(json.dumps(CONFIG))
    srv = start_server(tmp, "--config", str(cfg), "--admin-key", ADMIN, "--data-dir", str(tmp / "data"),
                       "--no-slo-admission")
    admin = httpx.Client(base_url=srv.base_url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
    keys = {}
    for name, models in (("acme", ["*"]), ("beta", ["*"]), ("zeta", ["auto", "small"]), ("plain", ["small"])):
        t = admin.post("/admin/tenants", json={"name": name, "models": models}).json()
        keys[name] = admin.post(f"/admin/tenants/{t['id']}/keys", json={"name": "k"}).json()["key"]
    yield Env(srv, tmp / "data", admin, keys)
    admin.close()
    srv.stop()


def chat(env: Env, tenant: str, content: str, **headers: str) -> tuple[str, str, str]:
    """(response model, x-lockgate-model, request id) of one chat completion through the SDK."""
    raw = env.client(tenant).chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": content}],
        max_tokens=2, extra_headers=headers or None)
    body = raw.parse()
    return body.model, raw.headers["x-lockgate-model"], body.id


def test_rules_choose_the_model(env: Env) -> None:
    assert chat(env, "acme", PROSE)[:2] == ("small", "small")  # no rule: the default
    assert chat(env, "acme", CODE)[:2] == ("coder", "coder")
    assert chat(env, "acme", "Erkläre mir bitte die Photosynthese in einfachen Worten.")[:2] == ("multi", "multi")
    assert chat(env, "acme", "Quelle est la capitale de l'Australie ?")[:2] == ("multi", "multi")
    assert chat(env, "acme", PROSE, **{"x-route": "multi"})[:2] == ("multi", "multi")  # served name, not alias
    assert chat(env, "beta", PROSE)[:2] == ("coder", "coder")  # the tenant's rule
    # a long prompt: too long for small's 256-token context, served by the long-context model
    long_prompt = "Please summarize the following notes about the quarterly plan. " + "We ship often. " * 200
    r = env.post("acme", "/v1/completions", {"model": "auto", "prompt": long_prompt, "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "multi" and r.headers["x-lockgate-model"] == "multi"
    assert r.headers["x-lockgate-model-version"] == "v1"
    direct = env.post("acme", "/v1/completions", {"model": "small", "prompt": long_prompt, "max_tokens": 2})
    assert direct.status_code == 400 and direct.json()["error"]["code"] == "context_length_exceeded"
    assert direct.headers["x-lockgate-model"] == "small"  # on every routed answer, a router or not


def test_streamed_completion_names_the_model(env: Env) -> None:
    with httpx.stream("POST", f"{env.srv.base_url}/v1/completions", timeout=60,
                      headers={"Authorization": f"Bearer {env.keys['acme']}"},
                      json={"model": "auto", "prompt": "for (int i = 0; i < n; i++) {\n  sum += a[i];\n}\n",
                            "max_tokens": 3, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["x-lockgate-model"] == "coder"
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert events and all(e["model"] == "coder" for e in events)


def test_ledger_records_router_and_rule(env: Env) -> None:
    _, _, rid_code = chat(env, "acme", CODE)
    _, _, rid_default = chat(env, "acme", PROSE)
    rid_plain = env.client("acme").chat.completions.create(model="small", messages=[{"role": "user", "content": "hi"}],
                                                           max_tokens=1).id
    want = {rid_code: ("coder", "auto/code"), rid_default: ("small", "auto/default"), rid_plain: ("small", None)}

    def rows() -> dict[str, tuple[str, str | None]]:
        with sqlite3.connect(env.data / "lockgate.db") as db:
            got = db.execute(f"SELECT request_id, model, router FROM usage WHERE request_id IN "
                             f"({','.join('?' * len(want))})", list(want)).fetchall()
        return {r[0]: (r[1], r[2]) for r in got}

    assert wait_for(lambda: len(rows()) == 3, 10)
    assert rows() == want
    usage = env.admin.get("/admin/usage", params={"limit": 100}).json()["data"]  # request rows show it too
    assert {r["request_id"]: r["router"] for r in usage if r["request_id"] in want} == \
        {rid: router for rid, (_, router) in want.items()}


def test_tenant_allowlist_applies_to_router_and_choice(env: Env) -> None:
    assert chat(env, "zeta", PROSE)[:2] == ("small", "small")
    with pytest.raises(openai.NotFoundError) as info:  # the rule chose coder, which zeta may not use
        chat(env, "zeta", CODE)
    err = info.value.body
    assert err["code"] == "model_not_found" and "auto" in err["message"] and "coder" not in err["message"]
    r = env.post("plain", "/v1/chat/completions", {"model": "auto", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert "auto" in r.json()["error"]["message"]
    assert [m.id for m in env.client("plain").models.list()] == ["small"]
    zeta = {m.id for m in env.client("zeta").models.list()}
    assert zeta == {"small", "auto"}


def test_models_list_shows_the_router(env: Env) -> None:
    cards = {m.id: m for m in env.client("acme").models.list()}
    assert {"small", "coder", "multi", "multilingual", "auto"} <= set(cards)
    auto = cards["auto"].model_dump()
    assert auto["owned_by"] == "lockgate" and auto["router"] is True
    assert set(auto["models"]) == {"small", "coder", "multi", "multi@v1", "multilingual"}
    longest = max(cards[m].model_dump()["max_model_len"] for m in ("small", "coder", "multi"))
    assert auto["max_model_len"] == longest and cards["small"].model_dump()["max_model_len"] == 256
    # Fake engines run no weights: the float path ("none"); a router runs none itself (null).
    assert cards["small"].model_dump()["quantization"] == "none" and auto["quantization"] is None
    assert httpx.get(f"{env.srv.base_url}/version").json()["quantization"] == "none"  # the default model's
    tok = env.post("acme", "/tokenize", {"model": "auto", "prompt": "hello world"})
    assert tok.status_code == 200 and tok.json()["count"] >= 2  # the default's tokenizer


def test_metrics_and_admin_view_count_hits(env: Env) -> None:
    before = env.admin.get("/admin/models/auto").json()
    hits = {r["name"]: r["hits"] for r in before["rules"]}
    assert hits["code"] >= 2 and hits["languages"] >= 2 and hits["beta"] >= 1 and hits["by-header"] >= 1
    assert before["default_hits"] >= 2 and before["router"] is True
    chat(env, "acme", CODE)
    after = env.admin.get("/admin/models").json()
    auto = next(r for r in after["routers"] if r["name"] == "auto")
    assert next(r["hits"] for r in auto["rules"] if r["name"] == "code") == hits["code"] + 1
    assert {m["name"] for m in after["data"]} == {"small", "coder", "multi"}
    text = env.admin.get("/metrics").text
    line = next(ln for ln in text.splitlines() if ln.startswith("lockgate:router_requests_total{")
                and 'rule="code"' in ln)
    assert 'router="auto"' in line and 'model="coder"' in line and float(line.split()[-1]) == hits["code"] + 1


def test_bad_requests(env: Env) -> None:
    r = env.post("acme", "/v1/chat/completions", {"model": "auto", "messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = env.post("acme", "/v1/completions", {"model": "auto", "prompt": "x" * (11 * 2**20)})
    assert r.status_code == 413
