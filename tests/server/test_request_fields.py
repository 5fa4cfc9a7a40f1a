"""Every field a request body declares does something or is refused, and unknown ones are named.

The audit: each field of `CompletionRequest` and `ChatCompletionRequest` is in exactly one
category below: it changes the engine's `SamplingParams` (checked on the params functions), it
changes the answer (checked live), it is a known field lockgate does not implement (a 400
`unsupported_parameter` naming it for anything but null or a harmless value) or it is marked
informational (accepted). A field added to a model without a category fails the audit.

Then the bounds of the new fields (logit_bias, prompt_logprobs, allowed_token_ids, bad_words,
max_tokens 0) and the `x-lockgate-ignored-fields` header, against one fake-engine server (the
model's tokens do not matter here: the real model's are checked in test_prompt_logprobs.py).
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from lockgate.engine.config import EngineConfig
from lockgate.server.config import ServerConfig
from lockgate.server.params import chat_params, completion_params
from lockgate.server.protocol import ChatCompletionRequest, CompletionRequest, Informational, Unsupported, marked
from tests.server.conftest import ServerProcess, start_server

CHAT = [{"role": "user", "content": "hi"}]
MAX_LOGPROBS = 5  # the server's --max-logprobs
ROUTES = {"/v1/completions": {"prompt": "Hello there", "max_tokens": 2},
          "/v1/chat/completions": {"messages": CHAT, "max_tokens": 2}}
MODELS = {"/v1/completions": CompletionRequest, "/v1/chat/completions": ChatCompletionRequest}


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    s = start_server(tmp_path_factory.mktemp("fields"), "--load-format", "fake", "--max-model-len", "256",
                     "--max-logprobs", str(MAX_LOGPROBS))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def http(srv: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=srv.base_url, timeout=60) as c:
        yield c


def _error(r: httpx.Response, param: str | None, code: str = "invalid_value") -> dict[str, Any]:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"], err
    assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    assert len(err["message"]) < 400, err  # never a client's long value echoed back
    return err


# ---- the audit ------------------------------------------------------------------------------------

# Fields that only change SamplingParams: a value that differs from the baseline's params.
SAMPLING = {
    "temperature": 0.5, "top_p": 0.5, "presence_penalty": 1.0, "frequency_penalty": 1.0, "seed": 7,
    "stop": ["x"], "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2, "min_tokens": 1, "ignore_eos": True,
    "stop_token_ids": [5], "include_stop_str_in_output": True, "skip_special_tokens": False,
    "spaces_between_special_tokens": False, "logit_bias": {"5": 10.0}, "allowed_token_ids": [5, 6],
    "bad_words": ["xyz"], "prompt_logprobs": 2, "n": 2, "max_tokens": 3,
    "response_format": {"type": "json_object"}, "structured_outputs": {"choice": ["a"]},
    "guided_json": {"type": "object"}, "guided_regex": "a+", "guided_choice": ["a"], "guided_grammar": 'root ::= "a"',
}
SAMPLING_COMPLETIONS = {**SAMPLING, "logprobs": 1}
SAMPLING_CHAT = {**SAMPLING, "logprobs": True, "max_completion_tokens": 3}


Check = Callable[[dict[str, Any], dict[str, Any]], bool]  # (answer, the reference's answer) -> changed?
TOOLS = [{"type": "function", "function": {"name": "f"}}]
# Fields that change SamplingParams only beside others: name -> (value, the fields it needs).
SAMPLING_BESIDE = {"parallel_tool_calls": (False, {"tools": TOOLS, "tool_choice": "required"})}
PARTIAL = [{"role": "user", "content": "Say hello"}, {"role": "assistant", "content": "Hello, I am"}]


def _status(code: int) -> Check:
    return lambda r, ref: r["_status"] == code and ref["_status"] == 200


def _prompt_tokens_differ(r: dict[str, Any], ref: dict[str, Any]) -> bool:
    return r["usage"]["prompt_tokens"] != ref["usage"]["prompt_tokens"]


# Fields whose effect shows in the answer, on the fake engine: (patch, reference patch, check).
LIVE_COMPLETIONS: dict[str, tuple[dict[str, Any], dict[str, Any], Check]] = {
    "prompt": ({"prompt": "Other and more words entirely"}, {}, _prompt_tokens_differ),
    "echo": ({"echo": True}, {}, lambda r, ref: r["choices"][0]["text"] == "Hello there" + ref["choices"][0]["text"]),
    "stream": ({"stream": True}, {}, lambda r, ref: r["_sse"]),
    "stream_options": ({"stream": True, "stream_options": {"include_usage": True}}, {"stream": True},
                       lambda r, ref: r["_sse_usage"] and not ref["_sse_usage"]),
    "model": ({"model": "no-such-model"}, {}, _status(404)),
    "priority": ({"priority": "no-such-class"}, {}, _status(400)),  # its effect: tests/server/test_slo.py
    "best_of": ({"best_of": 3}, {"best_of": 1}, _status(400)),  # only best_of == n is accepted
    "suffix": ({"suffix": "tail"}, {"suffix": ""}, _status(400)),
    "guided_whitespace_pattern": ({"guided_whitespace_pattern": "[a-z]*", "guided_json": {}},
                                  {"guided_whitespace_pattern": "[ ]*", "guided_json": {}}, _status(400)),
}
LIVE_CHAT: dict[str, tuple[dict[str, Any], dict[str, Any], Check]] = {
    "messages": ({"messages": [{"role": "user", "content": "a much longer question than before"}]}, {},
                 _prompt_tokens_differ),
    "top_logprobs": ({"logprobs": True, "top_logprobs": 3}, {"logprobs": True},
                     lambda r, ref: [len(c["choices"][0]["logprobs"]["content"][0]["top_logprobs"]) for c in (r, ref)]
                     == [3, 0]),
    "add_generation_prompt": ({"add_generation_prompt": False}, {}, _prompt_tokens_differ),
    "continue_final_message": ({"messages": PARTIAL, "continue_final_message": True, "add_generation_prompt": False},
                               {"messages": PARTIAL, "add_generation_prompt": False}, _prompt_tokens_differ),
    "chat_template_kwargs": ({"chat_template_kwargs": {"bos_token": "x"}}, {"chat_template_kwargs": {"y": 1}},
                             _status(400)),  # reserved names refused; others reach the template
    "tools": ({"tools": TOOLS}, {}, _prompt_tokens_differ),  # in the prompt (the fallback system message)
    "tool_choice": ({"tools": TOOLS, "tool_choice": "required"}, {"tools": TOOLS, "tool_choice": "none"},
                    lambda r, ref: r["choices"][0]["message"]["content"].startswith("[{")  # the calls' grammar
                    and not ref["choices"][0]["message"]["content"].startswith("[")),
    "guided_whitespace_pattern": ({"guided_whitespace_pattern": "[a-z]*", "guided_json": {}},
                                  {"guided_whitespace_pattern": "[ ]*", "guided_json": {}}, _status(400)),
    "stream": ({"stream": True}, {}, lambda r, ref: r["_sse"]),
    "stream_options": ({"stream": True, "stream_options": {"include_usage": True}}, {"stream": True},
                       lambda r, ref: r["_sse_usage"] and not ref["_sse_usage"]),
    "model": ({"model": "no-such-model"}, {}, _status(404)),
    "priority": ({"priority": "no-such-class"}, {}, _status(400)),  # its effect: tests/server/test_slo.py
}


def _call(http: httpx.Client, route: str, body: dict[str, Any]) -> dict[str, Any]:
    """The answer as JSON, with `_status`, and for a stream `_sse` / `_sse_usage`."""
    if body.get("stream"):
        with http.stream("POST", route, json=body) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        chunks = [json.loads(line[6:]) for line in lines[:-1]]
        usage = any(c.get("usage") for c in chunks)
        return {"_status": r.status_code, "_sse": lines[-1] == "data: [DONE]", "_sse_usage": usage}
    r = http.post(route, json=body)
    return {**r.json(), "_status": r.status_code}


def _values_of(schema: dict[str, Any]) -> list[Any]:
    """A valid value of each type the field's schema allows."""
    out: list[Any] = []
    for s in schema.get("anyOf", [schema]):
        t = s.get("type")
        if t == "boolean":
            out += [True, False]
        elif t in ("number", "integer"):
            out.append(5)
        elif t == "string":
            out.append("x")
        elif t == "object":
            out.append({"x": 1})
        elif t == "array":
            out.append([{"x": 1}] if s.get("items", {}).get("type") == "object" else ["x"])
    return out


@pytest.mark.parametrize("route", list(ROUTES))
def test_every_field_has_an_effect_or_a_400(http: httpx.Client, route: str) -> None:
    model = MODELS[route]
    sampling = SAMPLING_COMPLETIONS if route == "/v1/completions" else SAMPLING_CHAT
    live = LIVE_COMPLETIONS if route == "/v1/completions" else LIVE_CHAT
    unsupported = marked(model, Unsupported)
    informational = marked(model, Informational)
    beside = SAMPLING_BESIDE if route == "/v1/chat/completions" else {}
    groups = [set(sampling) | set(beside), set(live), set(unsupported), set(informational)]
    for i, a in enumerate(groups):
        for b in groups[i + 1:]:
            assert not a & b, f"fields in two categories: {a & b}"
    unclassified = set(model.model_fields) - set().union(*groups)
    assert not unclassified, f"fields with no checked effect: {sorted(unclassified)}"
    assert set().union(*groups) <= set(model.model_fields)

    # Sampling fields: each changes the engine's parameters.
    params_of = completion_params if route == "/v1/completions" else chat_params
    cfg, engine = ServerConfig(), EngineConfig(max_logprobs=MAX_LOGPROBS)
    base_body = {k: v for k, v in ROUTES[route].items() if k != "max_tokens"}
    baseline = params_of(model.model_validate(base_body), cfg, engine)
    for name, value in sampling.items():
        params = params_of(model.model_validate({**base_body, name: value}), cfg, engine)
        assert params != baseline, f"{name} changed nothing"
    for name, (value, needs) in beside.items():
        without = params_of(model.model_validate({**base_body, **needs}), cfg, engine)
        params = params_of(model.model_validate({**base_body, **needs, name: value}), cfg, engine)
        assert params != without, f"{name} changed nothing"

    # Answer fields: each changes the answer against its reference (or is refused where it
    # asks for what lockgate cannot do, while its harmless values are served).
    for name, (patch, ref_patch, changed) in live.items():
        got = _call(http, route, {**ROUTES[route], **patch})
        ref = _call(http, route, {**ROUTES[route], **ref_patch})
        assert changed(got, ref), f"{name}: {patch} -> {got}, reference {ref_patch} -> {ref}"

    # Unsupported fields: anything but null or a harmless value is a 400 naming the field.
    props = model.model_json_schema()["properties"]
    for name, mark in unsupported.items():
        for ok in (None, *mark.harmless):
            got = _call(http, route, {**ROUTES[route], name: ok})
            assert got["_status"] == 200, (name, ok, got)
        refused = [v for v in _values_of(props[name])
                   if not any(v == ok and isinstance(v, bool) == isinstance(ok, bool) for ok in mark.harmless)]
        assert refused, name
        for value in refused:
            err = _error(http.post(route, json={**ROUTES[route], name: value}), name, "unsupported_parameter")
            assert name in err["message"]

    # Informational fields: accepted.
    for name in informational:
        value = {"metadata": {"k": "v"}, "parallel_tool_calls": False}.get(name, "someone")
        assert _call(http, route, {**ROUTES[route], name: value})["_status"] == 200, name


# ---- bounds ---------------------------------------------------------------------------------------

BAD = [
    ({"logit_bias": {"5": 100.5}}, "logit_bias"),
    ({"logit_bias": {"5": -101}}, "logit_bias"),
    ({"logit_bias": {str(i): 1.0 for i in range(10_000)}}, "logit_bias"),
    ({"logit_bias": {"49152": 1.0}}, "logit_bias"),  # one past the default model's vocabulary
    ({"logit_bias": {"99999999999": 1.0}}, "logit_bias"),
    ({"logit_bias": {"abc": 1.0}}, "logit_bias"),
    ({"logit_bias": {"-1": 1.0}}, "logit_bias"),
    ({"logit_bias": {"1e3": 1.0}}, "logit_bias"),
    ({"logit_bias": {"7" * 100_000: 1.0}}, "logit_bias"),
    ({"logit_bias": {"\x00\n": 1.0}}, "logit_bias"),
    ({"logit_bias": {"5": "high"}}, "logit_bias.5"),
    ({"logit_bias": [5]}, "logit_bias"),
    ({"prompt_logprobs": MAX_LOGPROBS + 1}, "prompt_logprobs"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ({"prompt_logprobs": True}, "prompt_logprobs"),
    ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"allowed_token_ids": [49152]}, "allowed_token_ids"),
    ({"allowed_token_ids": [-1]}, "allowed_token_ids.0"),
    ({"bad_words": [""]}, "bad_words"),
    ({"bad_words": ["x" * 257]}, "bad_words"),
    ({"bad_words": ["w"] * 129}, "bad_words"),
    ({"max_tokens": -1}, "max_tokens"),
]


@pytest.mark.parametrize("route", list(ROUTES))
def test_bad_values_are_400s_naming_the_field(srv: ServerProcess, http: httpx.Client, route: str) -> None:
    for patch, param in BAD:
        _error(http.post(route, json={**ROUTES[route], **patch}), param)
    if route == "/v1/completions":
        _error(http.post(route, json={**ROUTES[route], "logprobs": MAX_LOGPROBS + 1}), "logprobs")
        _error(http.post(route, json={**ROUTES[route], "echo": True, "logprobs": MAX_LOGPROBS + 1}), "logprobs")
    else:
        _error(http.post(route, json={**ROUTES[route], "logprobs": True, "top_logprobs": MAX_LOGPROBS + 1}),
               "top_logprobs")
        _error(http.post(route, json={**ROUTES[route], "max_completion_tokens": -1}), "max_completion_tokens")
    # Nothing leaked: nothing queued or running, and the next request is served.
    m = srv.metrics()
    assert m["lockgate:num_requests_queued"] == 0 and m["lockgate:num_requests_in_flight"] == 0, m
    assert http.post(route, json=ROUTES[route]).status_code == 200


def test_max_tokens_0_generates_nothing(http: httpx.Client) -> None:
    r = http.post("/v1/completions", json={"prompt": "Hello there", "max_tokens": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == "" and choice["finish_reason"] == "length" and choice["logprobs"] is None
    assert r.json()["usage"]["completion_tokens"] == 0
    r = http.post("/v1/completions", json={"prompt": "Hello there", "max_tokens": 0, "echo": True, "logprobs": 2,
                                           "n": 2})
    body = r.json()
    assert [c["text"] for c in body["choices"]] == ["Hello there"] * 2
    lps = body["choices"][0]["logprobs"]
    assert len(lps["tokens"]) == body["usage"]["prompt_tokens"] and "".join(lps["tokens"]) == "Hello there"
    assert lps["token_logprobs"][0] is None and lps["top_logprobs"][0] is None
    assert all(len(t) <= 3 for t in lps["top_logprobs"][1:])  # 2 alternatives and the token itself
    assert body["choices"][1]["logprobs"] == lps
    r = http.post("/v1/chat/completions", json={"messages": CHAT, "max_completion_tokens": 0, "prompt_logprobs": 1})
    body = r.json()
    assert r.status_code == 200 and body["choices"][0]["message"]["content"] == ""
    assert len(body["prompt_logprobs"]) == body["usage"]["prompt_tokens"] and body["usage"]["completion_tokens"] == 0
    # The whole context for the prompt: nothing is left to generate, and nothing is asked.
    ids = [1] * 256
    assert http.post("/v1/completions", json={"prompt": ids, "max_tokens": 0}).status_code == 200
    _error(http.post("/v1/completions", json={"prompt": ids, "max_tokens": 1}), "prompt", "context_length_exceeded")


def test_prompt_logprobs_shape_and_sizes(http: httpx.Client) -> None:
    """vLLM's shape; echo's and prompt_logprobs' sizes are each their own when both are asked."""
    ids = http.post("/tokenize", json={"prompt": "Hello there, friend"}).json()["tokens"]
    body = {"prompt": "Hello there, friend", "max_tokens": 1, "echo": True, "logprobs": 1, "prompt_logprobs": 3}
    choice = http.post("/v1/completions", json=body).json()["choices"][0]
    plp = choice["prompt_logprobs"]
    assert len(plp) == len(ids) and plp[0] is None
    for tid, entry in zip(ids[1:], plp[1:]):
        assert str(tid) in entry and 3 <= len(entry) <= 4
        assert all(set(v) == {"logprob", "rank", "decoded_token"} for v in entry.values())
        assert sorted(v["rank"] for k, v in entry.items() if k != str(tid) or v["rank"] <= 3)[:3] == [1, 2, 3]
    echo = choice["logprobs"]
    assert len(echo["tokens"]) == len(ids) + 1
    assert all(len(t) <= 2 for t in echo["top_logprobs"][1:])
    for tid, entry, lp in zip(ids[1:], plp[1:], echo["token_logprobs"][1:len(ids)]):
        assert entry[str(tid)]["logprob"] == lp


def test_streamed_echo_leads_with_the_prompt(http: httpx.Client) -> None:
    body = {"prompt": "Hello there", "max_tokens": 3, "echo": True, "logprobs": 1, "prompt_logprobs": 1, "n": 2}
    full = http.post("/v1/completions", json=body).json()
    with http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    for i in range(2):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == i]
        assert mine[0]["text"].startswith("Hello there") and "prompt_logprobs" in mine[0]
        assert all("prompt_logprobs" not in c for c in mine[1:])
        assert "".join(c["text"] for c in mine) == full["choices"][i]["text"]
        tokens = [t for c in mine if c["logprobs"] for t in c["logprobs"]["tokens"]]
        offsets = [o for c in mine if c["logprobs"] for o in c["logprobs"]["text_offset"]]
        assert tokens == full["choices"][i]["logprobs"]["tokens"]
        assert offsets == full["choices"][i]["logprobs"]["text_offset"] and offsets == sorted(offsets)
        assert mine[0]["prompt_logprobs"] == full["choices"][i]["prompt_logprobs"]


# ---- unknown fields -------------------------------------------------------------------------------

def test_unknown_fields_are_named_in_a_header_and_logged(srv: ServerProcess, http: httpx.Client) -> None:
    r = http.post("/v1/completions", json=ROUTES["/v1/completions"])
    assert r.status_code == 200 and "x-lockgate-ignored-fields" not in r.headers
    r = http.post("/v1/completions", json={**ROUTES["/v1/completions"], "frobnicate": 1, "guided_jsn": {},
                                           "stream_options": None})
    assert r.status_code == 200 and r.headers["x-lockgate-ignored-fields"] == "frobnicate,guided_jsn"
    messages = [{"role": "user", "content": "hi", "reasoning_content": "x"},
                {"role": "assistant", "content": [{"type": "text", "text": "yo", "cache_control": {}}]},
                {"role": "user", "content": "again", "reasoning_content": "y"}]
    r = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1, "stream": True,
                                                "stream_options": {"include_usage": True, "chunked": 1}})
    assert r.status_code == 200
    assert r.headers["x-lockgate-ignored-fields"] == (
        "stream_options.chunked,messages.0.reasoning_content,messages.1.content.0.cache_control")
    assert "ignored unknown fields frobnicate,guided_jsn" in srv.log_text()
    # Hostile names: control characters, non-ASCII, a 100 KB name, a thousand names.
    hostile = {"a\r\nSet-Cookie: x=1": 1, "naïve": 2, "z" * 100_000: 3}
    r = http.post("/v1/completions", json={**ROUTES["/v1/completions"], **hostile})
    value = r.headers["x-lockgate-ignored-fields"]
    assert r.status_code == 200 and "set-cookie" not in r.headers
    assert value == "a??Set-Cookie??x?1,na?ve," + "z" * 64
    many = {f"field_{i}": i for i in range(1000)}
    r = http.post("/v1/completions", json={**ROUTES["/v1/completions"], **many})
    value = r.headers["x-lockgate-ignored-fields"]
    assert r.status_code == 200 and value == ",".join(f"field_{i}" for i in range(32)) + ",..."
    long_names = {f"{i}{'y' * 60}": i for i in range(20)}
    value = http.post("/v1/completions", json={**ROUTES["/v1/completions"], **long_names}).headers[
        "x-lockgate-ignored-fields"]
    assert len(value) <= 512 and value.endswith(",...") and value.startswith("0yyy")
