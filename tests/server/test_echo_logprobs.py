"""Scoring prompts and steering tokens through the HTTP API, on the real model (its tokens matter):
`echo` + `logprobs` + `max_tokens: 0` through the official SDK (lm-evaluation-harness's request),
vLLM's `prompt_logprobs` on both routes, streamed echo, and `logit_bias` / `allowed_token_ids` /
`bad_words` forcing and banning tokens (greedy). Uses the session's shared real-model server.
"""
from __future__ import annotations

import json
import math
from operator import itemgetter
from typing import Any

import httpx
import openai
import pytest

from tests.server.conftest import ServerProcess

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "The capital of France is Paris. The capital of Italy is"


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, timeout=120)


def _ids(http: httpx.Client, text: str) -> list[int]:
    return http.post("/tokenize", json={"prompt": text}).json()["tokens"]


def test_echo_scores_a_prompt_through_the_sdk(client: openai.OpenAI, http: httpx.Client) -> None:
    r = client.completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=1, max_tokens=0, temperature=0)
    choice = r.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    ids = _ids(http, PROMPT)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0
    lp = choice.logprobs
    assert lp is not None and len(lp.tokens) == len(ids) and "".join(lp.tokens) == PROMPT
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(math.isfinite(v) and v <= 0 for v in lp.token_logprobs[1:])
    assert lp.text_offset == sorted(set(lp.text_offset)) and lp.text_offset[0] == 0
    assert all(PROMPT[o:].startswith(t) for o, t in zip(lp.text_offset, lp.tokens))
    for tok, value, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert 1 <= len(top) <= 2 and top.get(tok, value) == value and max(top.values()) >= value
    assert any(v > -1 for v in lp.token_logprobs[-3:])  # " Rome" after "The capital of Italy is": no noise

    # The same numbers as vLLM's prompt_logprobs for the same prompt.
    body = {"prompt": PROMPT, "max_tokens": 0, "prompt_logprobs": 1}
    plp = http.post("/v1/completions", json=body).json()["choices"][0]["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None
    for tid, entry, value, top in zip(ids[1:], plp[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert entry[str(tid)]["logprob"] == pytest.approx(value, abs=1e-5)
        best = min(entry.values(), key=itemgetter("rank"))
        assert best["rank"] == 1 and top[best["decoded_token"]] == pytest.approx(best["logprob"], abs=1e-5)


def test_lm_eval_loglikelihood_request(http: httpx.Client) -> None:
    """lm-evaluation-harness's `local-completions` for loglikelihood: a batch of token-id prompts
    (context + continuation), echo, logprobs 1, max_tokens 1, temperature 0; it sums
    `token_logprobs[ctxlen:-1]` and checks greediness against `top_logprobs`."""
    ctx = _ids(http, "The capital of Italy is")
    conts = [_ids(http, " Rome"), _ids(http, " a banana")]
    prompts = [ctx + c for c in conts]
    body = {"model": MODEL, "prompt": prompts, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
            "echo": True}
    out = http.post("/v1/completions", json=body).json()
    scores = []
    for choice, prompt in zip(sorted(out["choices"], key=itemgetter("index")), prompts):
        lps = choice["logprobs"]
        assert len(lps["token_logprobs"]) == len(prompt) + 1  # the prompt, then the one generated token
        span = lps["token_logprobs"][len(ctx):-1]
        tops = lps["top_logprobs"][len(ctx):-1]
        greedy = all(tok == max(top.values()) for tok, top in zip(span, tops))
        scores.append((sum(span), greedy))
    assert scores[0][0] > scores[1][0]  # Rome is likelier than a banana
    assert scores[0][1] and not scores[1][1]


def test_streamed_echo_with_logprobs(client: openai.OpenAI) -> None:
    kw = dict(model=MODEL, prompt=PROMPT, echo=True, logprobs=2, max_tokens=2, temperature=0)
    full = client.completions.create(**kw).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(**kw, stream=True) if c.choices]
    assert chunks[0].text.startswith(PROMPT)
    assert chunks[0].logprobs.token_logprobs[0] is None and len(chunks[0].logprobs.tokens) > 10
    assert "".join(c.text for c in chunks) == full.text
    tokens = [t for c in chunks if c.logprobs for t in c.logprobs.tokens]
    values = [v for c in chunks if c.logprobs for v in c.logprobs.token_logprobs]
    offsets = [o for c in chunks if c.logprobs for o in c.logprobs.text_offset]
    assert tokens == full.logprobs.tokens and offsets == full.logprobs.text_offset
    assert values[1:] == pytest.approx(full.logprobs.token_logprobs[1:], abs=1e-4)


def test_chat_prompt_logprobs_match_the_completions_route(http: httpx.Client) -> None:
    messages = [{"role": "user", "content": "What is the capital of Italy?"}]
    r = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1, "temperature": 0,
                                               "prompt_logprobs": 2}).json()
    plp = r["prompt_logprobs"]
    assert len(plp) == r["usage"]["prompt_tokens"] and plp[0] is None
    assert all(2 <= len(e) <= 3 for e in plp[1:])
    ids = http.post("/tokenize", json={"messages": messages}).json()["tokens"]
    same = http.post("/v1/completions", json={"prompt": ids, "max_tokens": 0, "prompt_logprobs": 2}).json()
    other = same["choices"][0]["prompt_logprobs"]
    assert len(other) == len(plp)
    for a, b in zip(plp[1:], other[1:]):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k]["rank"] == b[k]["rank"] and a[k]["logprob"] == pytest.approx(b[k]["logprob"], abs=1e-5)
    # Streamed: the first chunk that follows them carries them, once.
    with http.stream("POST", "/v1/chat/completions", json={"messages": messages, "max_tokens": 1, "temperature": 0,
                                                          "prompt_logprobs": 2, "stream": True}) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    carried = [c["prompt_logprobs"] for c in chunks if "prompt_logprobs" in c]
    assert len(carried) == 1 and len(carried[0]) == len(plp)


def test_logit_bias_forces_and_bans_through_the_sdk(client: openai.OpenAI, http: httpx.Client) -> None:
    kw: dict[str, Any] = dict(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0, logprobs=0,
                              extra_body={"ignore_eos": True})
    base = client.completions.create(**kw).choices[0].logprobs.tokens
    assert base[0] == " Rome"  # what bad_words bans below
    banana = _ids(http, " banana")[0]
    assert client.completions.create(**kw, logit_bias={str(banana): 100}).choices[0].text == " banana banana"
    first = _ids(http, base[0])[0]
    banned = client.completions.create(**kw, logit_bias={str(first): -100}).choices[0].logprobs.tokens
    assert base[0] not in banned
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                          temperature=0, logit_bias={str(banana): 100})
    assert chat.choices[0].message.content == " banana banana"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1, logit_bias={"49152": 1})
    assert err.value.body["param"] == "logit_bias" and "vocabulary" in err.value.body["message"]


def test_allowed_token_ids_and_bad_words(http: httpx.Client) -> None:
    body = {"prompt": PROMPT, "max_tokens": 2, "temperature": 0, "ignore_eos": True, "logprobs": 0}
    allowed = [_ids(http, " yes")[0], _ids(http, " no")[0]]
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                                               "temperature": 0, "allowed_token_ids": allowed})
    assert r.json()["choices"][0]["message"]["content"] in {" yes yes", " yes no", " no yes", " no no"}
    got = http.post("/v1/completions", json={**body, "bad_words": ["Rome"]}).json()["choices"][0]["logprobs"]
    assert " Rome" not in got["tokens"] and "Rome" not in got["tokens"]
