"""`POST /v1/embeddings` over HTTP, with the `openai` SDK: float and base64, `dimensions`, the
embedding cache (a hit per input on repeat, none across tenants, TTL expiry; metrics and ledger
rows), tenants' limits and budgets, every bad input a 400 naming its field with nothing left
reserved; and the embedded default model answering through the session's real-model server.

One fake-engine server for the module (real tokenizer and scheduler; deterministic bag-of-tokens
vectors, engine/core/fake_runner.py), keyed, its cache in the store (the data directory's SQLite
file, as several API workers share it) with a short TTL."""
from __future__ import annotations

import base64
import math
import sqlite3
import struct
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.server.conftest import ServerProcess, start_server, wait_for

ADMIN = "adm-embeddings"
MODEL = "SmolLM2-135M-Instruct"
HIDDEN = 576  # SmolLM2-135M's hidden size: the fake engine's vectors have it too
TTL_S = 2.0
PRICE = {"prompt": 1.0, "completion": 5.0, "cached_prompt": 0.1}  # USD per 1M tokens


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    d = tmp_path_factory.mktemp("embeddings")
    s = start_server(d, "--load-format", "fake", "--admin-key", ADMIN, "--data-dir", str(d / "data"),
                     "--max-model-len", "256", "--no-slo-admission", "--embedding-cache-ttl", str(TTL_S))
    s.data_dir = d / "data"  # type: ignore[attr-defined]
    yield s
    s.stop()


class Admin:
    def __init__(self, srv: ServerProcess) -> None:
        self.srv = srv
        self.c = httpx.Client(base_url=srv.base_url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)

    def tenant(self, name: str, **body: Any) -> tuple[str, str]:
        r = self.c.post("/admin/tenants", json={"name": name, "prices": {"*": PRICE}, **body})
        assert r.status_code == 201, r.text
        tid = r.json()["id"]
        r = self.c.post(f"/admin/tenants/{tid}/keys", json={"name": "k"})
        assert r.status_code == 201, r.text
        return tid, r.json()["key"]

    def rows(self, tenant_id: str, n: int) -> list[dict[str, Any]]:
        """The tenant's ledger rows, once there are `n` (they are written just after the answer)."""
        def get() -> list[dict[str, Any]]:
            r = self.c.get("/admin/usage", params={"tenant_id": tenant_id, "group_by": "request", "limit": 1000})
            assert r.status_code == 200, r.text
            return r.json()["data"]
        assert wait_for(lambda: len(get()) >= n, 10), get()
        return get()

    def metric(self, name: str, tenant: str) -> float:
        """`name` summed over its series of this tenant (every class)."""
        return sum(v for k, v in self.srv.metrics().items()
                   if k.startswith(name + "{") and f'tenant="{tenant}"' in k)


@pytest.fixture(scope="module")
def admin(srv: ServerProcess) -> Admin:
    return Admin(srv)


def client(srv: ServerProcess, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key=key, max_retries=0)


def post(srv: ServerProcess, key: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{srv.base_url}/v1/embeddings", json={"model": MODEL, **body},
                      headers={"Authorization": f"Bearer {key}"}, timeout=60)


def norm(v: list[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


def test_openai_sdk_float_and_base64(srv: ServerProcess, admin: Admin) -> None:
    _, key = admin.tenant("sdk")
    c = client(srv, key)
    texts = ["The cat sat on the mat.", "A cat was sitting on the mat.", "Quarterly revenue rose."]
    floats = c.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    assert floats.object == "list" and floats.model == MODEL
    assert [d.index for d in floats.data] == [0, 1, 2]
    for d in floats.data:
        assert d.object == "embedding" and len(d.embedding) == HIDDEN and abs(norm(d.embedding) - 1) < 1e-5
    a, b, other = (d.embedding for d in floats.data)
    dot = lambda x, y: sum(p * q for p, q in zip(x, y))  # noqa: E731
    assert dot(a, b) > dot(a, other)  # the fake engine's bag of tokens: shared words are closer
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > 3
    # The SDK's default asks for base64 on the wire and decodes it: the same float32 values.
    decoded = c.embeddings.create(model=MODEL, input=texts)
    assert [d.embedding for d in decoded.data] == [d.embedding for d in floats.data]
    raw = post(srv, key, {"input": texts[0], "encoding_format": "base64"})
    assert raw.status_code == 200, raw.text
    blob = base64.b64decode(raw.json()["data"][0]["embedding"])
    assert len(blob) == 4 * HIDDEN and list(struct.unpack(f"<{HIDDEN}f", blob)) == a
    # One token-id input, and a list of them: as their texts' tokens.
    ids = httpx.post(f"{srv.base_url}/tokenize", json={"model": MODEL, "prompt": texts[0]},
                     headers={"Authorization": f"Bearer {key}"}).json()["tokens"]
    assert c.embeddings.create(model=MODEL, input=ids, encoding_format="float").data[0].embedding == a
    two = c.embeddings.create(model=MODEL, input=[ids, ids[:3]], encoding_format="float")
    assert two.data[0].embedding == a and two.usage.prompt_tokens == len(ids) + 3


def test_dimensions_keep_the_first_values_normalized(srv: ServerProcess, admin: Admin) -> None:
    _, key = admin.tenant("dims")
    c = client(srv, key)
    full = c.embeddings.create(model=MODEL, input="shorter vectors", encoding_format="float").data[0].embedding
    short = c.embeddings.create(model=MODEL, input="shorter vectors", dimensions=8,
                                encoding_format="float").data[0].embedding
    n = norm(full[:8])
    assert len(short) == 8 and abs(norm(short) - 1) < 1e-5
    assert all(abs(s - f / n) < 1e-6 for s, f in zip(short, full[:8]))
    whole = c.embeddings.create(model=MODEL, input="shorter vectors", dimensions=HIDDEN, encoding_format="float")
    assert whole.data[0].embedding == full


def test_the_cache_answers_repeated_inputs_and_bills_them_as_cached(srv: ServerProcess, admin: Admin) -> None:
    tid, key = admin.tenant("cache")
    c = client(srv, key)
    first = c.embeddings.create(model=MODEL, input=["alpha one", "beta two", "gamma three"], encoding_format="float")
    engine_tokens = admin.metric("lockgate:prompt_tokens_total", tid)
    assert admin.metric("lockgate:embedding_cache_misses_total", tid) == 3
    assert admin.metric("lockgate:embedding_cache_hits_total", tid) == 0
    # Two of three found: only the third runs in the engine; all three count as prompt tokens.
    second = c.embeddings.create(model=MODEL, input=["alpha one", "beta two", "delta four"], encoding_format="float")
    assert [d.embedding for d in second.data[:2]] == [d.embedding for d in first.data[:2]]
    assert admin.metric("lockgate:embedding_cache_hits_total", tid) == 2
    assert admin.metric("lockgate:embedding_cache_misses_total", tid) == 4
    p1, p2 = first.usage.prompt_tokens, second.usage.prompt_tokens
    cached = p1 - len(httpx.post(f"{srv.base_url}/tokenize", json={"model": MODEL, "prompt": "gamma three"},
                                 headers={"Authorization": f"Bearer {key}"}).json()["tokens"])
    new = p2 - cached
    assert second.usage.prompt_tokens_details == {"cached_tokens": cached}
    assert admin.metric("lockgate:prompt_tokens_total", tid) == engine_tokens + new  # the engine ran `new` only
    # All three found: nothing runs, the answer still comes with its row.
    third = c.embeddings.create(model=MODEL, input=["delta four", "alpha one"], encoding_format="float")
    assert third.data[0].embedding == second.data[2].embedding
    assert admin.metric("lockgate:prompt_tokens_total", tid) == engine_tokens + new
    assert srv.metrics()[f'lockgate:embedding_cache_bytes{{model_name="{MODEL}"}}'] >= 4 * 4 * HIDDEN
    rows = admin.rows(tid, 3)
    p3 = third.usage.prompt_tokens
    cost = {(r["prompt_tokens"], r["cached_tokens"], r["completion_tokens"]): r["cost_usd"] for r in rows}
    assert sorted(cost) == sorted([(p1, 0, 0), (p2, cached, 0), (p3, p3, 0)])
    assert cost[(p1, 0, 0)] == pytest.approx(p1 * 1e-6)  # the prompt price
    assert cost[(p2, cached, 0)] == pytest.approx(new * 1e-6 + cached * 0.1e-6)  # cached at the cached price
    assert cost[(p3, p3, 0)] == pytest.approx(p3 * 0.1e-6)
    assert all(r["finish_reason"] == "stop" and r["status"] == 200 and r["model"] == MODEL for r in rows)
    assert all(r["ttft_s"] is not None for r in rows)


def test_no_hit_across_tenants(srv: ServerProcess, admin: Admin) -> None:
    a_id, a_key = admin.tenant("iso-a")
    b_id, b_key = admin.tenant("iso-b")
    text = ["a text both tenants send"]
    va = client(srv, a_key).embeddings.create(model=MODEL, input=text, encoding_format="float")
    vb = client(srv, b_key).embeddings.create(model=MODEL, input=text, encoding_format="float")
    assert vb.data[0].embedding == va.data[0].embedding  # the same model's vector...
    assert vb.usage.prompt_tokens_details == {"cached_tokens": 0}  # ...computed again for the other tenant
    assert admin.metric("lockgate:embedding_cache_hits_total", b_id) == 0
    assert admin.metric("lockgate:embedding_cache_misses_total", b_id) == 1
    again = client(srv, b_key).embeddings.create(model=MODEL, input=text, encoding_format="float")
    assert again.usage.prompt_tokens_details == {"cached_tokens": again.usage.prompt_tokens}
    assert sorted(r["cached_tokens"] for r in admin.rows(b_id, 2)) == [0, again.usage.prompt_tokens]


def test_an_entry_expires_after_its_ttl(srv: ServerProcess, admin: Admin) -> None:
    _, key = admin.tenant("ttl")
    c = client(srv, key)
    c.embeddings.create(model=MODEL, input="short lived", encoding_format="float")
    stored = time.monotonic()  # the entry is written before the answer is sent: it expires before stored + TTL
    hit = c.embeddings.create(model=MODEL, input="short lived", encoding_format="float")
    assert time.monotonic() - stored < TTL_S - 0.5  # (else this machine is too slow to tell)
    assert hit.usage.prompt_tokens_details["cached_tokens"] == hit.usage.prompt_tokens
    time.sleep(max(0.0, stored + TTL_S + 0.1 - time.monotonic()))
    late = c.embeddings.create(model=MODEL, input="short lived", encoding_format="float")
    assert late.usage.prompt_tokens_details == {"cached_tokens": 0}


def test_limits_and_budgets_hold(srv: ServerProcess, admin: Admin) -> None:
    _, small_tpm = admin.tenant("tpm", tpm=5)
    r = post(srv, small_tpm, {"input": "one two three four five six seven eight nine ten"})
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded", r.text
    _, poor = admin.tenant("poor", budget_usd=0.000001)  # a micro-dollar: 1 token at $1 per 1M
    r = post(srv, poor, {"input": "one two three four five"})
    assert r.status_code == 429 and r.json()["error"]["code"] == "budget_exceeded", r.text


LONG_IDS = list(range(300))  # over the 256-token context


@pytest.fixture(scope="module")
def refused(admin: Admin) -> tuple[str, str]:
    """The tenant that sends every bad request."""
    return admin.tenant("refused")


@pytest.mark.parametrize(("body", "param", "code", "needle"), [
    ({"input": ""}, "input", "invalid_value", "must not be empty"),
    ({"input": []}, "input", "invalid_value", "must not be empty"),
    ({"input": ["fine", ""]}, "input.1", "invalid_value", "input.1 must not be empty"),
    ({"input": [[1, 2], []]}, "input.1", "invalid_value", "must not be empty"),
    ({"input": ["x"] * 2049}, "input", "invalid_value", "at most 2048 inputs"),
    ({"input": [5, 99999999]}, "input", "invalid_value", "outside the vocabulary"),
    ({"input": [[5], [2**70]]}, "input.1", "invalid_value", "outside the vocabulary"),
    ({"input": [-1]}, "input", "invalid_value", "outside the vocabulary"),
    ({"input": LONG_IDS}, "input", "context_length_exceeded", "maximum context length is 256"),
    ({"input": ["ok", "word " * 400]}, "input.1", "context_length_exceeded", "maximum context length is 256"),
    ({"input": "x", "dimensions": 0}, "dimensions", "invalid_value", "greater than or equal to 1"),
    ({"input": "x", "dimensions": 2**70}, "dimensions", "invalid_value", "less than or equal to"),
    ({"input": "x", "dimensions": HIDDEN + 1}, "dimensions", "invalid_value", f"between 1 and {HIDDEN}"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format", "invalid_value", "'float' or 'base64'"),
    ({"input": 5}, "input", "invalid_value", "invalid type"),
    ({"input": [1, "a"]}, "input", "invalid_value", "invalid type"),
    ({"model": "no-such-model", "input": "x"}, "model", "model_not_found", "does not exist"),
])
def test_bad_input_is_a_400_naming_the_field(srv: ServerProcess, admin: Admin, refused: tuple[str, str],
                                             body: dict, param: str, code: str, needle: str) -> None:
    tid, key = refused
    r = post(srv, key, body)
    status = 404 if code == "model_not_found" else 400
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == code and needle in err["message"], err
    # Nothing reserved, nothing billed: a refusal is counted, never a ledger row.
    r = admin.c.get("/admin/usage", params={"tenant_id": tid, "group_by": "request"})
    assert r.json()["data"] == []


def test_a_body_over_the_limit_is_a_413_and_nothing_is_left_behind(srv: ServerProcess, admin: Admin) -> None:
    _, key = admin.tenant("huge")
    r = post(srv, key, {"input": ["word " * 200_000] * 10})  # 10 MB
    assert r.status_code == 413 and r.json()["error"]["code"], r.text

    def idle() -> bool:
        m = srv.metrics()
        with sqlite3.connect(srv.data_dir / "lockgate.db") as conn:  # type: ignore[attr-defined]
            reserved = conn.execute("SELECT count(*) FROM reservations").fetchone()[0]
        return reserved == 0 and m["lockgate:num_requests_queued"] == 0 and m["lockgate:num_requests_in_flight"] == 0
    assert wait_for(idle, 10)


def test_more_than_10mb_of_text_is_a_400_under_a_larger_body_limit() -> None:
    """The 4 MiB body limit answers first by default (413 above); raised, the inputs' own bound holds."""
    from lockgate.errors import APIError
    from lockgate.server.serving_embeddings import embedding_inputs

    assert [n for n, _ in embedding_inputs(["a" * 6_000_000, "b" * 4_000_000])] == ["input.0", "input.1"]
    with pytest.raises(APIError) as err:
        embedding_inputs(["a" * 6_000_000, "b" * 4_000_001])
    assert err.value.status == 400 and err.value.param == "input" and "10000000 characters" in str(err.value.message)


def test_the_default_model_answers(server: ServerProcess) -> None:
    """The embedded SmolLM2 (the session's real-model server): unit vectors of its hidden size; two
    sentences saying the same are closer than an unrelated one."""
    c = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0)
    r = c.embeddings.create(model=MODEL, encoding_format="float", input=[
        "The cat sat on the mat.", "A cat was sitting on the mat.", "Quarterly revenue rose by 12 percent in Europe."])
    a, b, other = (d.embedding for d in r.data)
    assert all(len(v) == HIDDEN and abs(norm(v) - 1) < 1e-4 for v in (a, b, other))
    dot = lambda x, y: sum(p * q for p, q in zip(x, y))  # noqa: E731
    assert dot(a, b) > dot(a, other) + 0.1
