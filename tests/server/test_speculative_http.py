"""Speculative decoding behind the server: `--speculative-config` on a real (tiny, random-weight)
model, through the openai SDK; the vLLM-named metrics and the ledger's per-request counts; a client
that vanishes mid-stream leaves no KV behind; bad configurations refused before anything loads
(the command line) and with a 400 naming the field (`POST /admin/models`)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from tests.engine.tiny_models import make_checkpoint
from tests.server.conftest import ServerProcess, start_server, wait_for

ADMIN = "spec-http-root-key"
SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3,
        "policy": "always"}
PROMPT = "abcdefgh abcdefgh abcdefgh abcdefgh abcd"


@dataclass
class World:
    srv: ServerProcess
    root: httpx.Client
    key: str
    model: str
    ckpt: Path


@pytest.fixture(scope="module")
def w(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("spec-http")
    ckpt = tmp / "tiny"
    make_checkpoint(ckpt, "llama3.1")
    # A plain absolute path: served under that name, as vLLM does.
    srv = start_server(tmp, "--model", str(ckpt), "--admin-key", ADMIN, "--data-dir", str(tmp / "data"),
                       "--quantization", "int4", "--speculative-config", json.dumps(SPEC), "--no-slo-admission")
    root = httpx.Client(base_url=srv.base_url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
    try:
        t = root.post("/admin/tenants", json={"name": "acme"})
        assert t.status_code == 201, t.text
        key = root.post(f"/admin/tenants/{t.json()['id']}/keys", json={"name": "app"}).json()["key"]
        model = str(ckpt)
        yield World(srv, root, key, model, ckpt)
    finally:
        root.close()
        srv.stop()


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics"
    return float(m.group(1))


def test_openai_sdk_streams_with_speculation_and_counts_it(w: World):
    client = openai.OpenAI(base_url=w.srv.base_url + "/v1", api_key=w.key)
    kw = dict(model=w.model, prompt=PROMPT, max_tokens=48, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw, user="spec-user")
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True))
    assert whole.usage.completion_tokens == 48 and streamed == whole.choices[0].text
    m = w.root.get("/metrics").text
    drafted = metric(m, "lockgate:spec_decode_num_draft_tokens_total")
    accepted = metric(m, "lockgate:spec_decode_num_accepted_tokens_total")
    assert drafted > 0 and 0 <= accepted <= drafted
    assert metric(m, "lockgate:spec_decode_num_drafts_total") > 0
    assert "lockgate:spec_decode_num_accepted_tokens_per_pos_total" in m

    def row() -> dict | None:
        rows = w.root.get("/admin/usage", params={"user": "spec-user"}).json()["data"]
        return rows[0] if rows else None

    assert wait_for(lambda: row() is not None, 20)
    r = row()
    assert r["spec_draft_tokens"] > 0 and 0 <= r["spec_accepted_tokens"] <= r["spec_draft_tokens"]
    assert r["completion_tokens"] == 48


def test_client_vanishing_mid_speculation_leaves_no_kv(w: World):
    with httpx.Client(base_url=w.srv.base_url, headers={"Authorization": f"Bearer {w.key}"}, timeout=60) as c:
        with c.stream("POST", "/v1/completions", json={"model": w.model, "prompt": PROMPT, "max_tokens": 900,
                                                        "temperature": 0, "ignore_eos": True, "stream": True,
                                                        "user": "vanisher"}) as r:
            assert r.status_code == 200
            for i, _ in enumerate(r.iter_lines()):
                if i > 6:
                    break  # the client goes away mid-stream

    def idle() -> bool:
        m = w.root.get("/metrics").text
        return metric(m, "lockgate:num_requests_running") == 0 and metric(m, "lockgate:kv_cache_usage_perc") == 0

    assert wait_for(idle, 20)
    assert wait_for(lambda: w.root.get("/admin/usage", params={"user": "vanisher"}).json()["data"], 20)
    row = w.root.get("/admin/usage", params={"user": "vanisher"}).json()["data"][0]
    assert 0 < row["completion_tokens"] < 900  # cut short, and billed for what it got


@pytest.mark.parametrize("spec, needle", [
    ({"method": "medusa"}, "speculative_config.method must be one of ngram, draft_model"),
    ({"method": "ngram", "num_speculative_tokens": 2**70}, "num_speculative_tokens must be an integer from 1 to 16"),
    ({"method": "draft_model", "model": "/no/such/draft"}, "draft model path '/no/such/draft' does not exist"),
    ({"method": "ngram", "k": 4}, "unknown field(s) k"),
    ("ngram", "speculative_config"),
])
def test_admin_model_with_bad_speculative_config_is_refused(w: World, spec, needle):
    before = w.root.get("/admin/models").json()
    r = w.root.post("/admin/models", json={"name": "spec2", "version": "v1", "path": str(w.ckpt),
                                          "speculative_config": spec})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["param"] == "speculative_config", err
    assert w.root.get("/admin/models").json() == before  # nothing was started or kept


@pytest.mark.parametrize("value, needle", [
    ("{nope", "speculative_config is not valid JSON"),
    ('{"method": "draft_model", "model": "/no/such/draft"}', "does not exist"),
])
def test_serve_refuses_a_bad_speculative_config_before_loading(tmp_path, value, needle):
    p = subprocess.run([sys.executable, "-m", "lockgate.cli", "serve", "--port", "0", "--speculative-config", value],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and needle in p.stderr, p.stderr
