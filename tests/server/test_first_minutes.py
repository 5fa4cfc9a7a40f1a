"""A newcomer's first minutes against one keyed fake-engine server: sampling defaults from
`--generation-config` (and the response cache keyed on them), `x-ratelimit-remaining-requests`
counting down, `/docs` from local assets only, and a second `serve` on the same port failing at
once, before it loads anything."""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from tests.server.conftest import ServerProcess, start_server

ADMIN = "sk-admin-first-minutes"
MODEL = "SmolLM2-135M-Instruct"
DEFAULT_MAX_TOKENS = 3  # the generation config's max_new_tokens
STEP_S = 0.02


@dataclass
class Env:
    srv: ServerProcess
    key: str

    def sdk(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.srv.base_url}/v1", api_key=self.key, max_retries=0, timeout=60)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.srv.base_url, headers={"Authorization": f"Bearer {self.key}"}, timeout=60)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("first-minutes")
    gen = tmp / "gen"
    gen.mkdir()
    # Greedy by default: the response cache may keep answers to requests that set no temperature.
    (gen / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.0, "top_k": 7, "max_new_tokens": DEFAULT_MAX_TOKENS}))
    # 20 ms per engine step: a completion of 8 tokens takes 160 ms or more (the rate-limit tests).
    srv = start_server(tmp, "--load-format", "fake", "--fake-step-delay", str(STEP_S), "--admin-key", ADMIN,
                       "--data-dir", str(tmp / "data"),
                       "--no-slo-admission", "--response-cache", "1MiB", "--generation-config", str(gen))
    yield Env(srv, _tenant_key(srv, "newcomer"))
    srv.stop()


def _tenant_key(srv: ServerProcess, name: str, **limits: int) -> str:
    admin = httpx.Client(base_url=srv.base_url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
    tenant = admin.post("/admin/tenants", json={"name": name, **limits})
    assert tenant.status_code == 201, tenant.text
    return admin.post(f"/admin/tenants/{tenant.json()['id']}/keys", json={"name": "k"}).json()["key"]


def test_the_startup_log_shows_the_sampling_defaults(env: Env) -> None:
    log = env.srv.log_text()
    assert re.search(r"sampling defaults for requests that leave them out: temperature=0, top_k=7, "
                     r"max_tokens=3 \(from .*gen\)", log), log[-3000:]


def test_requests_without_sampling_fields_take_the_models_defaults(env: Env) -> None:
    client = env.sdk()
    r = client.completions.create(model=MODEL, prompt="Once upon a time")
    assert r.usage.completion_tokens == DEFAULT_MAX_TOKENS  # max_new_tokens as the default max_tokens
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5)
    assert r.usage.completion_tokens == 5  # a field the request sets is its own
    c = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert c.usage.completion_tokens == DEFAULT_MAX_TOKENS


def test_the_response_cache_sees_the_defaults_applied(env: Env) -> None:
    http = env.http()
    body = {"model": MODEL, "prompt": "a greedy answer by default"}
    first, second = (http.post("/v1/completions", json=body) for _ in range(2))
    assert (first.headers["x-lockgate-cache"], second.headers["x-lockgate-cache"]) == ("miss", "hit")
    assert second.json()["choices"] == first.json()["choices"]
    sampled = http.post("/v1/completions", json={**body, "temperature": 0.8})  # no seed: never cached
    assert sampled.status_code == 200 and "x-lockgate-cache" not in sampled.headers


def test_remaining_requests_never_read_full_after_a_request(env: Env) -> None:
    """rpm 600 refills 10 units a second: a 160 ms request refilled its own unit before its headers
    were written, so they read 600 after every request; now the unit it took shows."""
    key = _tenant_key(env.srv, "slow-calls", rpm=600)
    with httpx.Client(base_url=env.srv.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
        for _ in range(3):
            t0 = time.monotonic()  # sampled: never a response-cache hit, always 8 engine steps
            r = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 8,
                                                   "temperature": 0.5})
            assert r.status_code == 200 and time.monotonic() - t0 >= 8 * STEP_S, r.text
            assert r.headers["x-ratelimit-limit-requests"] == "600"
            assert r.headers["x-ratelimit-remaining-requests"] == "599"  # refilled between calls, not in one


def test_quick_requests_count_down(env: Env) -> None:
    key = _tenant_key(env.srv, "quick-calls", rpm=60)  # a unit a second: quick calls on a busy machine
    seen = []
    with httpx.Client(base_url=env.srv.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
        for _ in range(3):
            r = http.post("/tokenize", json={"model": MODEL, "prompt": "hi"})  # cheap, and charged a unit
            assert r.status_code == 200, r.text
            seen.append(r.headers["x-ratelimit-remaining-requests"])
    assert seen == ["59", "58", "57"], seen


def test_docs_use_local_assets_only(env: Env) -> None:
    page = env.http().get("/docs")
    assert page.status_code == 200, page.text
    urls = re.findall(r"""(?:src|href)=["']([^"']+)["']|url: *["']([^"']+)["']""", page.text)
    urls = [u for pair in urls for u in pair if u]
    assert "/openapi.json" in urls and "/docs-assets/swagger-ui-bundle.js" in urls, urls
    assert all(u.startswith("/") and not u.startswith("//") for u in urls), urls  # nothing from a CDN
    assert "cdn" not in page.text and "https://" not in page.text
    for name, kind in (("swagger-ui-bundle.js", "text/javascript"), ("swagger-ui.css", "text/css"),
                       ("favicon.png", "image/png")):
        r = httpx.get(f"{env.srv.base_url}/docs-assets/{name}", timeout=30)  # no key: public files
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind), (name, r.status_code)
        assert len(r.content) > 500 and r.headers["x-content-type-options"] == "nosniff"
    assert b"SwaggerUIBundle" in httpx.get(f"{env.srv.base_url}/docs-assets/swagger-ui-bundle.js").content
    # Any other name is not open, and is no file with a key either.
    for name in ("swagger-ui-bundle.js.map", "..%2Fopenapi.json", "index.html"):
        assert httpx.get(f"{env.srv.base_url}/docs-assets/{name}").status_code == 401, name
        r = env.http().get(f"/docs-assets/{name}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (name, r.text)
    assert httpx.get(f"{env.srv.base_url}/docs").status_code == 401  # the page itself needs a key, as before
    assert env.http().get("/redoc").status_code == 404


def test_a_second_serve_on_the_same_port_fails_before_loading(env: Env, tmp_path: Path) -> None:
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "lockgate.server", "--port", str(env.srv.port),
                        "--data-dir", str(tmp_path / "data")],  # the real model: would load for seconds
                       capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - t0
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert f"error: port {env.srv.port} on 127.0.0.1 is already in use" in r.stderr and "--port" in r.stderr
    assert "Traceback" not in r.stderr
    for loading in ("engine ready", "loading", "Started server process", "replica"):
        assert loading not in r.stderr + r.stdout, loading
    assert not (tmp_path / "data").exists()
    assert elapsed < 30, elapsed  # a generous bound for a busy CI machine; it takes about a second
    assert env.http().get("/v1/models").status_code == 200  # the first server is untouched
