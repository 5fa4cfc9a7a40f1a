"""HTTP routes: the OpenAI API plus vLLM's operational endpoints."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

import lockgate
from lockgate.server.errors import APIError, bad_request, json_response, model_not_found
from lockgate.server.openapi import (
    BODY_ERRORS,
    GENERATION_ERRORS,
    GUARDED,
    OPEN,
    ChatCompletionResponse,
    CompletionResponse,
    DetokenizeResponse,
    HealthResponse,
    ModelCard,
    ModelList,
    SloReport,
    TokenizeResponse,
    VersionResponse,
    operation,
)
from lockgate.server.model_select import model_cards, quantization
from lockgate.server.params import chat_messages
from lockgate.server.pipeline import route_only
from lockgate.server.prompts import encode, render_chat_async, run_blocking
from lockgate.server.embedding_protocol import EmbeddingRequest, EmbeddingResponse
from lockgate.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    read_body,
)
from lockgate.server.serving_chat import create_chat_completion
from lockgate.server.serving_completions import create_completion
from lockgate.server.serving_embeddings import create_embedding
from lockgate.server.state import PRINCIPAL_SCOPE_KEY, AppState

router = APIRouter()


def _get(path: str, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A GET route that answers HEAD too (load balancers probe with it); only GET is documented."""
    def register(endpoint: Callable[..., Any]) -> Callable[..., Any]:
        router.add_api_route(path, endpoint, methods=["GET"], **kwargs)
        router.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False, response_model=None)
        return endpoint
    return register


def _app(request: Request) -> AppState:
    return request.app.state.lockgate


def _visible(request: Request, model: str) -> bool:
    """A tenant sees only the models it may use (others do not exist for it)."""
    principal = request.scope.get(PRINCIPAL_SCOPE_KEY)
    tenant = principal.tenant if principal is not None else None
    return tenant is None or tenant.allows_model(model)


@router.post("/v1/completions", **operation(body=CompletionRequest, ok=CompletionResponse, stream=True,
                                             errors=GENERATION_ERRORS))
async def completions(request: Request) -> Response:
    return await create_completion(request, _app(request))


@router.post("/v1/chat/completions", **operation(body=ChatCompletionRequest, ok=ChatCompletionResponse,
                                                  stream=True, errors=GENERATION_ERRORS))
async def chat_completions(request: Request) -> Response:
    return await create_chat_completion(request, _app(request))


@router.post("/v1/embeddings", **operation(body=EmbeddingRequest, ok=EmbeddingResponse, errors=GENERATION_ERRORS))
async def embeddings(request: Request) -> Response:
    return await create_embedding(request, _app(request))


@_get("/v1/models", **operation(ok=ModelList, errors=GUARDED))
async def list_models(request: Request) -> Response:
    cards = [c for c in model_cards(_app(request)) if _visible(request, str(c["id"]))]
    return json_response({"object": "list", "data": cards})


@_get("/v1/models/{model:path}", **operation(ok=ModelCard, errors=(404, *GUARDED)))
async def get_model(model: str, request: Request) -> Response:
    card = next((c for c in model_cards(_app(request)) if c["id"] == model), None)
    if card is None or not _visible(request, model):
        raise model_not_found(model)
    return json_response(card)


@router.post("/tokenize", **operation(body=TokenizeRequest, ok=TokenizeResponse, errors=BODY_ERRORS))
async def tokenize(request: Request) -> Response:
    app = _app(request)
    body = await read_body(request, TokenizeRequest)
    target = route_only(request, app, body.model)  # a model the caller may not use: 404
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("send exactly one of `prompt` and `messages`", param="prompt")
    if body.messages is not None:
        if not body.messages:
            raise bad_request("messages must not be empty", param="messages")
        text = await render_chat_async(target, chat_messages(body.messages, app.config),
                                       bool(body.add_generation_prompt), False, None)
        special = bool(body.add_special_tokens)  # default False: the template has them
        param = "messages"
    else:
        text = body.prompt or ""
        special = body.add_special_tokens is None or body.add_special_tokens
        param = "prompt"
    ids = await encode(target, text, add_special_tokens=special, param=param)
    out: dict[str, object] = {"count": len(ids), "max_model_len": target.max_model_len, "tokens": ids}
    if body.return_token_strs:
        out["token_strs"] = await run_blocking(target.tokenizer.convert_ids_to_tokens, ids)
    return json_response(out)


@router.post("/detokenize", **operation(body=DetokenizeRequest, ok=DetokenizeResponse, errors=BODY_ERRORS))
async def detokenize(request: Request) -> Response:
    body = await read_body(request, DetokenizeRequest)
    target = route_only(request, _app(request), body.model)  # a model the caller may not use: 404
    vocab = target.vocab_size
    bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is outside the vocabulary [0, {vocab})", param="tokens")
    text = await run_blocking(target.tokenizer.decode, body.tokens, False)  # skip_special_tokens=False
    return json_response({"prompt": text})


@_get("/health", **operation(ok=HealthResponse, ok_description="The server and its engine are up",
                               errors=(*OPEN, 503)))
async def health(request: Request) -> Response:
    app = _app(request)
    if app.draining:
        return APIError(503, "the server is shutting down", code="server_draining").response()
    if not app.models.healthy:  # every model can serve its traffic
        return APIError(503, "the engine is unavailable", code="engine_unavailable").response()
    # Serving, but some version has fewer replicas up than configured (one died, or is still loading).
    return json_response({"status": "degraded" if app.models.degraded else "ok"})


@_get("/ping", **operation(ok=HealthResponse, ok_description="Same as /health", errors=(*OPEN, 503)))
async def ping(request: Request) -> Response:
    return await health(request)


@_get("/version", **operation(ok=VersionResponse, errors=OPEN))
async def version(request: Request) -> Response:
    # The weight precision of the default model (the one a request without `model` gets: its stable
    # version); every model's is on its /v1/models card.
    models = _app(request).models
    default = models.default if models.models else None
    stable = None if default is None else (
        default.versions.get(default.stable() or "") or next(iter(default.versions.values()), None))
    return json_response({"version": lockgate.__version__, "quantization": quantization(stable)})


@_get("/metrics", **operation(text="text/plain", ok_description="Prometheus text exposition format",
                                errors=(*OPEN, 401)))  # with keys: 401, 403 (no metrics scope)
async def metrics(request: Request) -> Response:
    return Response(_app(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


@_get("/slo", **operation(ok=SloReport, ok_description="SLO attainment, error budget and burn rates per class",
                            errors=GUARDED))  # open mode; with keys the admin scope, as /admin/slo
async def slo(request: Request) -> Response:
    principal = request.scope.get(PRINCIPAL_SCOPE_KEY)
    if principal is not None:  # a tenant's admin key gets 403, as on /admin/slo
        principal.admin_reach.require_global("the SLO report")
    return json_response(_app(request).observer.slo.to_json())
