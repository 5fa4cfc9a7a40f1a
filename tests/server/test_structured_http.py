"""Structured outputs over HTTP with the official openai SDK, on the session's real-model server
(the embedded SmolLM2-135M, temperature 0): `response_format` (json_schema, json_object),
vLLM's `structured_outputs` and `guided_*` on both routes, streamed and not. Every answer that
was not cut by `max_tokens` parses and validates (jsonschema) against its schema; every bad
input is a 400 naming the field, and nothing is left in flight afterwards.
"""
from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import httpx
import jsonschema
import openai
import pydantic
import pytest

from tests.server.conftest import ServerProcess

MODEL = "SmolLM2-135M-Instruct"
MAX_TOKENS = 160

# Schemas a small model must fill: nested objects, arrays, enums, required fields, number
# ranges, bounded so that an answer fits MAX_TOKENS.
SCHEMAS: dict[str, dict[str, Any]] = {
    "person": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                                "age": {"type": "integer", "minimum": 0, "maximum": 120}},
               "required": ["name", "age"], "additionalProperties": False},
    "color": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}},
              "required": ["color"], "additionalProperties": False},
    "tags": {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                                       "minItems": 1, "maxItems": 3}},
             "required": ["tags"], "additionalProperties": False},
    "nested": {"type": "object", "properties": {
        "city": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                                  "population": {"type": "integer", "minimum": 1}},
                 "required": ["name", "population"], "additionalProperties": False},
        "capital": {"type": "boolean"}}, "required": ["city", "capital"], "additionalProperties": False},
    "score": {"type": "object", "properties": {"score": {"type": "number", "minimum": 0, "maximum": 10},
                                               "label": {"type": "string", "enum": ["low", "mid", "high"]}},
              "required": ["score", "label"], "additionalProperties": False},
    "items": {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"sku": {"type": "string", "pattern": "^[A-Z]{3}[0-9]{2}$"},
                                         "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["sku", "qty"], "additionalProperties": False}}},
              "required": ["items"], "additionalProperties": False},
}
ASK = "Describe one example as JSON."


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def aclient(server: ServerProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, timeout=120)


def _fmt(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def _valid(text: str, schema: dict[str, Any]) -> Any:
    value = json.loads(text)
    jsonschema.validate(value, schema)
    return value


def test_json_schema_answers_validate_streamed_and_not(aclient: openai.AsyncOpenAI) -> None:
    async def one(name: str, schema: dict[str, Any], stream: bool) -> tuple[str, str | None]:
        kw = dict(model=MODEL, messages=[{"role": "user", "content": f"{ASK} ({name})"}], temperature=0,
                  max_tokens=MAX_TOKENS, response_format=_fmt(name, schema))
        if not stream:
            r = await aclient.chat.completions.create(**kw)
            return r.choices[0].message.content or "", r.choices[0].finish_reason
        text, reason = "", None
        async for chunk in await aclient.chat.completions.create(**kw, stream=True):
            for c in chunk.choices:
                text += c.delta.content or ""
                reason = c.finish_reason or reason
        return text, reason

    async def run() -> list[tuple[str, str | None]]:  # all at once: constrained rows share batches
        return await asyncio.gather(*(one(n, s, st) for n, s in SCHEMAS.items() for st in (False, True)))

    results = asyncio.run(run())
    cases = [(n, s, st) for n, s in SCHEMAS.items() for st in (False, True)]
    for (name, schema, stream), (text, reason) in zip(cases, results):
        assert reason in ("stop", "length"), (name, stream, reason)
        if reason == "stop":
            _valid(text, schema)
        else:  # cut: still a prefix of valid compact JSON, never free text
            assert text.startswith("{"), (name, text)
    assert sum(r == "stop" for _, r in results) >= len(results) - 2, results
    # Streamed and not give the same answer at temperature 0.
    for i in range(0, len(results), 2):
        assert results[i] == results[i + 1], cases[i]


def test_json_object_n3_and_compact_whitespace(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Give me a JSON object "
                                                                                         "about a cat."}],
                                       response_format={"type": "json_object"}, max_tokens=48, n=3,
                                       temperature=0.8, seed=3)
    assert len(r.choices) == 3
    for c in r.choices:
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.message.content), dict)
        assert c.message.content.startswith("{") and "\n" not in c.message.content  # no runaway whitespace
    schema = SCHEMAS["person"]
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": ASK}], n=3,
                                       response_format=_fmt("person", schema), max_tokens=MAX_TOKENS,
                                       temperature=1.0, seed=5)
    for c in r.choices:
        assert c.finish_reason == "stop", c
        _valid(c.message.content, schema)


def test_parse_with_a_pydantic_model(client: openai.OpenAI) -> None:
    class Pet(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=16)
        legs: int = pydantic.Field(ge=0, le=8)

    r = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "Describe a pet."}],
                                      response_format=Pet, max_tokens=MAX_TOKENS, temperature=0)
    pet = r.choices[0].message.parsed
    assert isinstance(pet, Pet) and 0 <= pet.legs <= 8


def test_vllm_fields_on_both_routes(client: openai.OpenAI) -> None:
    chat = [{"role": "user", "content": "Pick one."}]

    def chat_text(extra: dict[str, Any], max_tokens: int = 40) -> str:
        r = client.chat.completions.create(model=MODEL, messages=chat, max_tokens=max_tokens, temperature=0,
                                           extra_body=extra)
        assert r.choices[0].finish_reason == "stop", r
        return r.choices[0].message.content

    def completion_text(extra: dict[str, Any]) -> str:
        r = client.completions.create(model=MODEL, prompt="My favourite:", max_tokens=40, temperature=0,
                                      extra_body=extra)
        assert r.choices[0].finish_reason == "stop", r
        return r.choices[0].text

    for text_of in (chat_text, completion_text):
        assert text_of({"guided_choice": ["apple", "pear", "plum"]}) in ("apple", "pear", "plum")
        assert text_of({"structured_outputs": {"choice": ["yes", "no"]}}) in ("yes", "no")
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", text_of({"guided_regex": "[0-9]{3}-[a-z]{2}"}))
        assert re.fullmatch(r"(ab){1,3}c", text_of({"structured_outputs": {"regex": "(ab){1,3}c"}}))
        assert text_of({"guided_grammar": 'root ::= "on" | "off"'}) in ("on", "off")
        assert text_of({"structured_outputs": {"grammar": 'start: "x" ("y" | "z")\n'}}) in ("xy", "xz")
        schema = SCHEMAS["color"]
        _valid(text_of({"guided_json": schema}), schema)
        _valid(text_of({"structured_outputs": {"json": json.dumps(schema)}}), schema)
    # response_format on /v1/completions too.
    r = client.completions.create(model=MODEL, prompt="A person:", max_tokens=MAX_TOKENS, temperature=0,
                                  extra_body={"response_format": _fmt("person", SCHEMAS["person"])})
    _valid(r.choices[0].text, SCHEMAS["person"])


def test_cut_answer_is_length_with_the_partial_text(client: openai.OpenAI) -> None:
    chat = [{"role": "user", "content": "A JSON object with a list of numbers, nicely indented."}]
    schema = {"type": "object", "properties": {"n": {"type": "array", "items": {"type": "integer"}}},
              "required": ["n"]}
    r = client.chat.completions.create(
        model=MODEL, messages=chat, max_tokens=4, temperature=0,
        extra_body={"structured_outputs": {"json": schema, "disable_any_whitespace": True}})
    # Cut by max_tokens: "length", and the partial JSON is the content.
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content.startswith("{")
    assert r.usage.completion_tokens == 4


def _error(r: httpx.Response, param: str) -> dict[str, Any]:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert err["param"] == param, err
    assert len(err["message"]) < 700, err  # never a client's long value echoed back
    return err


BIG = {"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 100} for i in range(3000)}}
BAD: list[tuple[dict[str, Any], str]] = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}},
     "response_format.json_schema.name"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": BIG}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex"),
    ({"guided_json": {"type": "object"}, "structured_outputs": {"regex": "a"}}, "guided_json"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs.choice"),
    ({"structured_outputs": {}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a(("}}, "structured_outputs.regex"),
    ({"guided_regex": "[z-a]"}, "guided_regex"),
    ({"guided_grammar": 'root ::= "a'}, "guided_grammar"),
    ({"structured_outputs": {"grammar": "start: nothing_defined"}}, "structured_outputs.grammar"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_json": '{"type": "integer", "minimum": NaN}'}, "guided_json"),
    ({"guided_json": 5}, "guided_json"),
    ({"guided_json": {"type": "integer", "minimum": 2**70, "maximum": 1}}, "guided_json"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_choice": [""]}, "guided_choice"),
    ({"guided_choice": ["x"] * 2000}, "guided_choice"),
    ({"guided_whitespace_pattern": "[a-z]*", "guided_json": {"type": "object"}}, "guided_whitespace_pattern"),
    ({"guided_regex": ""}, "guided_regex"),
    ({"guided_regex": "x" * 300_000}, "guided_regex"),
    ({"guided_decoding_backend": "outlines"}, "guided_decoding_backend"),
    ({"structured_outputs": {"json": {"type": "object"}, "structural_tag": "x"}}, "structured_outputs.structural_tag"),
]


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_bad_constraints_are_400s_naming_the_field(server: ServerProcess, http: httpx.Client, route: str) -> None:
    base = ({"messages": [{"role": "user", "content": "hi"}]} if route == "/v1/chat/completions"
            else {"prompt": "hi"}) | {"max_tokens": 4}
    for patch, param in BAD:
        _error(http.post(route, json={**base, **patch}), param)
    # 10 MB of schema: over the server's body limit (413), never a 500.
    huge = {"type": "object", "description": "x" * 10_000_000}
    r = http.post(route, json={**base, "guided_json": huge})
    assert r.status_code == 413 and r.json()["error"]["code"], r.text
    # Nothing leaked: nothing queued or running, and the next constrained request is served.
    m = server.metrics()
    assert m["lockgate:num_requests_queued"] == 0 and m["lockgate:num_requests_in_flight"] == 0, m
    r = http.post(route, json={**base, "guided_choice": ["ok"]})
    assert r.status_code == 200, r.text
