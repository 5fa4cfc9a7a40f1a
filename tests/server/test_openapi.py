"""The served OpenAPI document, and a property-based fuzz run against it (schemathesis).

One real server for the module, started with small limits so that what the fuzzer
generates stays cheap on a 2-core CPU: a 64-token context (no request generates
much), `n` <= 2, a 64 KiB body limit. The fuzz run records every distinct failure
instead of stopping at the first, and fails listing them all.
"""
from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tests.server.conftest import ServerProcess, start_server

FUZZ_ARGS = ["--max-model-len", "64", "--max-n", "2", "--max-num-seqs", "8",
             "--max-request-body-bytes", "65536", "--drain-timeout", "5"]
BODY_ROUTES = {("post", "/v1/completions"), ("post", "/v1/chat/completions"), ("post", "/tokenize"),
               ("post", "/detokenize")}
ERROR_STATUSES = {"400", "401", "403", "404", "408", "413", "415", "500", "503"}  # on every body route

# Examples per operation and generation mode; routes without inputs need only a few.
EXAMPLES_WITH_INPUT = 30
EXAMPLES_WITHOUT_INPUT = 3
FUZZ_BUDGET_S = float(os.environ.get("LOCKGATE_FUZZ_BUDGET_S", "150"))  # whole run, split between what is left
REQUEST_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = start_server(tmp_path_factory.mktemp("openapi"), *FUZZ_ARGS)
    yield srv
    srv.stop()


def _doc(srv: ServerProcess) -> dict[str, Any]:
    r = httpx.get(f"{srv.base_url}/openapi.json", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


# -- The document ---------------------------------------------------------------------------------

def test_openapi_document_is_valid_openapi_31(fuzz_server: ServerProcess) -> None:
    doc = _doc(fuzz_server)
    assert doc["openapi"].startswith("3.1")
    schema = schemathesis.openapi.from_dict(doc)
    schema.validate()  # against the OpenAPI 3.1 meta-schema
    labels = {r.ok().label for r in schema.get_all_operations()}
    assert {"POST /v1/completions", "POST /v1/chat/completions", "POST /tokenize", "POST /detokenize",
            "GET /v1/models", "GET /v1/models/{model}", "GET /health", "GET /version", "GET /metrics"} <= labels
    # FastAPI's own 422 (HTTPValidationError) is not ours: bad input is a 400 in the OpenAI shape.
    assert "HTTPValidationError" not in json.dumps(doc)
    assert "422" not in json.dumps(doc["paths"])


def test_every_post_route_documents_its_json_body(fuzz_server: ServerProcess) -> None:
    doc = _doc(fuzz_server)
    schemas = doc["components"]["schemas"]
    posts = {(m, p) for p, item in doc["paths"].items() for m in item if m == "post"}
    assert BODY_ROUTES <= posts
    expected = {"/v1/completions": "CompletionRequest", "/v1/chat/completions": "ChatCompletionRequest",
                "/tokenize": "TokenizeRequest", "/detokenize": "DetokenizeRequest"}
    for path, model in expected.items():
        body = doc["paths"][path]["post"]["requestBody"]
        assert body["required"] is True
        assert body["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{model}"}
        assert schemas[model]["type"] == "object"
    assert "messages" in schemas["ChatCompletionRequest"]["required"]
    assert "prompt" in schemas["CompletionRequest"]["required"]
    assert "tokens" in schemas["DetokenizeRequest"]["required"]
    # Nested models are components too, and every $ref resolves.
    for ref in re.findall(r'"\$ref": "#/components/schemas/([^"]+)"', json.dumps(doc)):
        assert ref in schemas, ref
    for path in ("/v1/completions", "/v1/chat/completions"):
        ok = doc["paths"][path]["post"]["responses"]["200"]["content"]
        assert set(ok) == {"application/json", "text/event-stream"}


def test_error_responses_use_the_openai_error_schema(fuzz_server: ServerProcess) -> None:
    doc = _doc(fuzz_server)
    err = doc["components"]["schemas"]["ErrorResponse"]
    assert err["required"] == ["error"]
    obj = doc["components"]["schemas"]["ErrorObject"]
    assert set(obj["required"]) == {"message", "type", "param", "code"}
    for path, item in doc["paths"].items():
        for method, op in item.items():
            statuses = {s for s in op["responses"] if s != "200"}
            assert "500" in statuses, (method, path)
            if (method, path) in BODY_ROUTES:
                assert ERROR_STATUSES <= statuses, (method, path, statuses)
            for s in statuses:
                schema = op["responses"][s]["content"]["application/json"]["schema"]
                assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (method, path, s)
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert "429" in doc["paths"][path]["post"]["responses"]


def test_docs_page_and_head_requests(fuzz_server: ServerProcess) -> None:
    base = fuzz_server.base_url
    page = httpx.get(f"{base}/docs", timeout=30)
    assert page.status_code == 200 and "/openapi.json" in page.text
    for path in ("/health", "/ping", "/version", "/v1/models", "/metrics"):
        head = httpx.head(f"{base}{path}", timeout=30)
        get = httpx.get(f"{base}{path}", timeout=30)
        assert head.status_code == get.status_code == 200, path
        assert head.content == b"", path
        assert head.headers["content-type"] == get.headers["content-type"], path
    assert httpx.head(f"{base}/v1/models/no-such-model", timeout=30).status_code == 404


# -- The fuzz run ---------------------------------------------------------------------------------

def openai_error_shape(ctx: Any, response: schemathesis.Response, case: schemathesis.Case) -> bool | None:
    """Every error answer is `{"error": {"message", "type", "param", "code"}}` with a message,
    a type and a non-null code."""
    if response.status_code < 400 or case.method.upper() == "HEAD":
        return None
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(f"error body is not JSON: {response.content[:200]!r}") from None
    assert isinstance(body, dict) and set(body) == {"error"}, f"not {{'error': {{...}}}}: {body}"
    err = body["error"]
    assert isinstance(err, dict), f"`error` is not an object: {body}"
    assert {"message", "type", "param", "code"} <= set(err), f"missing keys: {body}"
    for key in ("message", "type", "code"):
        assert isinstance(err[key], str) and err[key], f"`error.{key}` must be a non-empty string: {body}"
    assert err["param"] is None or isinstance(err["param"], str), f"`error.param`: {body}"
    return None


def json_bodies_only(ctx: Any, response: schemathesis.Response, case: schemathesis.Case) -> bool | None:
    """A body that is not declared JSON is refused with 415 before anything reads it."""
    sent = response.request.headers.get("Content-Type")
    if not case.operation.body or case.method.upper() != case.operation.method.upper() or sent is None:
        return None
    media = sent.split(";", 1)[0].strip().lower()
    if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
        return None
    assert response.status_code == 415, f"a `{sent}` body got {response.status_code}, not 415"
    return None


CHECKS = [not_a_server_error, openai_error_shape, json_bodies_only, status_code_conformance,
          content_type_conformance, response_schema_conformance]
NEGATIVE_CHECKS = [*CHECKS, negative_data_rejection]


def _has_inputs(op: schemathesis.APIOperation) -> bool:
    return bool(op.body) or any(True for _ in op.iter_parameters())


def _error_code(content: bytes) -> Any:
    try:
        return json.loads(content)["error"].get("code")
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


class Fuzzer:
    """Sends cases to the server, runs the checks, keeps one report per kind of failure
    (route, status, check, error code) and the number of requests per phase."""

    def __init__(self, base_url: str, session: requests.Session) -> None:
        self.base_url = base_url
        self.session = session
        self.failures: dict[tuple[Any, ...], str] = {}
        self.statuses: dict[int, int] = {}

    def send(self, case: schemathesis.Case, tag: str) -> None:
        label = case.operation.label
        negative = case.meta is not None and case.meta.generation.mode.is_negative
        what = f"{case.method} {case.formatted_path} [{tag}{' negative' if negative else ''}]"
        try:
            response = case.call(base_url=self.base_url, session=self.session, timeout=REQUEST_TIMEOUT_S)
        except requests.RequestException as exc:
            self.failures.setdefault((label, case.method, None, type(exc).__name__, None),
                                     f"{what}: {type(exc).__name__}: {exc}\n    {case.as_curl_command()}")
            return
        self.statuses[response.status_code] = self.statuses.get(response.status_code, 0) + 1
        try:
            case.validate_response(response, checks=NEGATIVE_CHECKS if negative else CHECKS)
        except schemathesis.errors.FailureGroup as group:
            for failure in group.exceptions:
                key = (label, case.method, response.status_code, re.sub(r"\d+", "N", failure.title)[:80],
                       _error_code(response.content))
                self.failures.setdefault(
                    key, f"{what} -> {response.status_code}: {failure.title}\n"
                         f"    {failure.message.strip()[:400]}\n"
                         f"    body: {response.content[:400]!r}\n    {case.as_curl_command()[:1500]}")

    def coverage(self, op: schemathesis.APIOperation, budget_s: float) -> None:
        """Schemathesis's deterministic coverage cases: boundary values, each field of the wrong
        type, missing required fields, undocumented methods."""
        deadline = time.monotonic() + budget_s
        schema = op.schema
        config = schema.config.generation_for(operation=op, phase="coverage")
        for case in schema.iter_coverage_cases(op, generation_modes=list(GenerationMode), generation_config=config):
            if time.monotonic() > deadline:
                return
            self.send(case, "coverage")

    def fuzz(self, op: schemathesis.APIOperation, mode: GenerationMode, examples: int, budget_s: float) -> None:
        """Hypothesis-generated cases (derandomized: the same sequence on every run)."""
        deadline = time.monotonic() + budget_s

        @settings(max_examples=examples, derandomize=True, database=None, deadline=None, print_blob=False,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy(generation_mode=mode))
        def run(case: schemathesis.Case) -> None:
            if time.monotonic() <= deadline:
                self.send(case, f"fuzz {mode}")

        try:
            run()
        except Unsatisfiable:  # nothing to negate (e.g. a free-form string path parameter)
            pass


@pytest.mark.slow
def test_fuzz_the_openapi_document(fuzz_server: ServerProcess, tmp_path: Path) -> None:
    """Schemathesis against the served document: no 5xx, every error in the OpenAI shape, every
    status and content type documented, valid bodies matching their schemas, invalid input a 4xx."""
    base = fuzz_server.base_url
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    schema.validate()
    schema.config.output.sanitization.update(enabled=False)  # reports show `max_tokens` & co. as sent
    ops = [r.ok() for r in schema.get_all_operations()]
    # Cheap operations first: whatever time they leave goes to the generating routes.
    ops.sort(key=lambda op: op.path in ("/v1/completions", "/v1/chat/completions"))
    runs: list[tuple[schemathesis.APIOperation, GenerationMode | None, int]] = []
    for op in ops:
        runs.append((op, None, 0))
        if _has_inputs(op):
            runs += [(op, GenerationMode.POSITIVE, EXAMPLES_WITH_INPUT),
                     (op, GenerationMode.NEGATIVE, EXAMPLES_WITH_INPUT)]
        else:
            runs.append((op, GenerationMode.POSITIVE, EXAMPLES_WITHOUT_INPUT))
    start = time.monotonic()
    with requests.Session() as session:
        fuzzer = Fuzzer(base, session)
        for i, (op, mode, examples) in enumerate(runs):
            share = max((FUZZ_BUDGET_S - (time.monotonic() - start)) / (len(runs) - i), 1.0)
            if mode is None:
                fuzzer.coverage(op, share)
            else:
                fuzzer.fuzz(op, mode, examples, share)
    elapsed = time.monotonic() - start
    print(f"fuzz: {sum(fuzzer.statuses.values())} requests in {elapsed:.0f} s, by status: {fuzzer.statuses}")
    failures = list(fuzzer.failures.values())
    (tmp_path / "fuzz_failures.txt").write_text("\n\n".join(failures))
    assert fuzz_server.proc.poll() is None, "the server died during the fuzz run"
    assert httpx.get(f"{base}/health", timeout=30).status_code == 200
    assert not failures, f"{len(failures)} distinct failure(s):\n\n" + "\n\n".join(failures)
