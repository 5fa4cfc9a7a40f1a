"""The served OpenAPI document, and a property-based fuzz run against it (schemathesis).

One real server process for the module, cheap whatever the fuzzer generates on a
2-core CPU: `--load-format fake` (the real tokenizer, chat template, limits,
scheduler and output processing, but no model: tokens come at once), a 128-token
context, `n` <= 2, a 64 KiB body limit. The fuzz run records every distinct
failure instead of stopping at the first, and fails listing them all.
`LOCKGATE_FUZZ_BUDGET_S` sets its time budget (default 150 s).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import re
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
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

from tests.server.conftest import ServerProcess, start_server, wait_for

FUZZ_ARGS = ["--load-format", "fake", "--max-model-len", "128", "--max-n", "2", "--max-num-seqs", "8",
             "--max-request-body-bytes", "65536", "--drain-timeout", "5"]
BODY_ROUTES = {("post", "/v1/completions"), ("post", "/v1/chat/completions"), ("post", "/tokenize"),
               ("post", "/detokenize")}
ERROR_STATUSES = {"400", "401", "403", "404", "408", "413", "415", "500", "503"}  # on every body route

# Examples per operation and generation mode; routes without inputs need only a few.
EXAMPLES_WITH_INPUT = 12
EXAMPLES_ADMIN = 10  # /admin/* routes: many, with simple query and body parameters
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
            statuses = {s for s in op["responses"] if int(s) >= 400}
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
    assert_openai_error(response.content)
    return None


def assert_openai_error(content: bytes) -> None:
    try:
        body = json.loads(content)
    except ValueError:
        raise AssertionError(f"error body is not JSON: {content[:200]!r}") from None
    assert isinstance(body, dict) and set(body) == {"error"}, f"not {{'error': {{...}}}}: {body}"
    err = body["error"]
    assert isinstance(err, dict), f"`error` is not an object: {body}"
    assert {"message", "type", "param", "code"} <= set(err), f"missing keys: {body}"
    for key in ("message", "type", "code"):
        assert isinstance(err[key], str) and err[key], f"`error.{key}` must be a non-empty string: {body}"
    assert err["param"] is None or isinstance(err["param"], str), f"`error.param`: {body}"


# What a request can get before its body is read: key, scope/Host/Origin, method, deadline, size,
# media type, drain.
REFUSED_UNREAD = {401, 403, 405, 408, 413, 415, 503}


def json_bodies_only(ctx: Any, response: schemathesis.Response, case: schemathesis.Case) -> bool | None:
    """A body that is not declared JSON is refused (415, or earlier) before anything reads it."""
    sent = response.request.headers.get("Content-Type")
    if not case.operation.body or case.method.upper() != case.operation.method.upper() or sent is None:
        return None
    media = sent.split(";", 1)[0].strip().lower()
    if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
        return None
    assert response.status_code in REFUSED_UNREAD, f"a `{sent}` body got {response.status_code}, not 415"
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

    def edges(self, doc: dict[str, Any], budget_s: float) -> None:
        """Values JSON Schema allows but a server easily chokes on, for every field of every body:
        integers past 64 bits, huge floats, such ids in lists and as `logit_bias` keys, and
        `chat_template_kwargs` naming the template's own variables. Never a 5xx."""
        deadline = time.monotonic() + budget_s
        for path, field, body in edge_bodies(doc):
            if time.monotonic() > deadline:
                return
            what = f"POST {path} [edges] {json.dumps(body)[:300]}"
            try:
                r = self.session.post(f"{self.base_url}{path}", json=body, timeout=REQUEST_TIMEOUT_S)
            except requests.RequestException as exc:
                self.failures.setdefault((path, "edges", type(exc).__name__), f"{what}: {exc!r}")
                continue
            self.statuses[r.status_code] = self.statuses.get(r.status_code, 0) + 1
            problem = f"server error {r.status_code}" if r.status_code >= 500 else None
            if r.status_code >= 400 and problem is None:
                try:
                    assert_openai_error(r.content)
                except AssertionError as exc:
                    problem = str(exc).splitlines()[0]
            if problem is not None:
                key = (path, "edges", r.status_code, _error_code(r.content), field)
                self.failures.setdefault(key, f"{what} -> {r.status_code}: {problem}\n    body: {r.content[:400]!r}")

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


BASE_BODIES: dict[str, dict[str, Any]] = {
    "/v1/completions": {"prompt": "Hi", "max_tokens": 1},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
    "/tokenize": {"prompt": "Hi"},
    "/detokenize": {"tokens": [1]},
}
HUGE_INTS = (2**63, 2**70, -(2**70))
TEMPLATE_VARIABLES = ("messages", "add_generation_prompt", "continue_final_message", "tools", "bos_token")


def _types(schema: dict[str, Any]) -> set[str]:
    out: set[str] = set()
    for s in (schema, *schema.get("anyOf", ())):
        t = s.get("type")
        if isinstance(t, str):
            out.add(t)
            if t == "array":
                out.add(f"array of {s.get('items', {}).get('type')}")
            if t == "object" and isinstance(s.get("additionalProperties"), dict):
                out.add(f"object of {s['additionalProperties'].get('type')}")
    return out


def edge_bodies(doc: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, base in BASE_BODIES.items():
        ref = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        props = doc["components"]["schemas"][ref.rsplit("/", 1)[1]]["properties"]
        for name, schema in props.items():
            types = _types(schema)
            values: list[Any] = []
            if "integer" in types:
                values += HUGE_INTS
            if "number" in types:
                values += [1e308, -1e308]
            if "array of integer" in types:
                values += [[v] for v in HUGE_INTS]
            if "object of number" in types:
                values += [{str(v): 1.0} for v in HUGE_INTS]
            for value in values:
                yield path, name, {**base, name: value}
    chat = "/v1/chat/completions"
    for key in TEMPLATE_VARIABLES:
        yield chat, f"chat_template_kwargs.{key}", {**BASE_BODIES[chat], "chat_template_kwargs": {key: "x"}}


# One run: (method, path, generation mode, examples); mode None is the coverage phase.
Run = tuple[str, str, GenerationMode | None, int]


def fuzz_runs(base: str, runs: list[Run], budget_s: float, edges: bool) -> tuple[dict[tuple[Any, ...], str],
                                                                             dict[int, int]]:
    """`runs` against the server at `base` (and first the edge values, with `edges`) within
    `budget_s`, split between what is left: the failures and the requests per status. Runs in
    this process or in a spawned one (everything in and out pickles)."""
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    schema.config.output.sanitization.update(enabled=False)  # reports show `max_tokens` & co. as sent
    ops = {(op.method.upper(), op.path): op for op in (r.ok() for r in schema.get_all_operations())}
    start = time.monotonic()
    with requests.Session() as session:
        fuzzer = Fuzzer(base, session)
        if edges:
            fuzzer.edges(schema.raw_schema, budget_s / 4)
        for i, (method, path, mode, examples) in enumerate(runs):
            op = ops[(method, path)]
            share = max((budget_s - (time.monotonic() - start)) / (len(runs) - i), 1.0)
            if mode is None:
                fuzzer.coverage(op, share)
            else:
                fuzzer.fuzz(op, mode, examples, share)
    return fuzzer.failures, fuzzer.statuses


@pytest.mark.slow
def test_fuzz_the_openapi_document(fuzz_server: ServerProcess, tmp_path: Path) -> None:
    """Against the served document: edge values per body field, then per operation schemathesis's
    coverage cases and hypothesis-generated valid and invalid cases. No 5xx, every error in the
    OpenAI shape with a code, non-JSON bodies refused, every status and content type documented,
    200 bodies matching their schemas, invalid input a 4xx, and no queue slot left taken.

    Generating the cases is what costs (the client, not the server, is the bottleneck), so the
    runs are split between this process and a spawned one, on the other core: the same cases,
    each derandomized run as it would be alone, in about half the time."""
    base = fuzz_server.base_url
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    schema.validate()
    ops = [r.ok() for r in schema.get_all_operations()]
    # Cheap operations first: whatever time they leave goes to the generating routes.
    ops.sort(key=lambda op: op.path in ("/v1/completions", "/v1/chat/completions"))
    runs: list[Run] = []
    for op in ops:
        key = (op.method.upper(), op.path)
        runs.append((*key, None, 0))
        if _has_inputs(op):
            n = EXAMPLES_ADMIN if op.path.startswith("/admin/") else EXAMPLES_WITH_INPUT
            runs += [(*key, GenerationMode.POSITIVE, n), (*key, GenerationMode.NEGATIVE, n)]
        else:
            runs.append((*key, GenerationMode.POSITIVE, EXAMPLES_WITHOUT_INPUT))
    start = time.monotonic()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        other = pool.submit(fuzz_runs, base, runs[1::2], FUZZ_BUDGET_S, False)
        failed, statuses = fuzz_runs(base, runs[0::2], FUZZ_BUDGET_S, True)
        other_failed, other_statuses = other.result()
    for key, report in other_failed.items():
        failed.setdefault(key, report)
    for status, n in other_statuses.items():
        statuses[status] = statuses.get(status, 0) + n
    elapsed = time.monotonic() - start
    print(f"fuzz: {sum(statuses.values())} requests in {elapsed:.0f} s, by status: {statuses}")
    failures = list(failed.values())
    (tmp_path / "fuzz_failures.txt").write_text("\n\n".join(failures))
    assert fuzz_server.proc.poll() is None, "the server died during the fuzz run"
    assert httpx.get(f"{base}/health", timeout=30).status_code == 200
    # Nothing is left behind: every accepted request gave back its queue slot.
    left = ("lockgate:num_requests_queued", "lockgate:num_requests_in_flight")
    if not wait_for(lambda: all(fuzz_server.metrics().get(m, 0) == 0 for m in left), 30, 0.5):
        stuck = {m: fuzz_server.metrics().get(m) for m in left}
        failures.append(f"requests left in the queue after the run: {stuck}")
    assert not failures, f"{len(failures)} distinct failure(s):\n\n" + "\n\n".join(failures)
