"""The served OpenAPI document (`/openapi.json`, browsable at `/docs`).

The routes read and validate their bodies themselves (strict pydantic models,
OpenAI-shaped 400s), so FastAPI cannot see them. Each route decorator carries
`operation(...)`: its request body (a `$ref` to the model in `protocol.py`), its
200 response and the error statuses it can answer, each with the `ErrorResponse`
schema. `install_openapi` builds the document once: FastAPI's paths plus every
model's JSON schema under `components/schemas` (OpenAPI 3.1 is JSON Schema 2020-12).
"""
from __future__ import annotations

from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field
from pydantic.json_schema import models_json_schema

from lockgate.gateway.schemas import SchemaCreate
from lockgate.gateway.tenants import GlobalKeyCreate, KeyCreate, KeyPatch, TenantCreate, TenantPatch
from lockgate.server.embedding_protocol import EmbeddingRequest, EmbeddingResponse
from lockgate.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)

REF = "#/components/schemas/{model}"


# -- Response shapes (documentation only: the routes build plain dicts) --------------------------

class _Doc(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorObject(_Doc):
    message: str = Field(description="What went wrong, for a human")
    type: str = Field(description="Error class, e.g. `invalid_request_error`, `rate_limit_error`")
    param: str | None = Field(description="The offending request field, when there is one")
    code: str | None = Field(description="Machine-readable reason, e.g. `invalid_value`, `model_not_found`")


class ErrorResponse(_Doc):
    """Every error, whatever its status, in the OpenAI shape."""

    error: ErrorObject


class PromptTokensDetails(_Doc):
    cached_tokens: int


class Usage(_Doc):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(_Doc):
    """OpenAI's legacy shape, one entry per token: with `echo`, the prompt's tokens first (the
    first one's logprob and alternatives null), then the generated ones."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] = Field(
        description="Per token: the `logprobs` most likely tokens and the token itself, text -> logprob")
    text_offset: list[int] = Field(description="Where each token's text starts in `text`")


class PromptLogprob(_Doc):
    logprob: float = Field(description="-9999.0 for an impossible token (JSON has no -inf)")
    rank: int | None = Field(description="1 for the most likely token")
    decoded_token: str | None


PROMPT_LOGPROBS_DOC = ("vLLM's shape, with `prompt_logprobs: N`: per prompt token, null for the first, then token id "
                       "-> its logprob for the prompt's token and its N most likely alternatives")


class CompletionChoice(_Doc):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None
    stop_reason: int | str | None = None
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = Field(default=None, description=PROMPT_LOGPROBS_DOC)


class CompletionResponse(_Doc):
    """A completion; with `stream: true` the body is server-sent events of chunks of this shape
    (an echoed prompt, its logprobs and `prompt_logprobs` in each choice's first chunk)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ToolCallFunction(_Doc):
    name: str
    arguments: str = Field(description="The arguments as JSON text")


class ToolCall(_Doc):
    id: str = Field(description="`call_...`")
    type: Literal["function"]
    function: ToolCallFunction


class ChatCompletionMessage(_Doc):
    role: Literal["assistant"]
    content: str | None = Field(description="null when the answer is tool calls only")
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = Field(
        default=None, description="With `tools`: the calls the answer made (streamed as `delta.tool_calls`: "
                                  "a call's index, id, type and name first, then its arguments in fragments)")


class ChatCompletionChoice(_Doc):
    index: int
    message: ChatCompletionMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: Literal["stop", "length", "tool_calls"] | None


class ChatCompletionResponse(_Doc):
    """A chat completion; with `stream: true` the body is server-sent events of
    `chat.completion.chunk` objects (`choices[].delta` instead of `message`; `prompt_logprobs` in
    the first chunk that follows them)."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    prompt_logprobs: list[dict[str, PromptLogprob] | None] | None = Field(default=None, description=PROMPT_LOGPROBS_DOC)


class ModelCard(_Doc):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: str | None = None
    max_model_len: int
    quantization: str | None = None  # int4 | int8 | none (float); null for a router or an unloaded model


class ModelList(_Doc):
    object: Literal["list"]
    data: list[ModelCard]


class TokenizeResponse(_Doc):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = Field(default=None, description="With `return_token_strs: true`")


class DetokenizeResponse(_Doc):
    prompt: str


class HealthResponse(_Doc):
    status: Literal["ok", "degraded"]  # degraded: serving, with fewer replicas up than configured


class VersionResponse(_Doc):
    version: str
    # The default model's weight precision: int4 | int8 | none (float); null while it is not loaded.
    quantization: str | None = None


class SloTargets(_Doc):
    ttft_s: float
    tpot_s: float


class SloAlerts(_Doc):
    fast_burn: bool = Field(description="Page: the 1h and 5m burn rates are both above 14.4")
    slow_burn: bool = Field(description="Ticket: the 6h and 30m burn rates are both above 6")


class SloClass(_Doc):
    class_: str = Field(alias="class", description="The priority class")
    objective: float = Field(description="Target fraction of good requests")
    targets: SloTargets
    requests: int = Field(description="SLO events over the period (good + bad)")
    good: int
    bad: int
    attainment: float | None = Field(description="good / requests; null without requests")
    error_budget_remaining: float = Field(description="1 untouched, 0 spent, negative overspent")
    burn_rates: dict[str, float] = Field(description="Window (5m, 30m, 1h, 6h) to error rate / (1 - objective)")
    alerts: SloAlerts


class SloReport(_Doc):
    """Per priority class: attainment, error budget and burn rates (in memory since the server started)."""

    object: Literal["slo"]
    period_s: float
    windows: list[str]
    classes: list[SloClass]


REQUEST_MODELS: tuple[type[BaseModel], ...] = (
    CompletionRequest, ChatCompletionRequest, TokenizeRequest, DetokenizeRequest,
    TenantCreate, TenantPatch, KeyCreate, KeyPatch, GlobalKeyCreate, SchemaCreate, EmbeddingRequest)
RESPONSE_MODELS: tuple[type[BaseModel], ...] = (
    ErrorResponse, CompletionResponse, ChatCompletionResponse, ModelList, ModelCard, TokenizeResponse,
    DetokenizeResponse, HealthResponse, VersionResponse, SloReport, EmbeddingResponse)


# -- Per-route pieces ----------------------------------------------------------------------------

ERRORS: dict[int, str] = {
    400: "Invalid request: malformed JSON, a field of the wrong type or out of range, a prompt "
         "too long for the model",
    401: "Missing or unknown API key (when the server runs with keys)",
    403: "The key lacks this route's scope, or (without keys) the Host or Origin is not allowed",
    404: "The requested model is not served",
    408: "The request body did not arrive in time",
    409: "Conflict with the current state (e.g. a tenant name already taken)",
    413: "The request body exceeds the server's limit",
    415: "The request body is not JSON (`Content-Type: application/json`)",
    429: "A rate limit, the budget or the request queue is exhausted; retry after `Retry-After` seconds",
    500: "Unexpected server error (a bug: please report it)",
    503: "The server is shutting down or the engine is unavailable",
}

# Any route: the Host/Origin screen and the last-resort handler.
OPEN = (403, 500)
# Routes behind the guard (everything but /health, /ping, /version, /metrics): key, drain, body read.
GUARDED = (*OPEN, 401, 408, 413, 503)
# Routes that read a JSON body that may name a model.
BODY_ERRORS = (*GUARDED, 400, 404, 415)
# Routes that queue work for the engine and are metered.
GENERATION_ERRORS = (*BODY_ERRORS, 429)


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": REF.format(model=model.__name__)}


def operation(*, body: type[BaseModel] | None = None, ok: type[BaseModel] | None = None,
              ok_description: str = "Success", stream: bool = False, text: str | None = None,
              errors: tuple[int, ...] = ()) -> dict[str, Any]:
    """Keyword arguments for a route decorator that document its body and answers.

    `stream`: the 200 may also be `text/event-stream` (with `stream: true`); `text`: the
    200 is plain text of that media type instead of a JSON object.
    """
    content: dict[str, Any] = {}
    if text is not None:
        content[text] = {"schema": {"type": "string"}}
    else:
        content["application/json"] = {"schema": _ref(ok) if ok is not None else {"type": "object"}}
    if stream:
        content["text/event-stream"] = {"schema": {
            "type": "string", "description": "`data: {chunk}` events, then `data: [DONE]`"}}
    responses: dict[str, Any] = {"200": {"description": ok_description, "content": content}}
    for status in sorted(set(errors)):
        responses[str(status)] = {"description": ERRORS[status],
                                  "content": {"application/json": {"schema": _ref(ErrorResponse)}}}
    extra: dict[str, Any] = {"responses": responses}
    if body is not None:
        extra["requestBody"] = {"required": True,
                                "content": {"application/json": {"schema": _ref(body)}}}
    return {"openapi_extra": extra, "response_model": None}


# -- The document --------------------------------------------------------------------------------

def component_schemas() -> dict[str, Any]:
    """Every request and response model, and the models they nest, keyed by name."""
    pairs = [(m, "validation") for m in REQUEST_MODELS] + [(m, "serialization") for m in RESPONSE_MODELS]
    _, top = models_json_schema(pairs, ref_template=REF)  # type: ignore[arg-type]
    return dict(top.get("$defs", {}))


def build_openapi(app: FastAPI) -> dict[str, Any]:
    doc = get_openapi(title=app.title, version=app.version, summary=app.summary,
                      description=app.description, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in component_schemas().items():
        if name in schemas and schemas[name] != schema:
            raise RuntimeError(f"two different OpenAPI schemas named {name}")
        schemas[name] = schema
    # A path parameter makes FastAPI add its own 422 (HTTPValidationError); ours are 400s in the
    # OpenAI shape, and a `str` path parameter cannot fail anyway.
    for item in doc.get("paths", {}).values():
        for op in item.values():
            resp = op.get("responses", {}).get("422")
            if resp is not None and "HTTPValidationError" in str(resp):
                del op["responses"]["422"]
    if "HTTPValidationError" not in str(doc.get("paths")):
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
    return doc


def install_openapi(app: FastAPI) -> None:
    """Serve `build_openapi`'s document at `app.openapi_url` (built on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
