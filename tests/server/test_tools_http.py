"""Tool calling over HTTP with the official openai SDK. The grammar-enforced paths run on the fake
engine (its runner draws grammar-valid tokens: the grammar, the parsing and the streamed shape are
what is tested), with one `required` call and `auto` on the session's real-model server (the
embedded SmolLM2-135M, temperature 0; its template has no tool support, so the tools reach it
in a system message): `required`, a named function and `parallel_tool_calls: false` enforced by
grammar (the arguments validate against the function's parameters schema), streamed the way
OpenAI streams calls; `auto` and `none`; a tool-result round trip in the history; every bad
input a 400 naming the field, with nothing left in flight.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.server.conftest import ServerProcess, start_server

MODEL = "SmolLM2-135M-Instruct"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 24},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"timezone": {"type": "string", "pattern": "^[A-Z][a-z]{2,12}/[A-Z][a-z]{2,12}$"}},
        "required": ["timezone"], "additionalProperties": False}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                      "parameters": WEATHER, "strict": True}},
    {"type": "function", "function": {"name": "get_time", "description": "The time in a timezone",
                                      "parameters": TIME}},
    {"type": "function", "function": {"name": "ping", "description": "Takes no arguments"}},
]
PARAMS = {"get_weather": WEATHER, "get_time": TIME, "ping": {"type": "object", "maxProperties": 0}}
ASK = [{"role": "user", "content": "What is the weather in Paris and the time in Tokyo?"}]
MAX_TOKENS = 160


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = start_server(tmp_path_factory.mktemp("tools-fake"), "--load-format", "fake", "--no-slo-admission")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(fake: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{fake.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def real(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


def test_the_real_model_is_held_to_the_functions_schema(real: openai.OpenAI) -> None:
    weather = [TOOLS[0]]
    r = real.chat.completions.create(model=MODEL, messages=ASK, tools=weather, tool_choice="required",
                                     parallel_tool_calls=False, max_tokens=48, temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls", c
    assert _check_calls(c.message.tool_calls, {"get_weather"})[0][0] == "get_weather"


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, timeout=120)


def _check_calls(calls: list[Any], names: set[str]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_"), call
        assert call.function.name in names, call
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, PARAMS[call.function.name])
        out.append((call.function.name, args))
    assert len({c.id for c in calls}) == len(calls)  # ids are unique
    return out


def _stream(client: openai.OpenAI, **kw: Any) -> tuple[dict[int, dict[str, Any]], str, str | None]:
    """A streamed answer reassembled as a client does: calls by index (id, name, arguments joined;
    the first delta of a call must carry its id, type and name), content, finish reason."""
    calls: dict[int, dict[str, Any]] = {}
    content, reason = "", None
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            content += c.delta.content or ""
            for d in c.delta.tool_calls or ():
                if d.index not in calls:
                    assert d.id and d.id.startswith("call_") and d.type == "function" and d.function.name, d
                    calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
                else:
                    assert d.id is None and d.function.name is None, d  # the name comes first, once
                calls[d.index]["arguments"] += d.function.arguments or ""
            reason = c.finish_reason or reason
    return calls, content, reason


def test_required_gives_calls_that_validate(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                       max_tokens=MAX_TOKENS, temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls", c
    assert c.message.content is None and c.message.tool_calls
    _check_calls(c.message.tool_calls, set(PARAMS))
    # Streamed: the same calls, the name first and the arguments' fragments joined.
    calls, content, reason = _stream(client, model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                     max_tokens=MAX_TOKENS, temperature=0)
    assert reason == "tool_calls" and content == ""
    assert [(v["name"], json.loads(v["arguments"])) for _, v in sorted(calls.items())] == \
        [(t.function.name, json.loads(t.function.arguments)) for t in c.message.tool_calls]


def test_named_function_and_no_parallel_calls(client: openai.OpenAI) -> None:
    named = {"type": "function", "function": {"name": "get_time"}}
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice=named,
                                       max_tokens=MAX_TOKENS, temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
    assert _check_calls(c.message.tool_calls, {"get_time"})[0][0] == "get_time"
    calls, _, reason = _stream(client, model=MODEL, messages=ASK, tools=TOOLS, tool_choice=named,
                               max_tokens=MAX_TOKENS, temperature=0)
    assert reason == "tool_calls" and [v["name"] for v in calls.values()] == ["get_time"]
    jsonschema.validate(json.loads(calls[0]["arguments"]), TIME)
    # parallel_tool_calls false: exactly one call, over n = 2 sampled choices parsed on their own.
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                       parallel_tool_calls=False, max_tokens=MAX_TOKENS, temperature=1.0, seed=4,
                                       n=2)
    assert len(r.choices) == 2
    for c in r.choices:
        assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1, c
        _check_calls(c.message.tool_calls, set(PARAMS))


def test_a_cut_call_is_length_with_the_partial_text(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required",
                                       max_tokens=5, temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "length" and not c.message.tool_calls
    assert c.message.content and c.message.content.startswith("[")


def test_auto_on_a_model_that_answers_in_text(real: openai.OpenAI) -> None:
    client = real
    chat = [{"role": "user", "content": "Write one short sentence about the sea."}]
    for tool_choice in ("auto",):  # the default is auto too (tests/server/test_tool_parsers.py, params)
        kw = {"tool_choice": tool_choice}
        r = client.chat.completions.create(model=MODEL, messages=chat, tools=TOOLS, max_tokens=16, temperature=0,
                                           **kw)
        c = r.choices[0]
        assert c.finish_reason in ("stop", "length") and not c.message.tool_calls, c
        assert c.message.content
        calls, content, reason = _stream(client, model=MODEL, messages=chat, tools=TOOLS, max_tokens=16,
                                         temperature=0, **kw)
        assert not calls and content == c.message.content and reason == c.finish_reason


def test_tool_result_round_trip(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                       max_tokens=MAX_TOKENS, temperature=0)
    call = r.choices[0].message.tool_calls[0]
    history = [*ASK, r.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp": 21, "sky": "clear"})}]
    assert history[1]["tool_calls"][0]["function"]["arguments"] == call.function.arguments
    after = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="none",
                                           max_tokens=30, temperature=0)
    assert after.choices[0].message.content and not after.choices[0].message.tool_calls
    # The call and its result reached the prompt: more prompt tokens than the question alone.
    alone = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="none",
                                           max_tokens=1, temperature=0)
    assert after.usage.prompt_tokens > alone.usage.prompt_tokens + 20
    # Without tools, the tools are not in the prompt; with them (fallback system message) they are.
    bare = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1, temperature=0)
    assert alone.usage.prompt_tokens > bare.usage.prompt_tokens + 50


def _error(r: httpx.Response, param: str) -> None:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["param"] == param, err
    assert len(err["message"]) < 500, err


def _tool(name: str, parameters: Any = None) -> dict[str, Any]:
    fn: dict[str, Any] = {"name": name}
    if parameters is not None:
        fn["parameters"] = parameters
    return {"type": "function", "function": fn}


BAD: list[tuple[dict[str, Any], str]] = [
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
    ({"tools": [_tool("a"), _tool("b"), _tool("a")]}, "tools.2.function.name"),
    ({"tools": [_tool(f"f{i}") for i in range(129)]}, "tools"),
    ({"tools": [_tool("a", [1, 2])]}, "tools.0.function.parameters"),
    ({"tools": [_tool("a", "object")]}, "tools.0.function.parameters"),
    ({"tools": [_tool("a", {"type": "nonsense"})]}, "tools.0.function.parameters"),
    ({"tools": [_tool("a", {"type": "nonsense"})], "tool_choice": "required"}, "tools.0.function.parameters"),
    ({"tools": [_tool("a", {"type": "object", "description": "x" * 300_000})]}, "tools.0.function.parameters"),
    ({"tools": [_tool("bad name")]}, "tools.0.function.name"),
    ({"tools": [_tool("x" * 65)]}, "tools.0.function.name"),
    ({"tools": [{"type": "retrieval", "function": {"name": "a"}}]}, "tools.0.type"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "guided_regex": "a"}, "tool_choice"),
    ({"tools": TOOLS, "parallel_tool_calls": "no"}, "parallel_tool_calls"),
    ({"messages": [{"role": "tool", "content": "42"}]}, "messages.0.tool_call_id"),
    ({"messages": [{"role": "user", "content": "hi", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "a", "arguments": "{}"}}]}]}, "messages.0.tool_calls"),
    ({"messages": [{"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "a", "arguments": {"x": 1}}}]}]},
     "messages.0.tool_calls.0.function.arguments"),
]


def test_bad_tool_inputs_are_400s_naming_the_field(server: ServerProcess, http: httpx.Client) -> None:
    base = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    for patch, param in BAD:
        _error(http.post("/v1/chat/completions", json={**base, **patch}), param)
    # /v1/completions has no tools: the field is ignored and named as such, as any unknown field.
    r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "tools": TOOLS})
    assert r.status_code == 200 and "tools" in r.headers["x-lockgate-ignored-fields"].split(",")
    m = server.metrics()
    assert m["lockgate:num_requests_queued"] == 0 and m["lockgate:num_requests_in_flight"] == 0, m
    r = http.post("/v1/chat/completions", json={**base, "tools": TOOLS, "tool_choice": "required"})
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("tool_calls", "length"), r.text
