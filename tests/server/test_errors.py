"""Every kind of bad input gets the right status and an OpenAI error object, never a 500."""
from __future__ import annotations

import httpx
import pytest

from tests.server.conftest import ServerProcess

CHAT = [{"role": "user", "content": "hi"}]


def _assert_error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


COMPLETION_CASES = [
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "temperature": 2.5}, "temperature"),
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
    ({"prompt": "x", "frequency_penalty": -2.5}, "frequency_penalty"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "max_tokens": "ten"}, "max_tokens"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 1000}, "n"),
    ({"prompt": "x", "n": True}, "n"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "stop": ["s"] * 17}, "stop"),
    ({"prompt": "x", "stop": [""]}, "stop"),
    ({"prompt": "x", "seed": "abc"}, "seed"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": [10**9]}, None),
    ({"prompt": "x", "stream": "yes"}, "stream"),
    ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"prompt": "x", "logit_bias": {"1": 500}}, "logit_bias"),
    ({"prompt": "x", "prompt_logprobs": 21}, "prompt_logprobs"),
    ({"prompt": "x", "use_beam_search": True}, "use_beam_search"),
    ({"temperature": 0}, "prompt"),
]


@pytest.mark.parametrize(("body", "param"), COMPLETION_CASES)
def test_completion_validation(server: ServerProcess, body: dict, param: str | None) -> None:
    r = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=30)
    _assert_error(r, 400, param)


CHAT_CASES = [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"content": "hi"}]}, "messages.0.role"),
    ({"messages": [{"role": "user"}]}, "messages.0.content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content.0.type"),
    ({"messages": CHAT, "top_logprobs": 30, "logprobs": True}, "top_logprobs"),
    ({"messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": CHAT, "max_completion_tokens": -1}, "max_completion_tokens"),
    ({"messages": CHAT, "n": 17}, "n"),
    ({"messages": CHAT, "response_format": {"type": "xml"}}, "response_format.type"),
    ({"messages": CHAT * 1100}, "messages"),
]


@pytest.mark.parametrize(("body", "param"), CHAT_CASES)
def test_chat_validation(server: ServerProcess, body: dict, param: str) -> None:
    r = httpx.post(f"{server.base_url}/v1/chat/completions", json=body, timeout=30)
    _assert_error(r, 400, param)


def test_malformed_json(server: ServerProcess) -> None:
    for raw in (b"{not json", b"", b"[1, 2]", b"null"):
        r = httpx.post(f"{server.base_url}/v1/chat/completions", content=raw,
                       headers={"content-type": "application/json"}, timeout=30)
        _assert_error(r, 400)


def test_unknown_model_is_404(server: ServerProcess) -> None:
    r = httpx.post(f"{server.base_url}/v1/chat/completions", json={"model": "gpt-9", "messages": CHAT})
    _assert_error(r, 404, "model", "model_not_found")


def test_over_context(server: ServerProcess) -> None:
    max_len = httpx.get(f"{server.base_url}/v1/models").json()["data"][0]["max_model_len"]
    r = httpx.post(f"{server.base_url}/v1/completions",
                   json={"prompt": [100] * (max_len - 10), "max_tokens": 100}, timeout=60)
    _assert_error(r, 400, "prompt", "context_length_exceeded")
    r = httpx.post(f"{server.base_url}/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "hello " * max_len}]}, timeout=60)
    _assert_error(r, 400, "messages", "context_length_exceeded")


def test_body_too_large_is_413(server: ServerProcess) -> None:
    big = {"prompt": "a" * 1_100_000}  # the shared server's limit is 1,000,000 bytes
    r = httpx.post(f"{server.base_url}/v1/completions", json=big, timeout=30)
    _assert_error(r, 413, code="request_too_large")

    def chunks():  # no Content-Length: the limit holds for chunked uploads too
        for _ in range(20):
            yield b"x" * 100_000

    r = httpx.post(f"{server.base_url}/v1/completions", content=chunks(), timeout=30,
                   headers={"content-type": "application/json"})
    _assert_error(r, 413, code="request_too_large")


def test_unknown_route_and_method(server: ServerProcess) -> None:
    _assert_error(httpx.get(f"{server.base_url}/v1/nothing"), 404)
    _assert_error(httpx.get(f"{server.base_url}/v1/completions"), 405)


def test_tokenize_errors(server: ServerProcess) -> None:
    _assert_error(httpx.post(f"{server.base_url}/tokenize", json={}), 400)
    _assert_error(httpx.post(f"{server.base_url}/detokenize", json={"tokens": [-1]}), 400, "tokens.0")
    _assert_error(httpx.post(f"{server.base_url}/detokenize", json={"tokens": "abc"}), 400, "tokens")
