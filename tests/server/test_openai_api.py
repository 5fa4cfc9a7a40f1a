"""The official openai SDK against a real server: the shapes it parses must match OpenAI's."""
from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.server.conftest import ServerProcess

MODEL = "SmolLM2-135M-Instruct"
CHAT = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def aclient(server: ServerProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_models(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].object == "model" and models[0].owned_by == "lockgate"
    assert models[0].model_extra["quantization"] == "int4"  # the default model's stored precision
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_completion(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt="The sky is", max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.id.startswith("cmpl-")
    assert len(r.choices) == 1 and r.choices[0].text
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + 5


def test_completion_stream_matches_non_stream(client: openai.OpenAI) -> None:
    kw = dict(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0)
    full = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")


def test_chat(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    msg = r.choices[0].message
    assert msg.role == "assistant" and msg.content
    assert r.usage.prompt_tokens > 5 and r.usage.completion_tokens >= 1


def test_chat_stream_async(aclient: openai.AsyncOpenAI) -> None:
    async def run() -> tuple[list, str]:
        stream = await aclient.chat.completions.create(
            model=MODEL, messages=CHAT, max_completion_tokens=10, temperature=0, stream=True,
            stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        full = await aclient.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=10,
                                                     temperature=0)
        return chunks, full.choices[0].message.content

    chunks, full = asyncio.run(run())
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    assert all(c.usage is None for c in chunks[:-1])


def test_n2(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=6, n=2, temperature=1.0, seed=1)
    assert sorted(c.index for c in r.choices) == [0, 1]
    stream = client.completions.create(model=MODEL, prompt="Hello", max_tokens=4, n=2, stream=True,
                                       extra_body={"ignore_eos": True})
    texts = {0: "", 1: ""}
    finished = set()
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1} and all(texts.values())


def test_stop_string(client: openai.OpenAI) -> None:
    kw = dict(model=MODEL, prompt="1, 2, 3, 4, 5,", max_tokens=12, temperature=0)
    base = client.completions.create(**kw).choices[0].text
    assert len(base) > 4
    stop = base[2:4]  # something the greedy continuation is certain to contain
    r = client.completions.create(**kw, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == base[: base.index(stop)]
    assert r.choices[0].model_extra.get("stop_reason") == stop


def test_seed_reproducible(client: openai.OpenAI) -> None:
    kw = dict(model=MODEL, prompt="My favourite animal is", max_tokens=10, temperature=1.0)
    a = client.completions.create(**kw, seed=1234).choices[0].text
    b = client.completions.create(**kw, seed=1234).choices[0].text
    assert a == b


def test_chat_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert 1 <= len(content) <= 4
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
    # Greedy: the sampled token is the most likely one.
    assert content[0].token == content[0].top_logprobs[0].token


def test_completion_logprobs_and_batch(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL, prompt=["Hi", "Bye"], max_tokens=3, logprobs=2, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1]
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 3 and len(lp.token_logprobs) == 3 and len(lp.top_logprobs) == 3


def test_token_prompt_and_echo(client: openai.OpenAI, server: ServerProcess) -> None:
    ids = httpx.post(f"{server.base_url}/tokenize", json={"prompt": "Hello world"}).json()["tokens"]
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=2, echo=True, temperature=0)
    assert r.choices[0].text.startswith("Hello world")


def test_tokenize_detokenize(server: ServerProcess) -> None:
    tok = httpx.post(f"{server.base_url}/tokenize", json={"prompt": "Hello world", "return_token_strs": True})
    body = tok.json()
    assert body["count"] == len(body["tokens"]) > 0 and body["max_model_len"] > 0
    assert len(body["token_strs"]) == body["count"]
    text = httpx.post(f"{server.base_url}/detokenize", json={"tokens": body["tokens"]}).json()["prompt"]
    assert text.endswith("Hello world")
    chat = httpx.post(f"{server.base_url}/tokenize", json={"messages": CHAT}).json()
    assert chat["count"] > body["count"]


def test_health_version_metrics(server: ServerProcess, client: openai.OpenAI) -> None:
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    version = httpx.get(f"{server.base_url}/version").json()
    assert version["version"] and version["quantization"] == "int4"
    line = next(ln for ln in server.log_text().splitlines() if "precision int4" in ln)
    assert "steps: fused native decode" in line and "threads" in line  # the start-up line says what runs
    client.completions.create(model=MODEL, prompt="x", max_tokens=2)
    m = server.metrics()
    for name in ("lockgate:num_requests_running", "lockgate:num_requests_waiting", "lockgate:kv_cache_usage_perc",
                 "lockgate:prompt_tokens_total", "lockgate:generation_tokens_total",
                 "lockgate:time_to_first_token_seconds_count", "lockgate:e2e_request_latency_seconds_count"):
        assert name in m, name
    assert m["lockgate:generation_tokens_total"] >= 2
    assert m["lockgate:e2e_request_latency_seconds_count"] >= 1
