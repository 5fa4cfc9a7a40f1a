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
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pydantic
import pytest

from tests.server.conftest import ServerProcess, start_server

MODEL = "SmolLM2-135M-Instruct"
MAX_TOKENS = 64  # every schema below completes in under 40 tokens on this model at temperature 0

def _obj(properties: dict[str, Any]) -> dict[str, Any]:
    """A closed object with every property required."""
    return {"type": "object", "properties": properties, "required": list(properties),
            "additionalProperties": False}


# Schemas a small model must fill: nested objects, arrays, enums, const, required and optional
# fields, number ranges (exclusive too), strings with patterns and lengths, booleans, nullable
# fields, $defs refs, anyOf; bounded so that an answer fits MAX_TOKENS.
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
                                                  "population": {"type": "integer", "minimum": 1,
                                                                                "maximum": 99_999_999}},
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
    "flags": _obj({"active": {"type": "boolean"}, "verified": {"type": "boolean"}}),
    "nullable": _obj({"nickname": {"type": ["string", "null"], "maxLength": 10},
                      "rank": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 9}, {"type": "null"}]}}),
    "refs": {"$defs": {"point": _obj({"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                      "y": {"type": "integer", "minimum": 0, "maximum": 9}})},
             **_obj({"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}})},
    "any_of": _obj({"value": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 100},
                                        {"type": "string", "maxLength": 8}]}}),
    "code": _obj({"code": {"type": "string", "minLength": 3, "maxLength": 5, "pattern": "^[a-z]+$"}}),
    "date": _obj({"date": {"type": "string", "pattern": "^20[0-9]{2}-(0[1-9]|1[0-2])-[0-2][0-9]$"}}),
    "matrix": _obj({"rows": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
        "type": "array", "minItems": 1, "maxItems": 3, "items": {"type": "integer", "minimum": 0, "maximum": 9}}}}),
    "levels": _obj({"level": {"enum": [1, 2, 3]}, "mode": {"const": "fast"}, "answer": {"enum": ["yes", None]}}),
    "ranges": _obj({"ratio": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                    "temp": {"type": "integer", "minimum": -40, "maximum": 50}}),
    "optional": {"type": "object", "properties": {"title": {"type": "string", "maxLength": 16},
                                                  "subtitle": {"type": "string", "maxLength": 16}},
                 "required": ["title"], "additionalProperties": False},
    "deep": _obj({"a": _obj({"b": _obj({"c": {"type": "boolean"}, "d": {"enum": ["x", "y"]}})})}),
    "pets": _obj({"pets": {"type": "array", "minItems": 1, "maxItems": 2, "items": _obj(
        {"kind": {"enum": ["cat", "dog"]}, "legs": {"type": "integer", "minimum": 0, "maximum": 8}})}}),
    "hex_id": _obj({"id": {"type": "string", "pattern": "^[0-9a-f]{8}$"}, "ok": {"type": "boolean"}}),
    "palette": _obj({"tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 2},
                         "count": {"type": "integer", "minimum": 0, "maximum": 2}}),
}
ASK = "Describe one example as JSON."
TWINS = 4


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The fake engine (its runner draws grammar-valid tokens): for the request fields' wiring, where
    the grammar, not the model, is what is tested; the real model keeps the schemas test below."""
    srv = start_server(tmp_path_factory.mktemp("structured-fake"), "--load-format", "fake", "--no-slo-admission",
                       "--max-request-body-bytes", "1000000")
    yield srv
    srv.stop()


@pytest.fixture
def fake_aclient(fake: ServerProcess) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{fake.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture
def aclient(server: ServerProcess) -> openai.AsyncOpenAI:
    """One per test (its connections belong to the test's event loop). Its bursts of concurrent requests
    go in the batch class (30 s TTFT target), so admission never sheds them on a slow, shared machine."""
    # A request shed all the same (429 with retry-after, a slow CI machine) is retried, as clients do.
    return openai.AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=4, timeout=300,
                              default_headers={"x-lockgate-priority": "batch"})


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
        # A short system prompt (the template's default one is longer): less prefill per request.
        kw = dict(model=MODEL, messages=[{"role": "system", "content": "Answer in JSON."},
                                         {"role": "user", "content": f"{ASK} ({name})"}], temperature=0,
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

    # Every schema once, streamed or not in turn, and the first TWINS both ways (same answer expected).
    cases = [(n, s, i % 2 == 1) for i, (n, s) in enumerate(SCHEMAS.items())]
    twins = [(n, s, not st) for n, s, st in cases[:TWINS]]

    async def run() -> list[tuple[str, str | None]]:  # all at once: 24 constrained rows share each step
        return await asyncio.gather(*(one(n, s, st) for n, s, st in cases + twins))

    results = asyncio.run(run())
    for (name, schema, stream), (text, reason) in zip(cases + twins, results):
        assert reason in ("stop", "length"), (name, stream, reason)
        if reason == "stop":
            _valid(text, schema)
        else:  # cut: still a prefix of valid compact JSON, never free text
            assert text.startswith("{"), (name, text)
    assert sum(r == "stop" for _, r in results) >= len(results) - 2, results
    # Streamed and not give the same answer at temperature 0.
    for i in range(TWINS):
        assert results[i] == results[len(cases) + i], cases[i]


def test_json_object_n3_and_compact_whitespace(fake_aclient: openai.AsyncOpenAI) -> None:
    aclient = fake_aclient
    schema = SCHEMAS["person"]

    async def run() -> list[Any]:  # both at once: six rows share each step
        return await asyncio.gather(
            aclient.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Give me a JSON object about a cat."}],
                response_format={"type": "json_object"}, max_tokens=32, n=3, temperature=0.8, seed=3),
            aclient.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": ASK}], n=3,
                response_format=_fmt("person", schema), max_tokens=MAX_TOKENS, temperature=1.0, seed=5))

    r, person = asyncio.run(run())
    assert len(r.choices) == 3
    for c in r.choices:
        if c.finish_reason == "stop":
            assert isinstance(json.loads(c.message.content), dict)
        assert c.message.content.startswith("{") and "\n" not in c.message.content  # no runaway whitespace
    for c in person.choices:
        assert c.finish_reason == "stop", c
        _valid(c.message.content, schema)


def test_parse_with_a_pydantic_model(fake: ServerProcess) -> None:
    client = openai.OpenAI(base_url=f"{fake.base_url}/v1", api_key="unused", max_retries=0, timeout=120)

    class Pet(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=16)
        legs: int = pydantic.Field(ge=0, le=8)

    r = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "Describe a pet."}],
                                      response_format=Pet, max_tokens=MAX_TOKENS, temperature=0)
    pet = r.choices[0].message.parsed
    assert isinstance(pet, Pet) and 0 <= pet.legs <= 8


def test_vllm_fields_on_both_routes(fake_aclient: openai.AsyncOpenAI) -> None:
    aclient = fake_aclient
    chat = [{"role": "user", "content": "Pick one."}]
    color = SCHEMAS["color"]
    # (extra body, check of the text): every form of vLLM's fields, each on both routes.
    cases: list[tuple[dict[str, Any], Any]] = [
        ({"guided_choice": ["apple", "pear", "plum"]}, lambda t: t in ("apple", "pear", "plum")),
        ({"structured_outputs": {"choice": ["yes", "no"]}}, lambda t: t in ("yes", "no")),
        ({"guided_regex": "[0-9]{3}-[a-z]{2}"}, lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t)),
        ({"structured_outputs": {"regex": "(ab){1,3}c"}}, lambda t: re.fullmatch(r"(ab){1,3}c", t)),
        ({"guided_grammar": 'root ::= "on" | "off"'}, lambda t: t in ("on", "off")),
        ({"structured_outputs": {"grammar": 'start: "x" ("y" | "z")\n'}}, lambda t: t in ("xy", "xz")),
        ({"guided_json": color}, lambda t: _valid(t, color) is not None),
        ({"structured_outputs": {"json": json.dumps(color)}}, lambda t: _valid(t, color) is not None),
    ]

    async def chat_text(extra: dict[str, Any]) -> str:
        r = await aclient.chat.completions.create(model=MODEL, messages=chat, max_tokens=40, temperature=0,
                                                  extra_body=extra)
        assert r.choices[0].finish_reason == "stop", r
        return r.choices[0].message.content

    async def completion_text(extra: dict[str, Any]) -> str:
        r = await aclient.completions.create(model=MODEL, prompt="My favourite:", max_tokens=40, temperature=0,
                                             extra_body=extra)
        assert r.choices[0].finish_reason == "stop", r
        return r.choices[0].text

    async def run() -> list[Any]:  # all at once: they share steps
        person = aclient.completions.create(  # response_format on /v1/completions too
            model=MODEL, prompt="A person:", max_tokens=MAX_TOKENS, temperature=0,
            extra_body={"response_format": _fmt("person", SCHEMAS["person"])})
        return await asyncio.gather(person, *(text_of(extra) for text_of in (chat_text, completion_text)
                                              for extra, _ in cases))

    person, *texts = asyncio.run(run())
    for text, (extra, check) in zip(texts, cases * 2):
        assert check(text), (extra, text)
    _valid(person.choices[0].text, SCHEMAS["person"])


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
