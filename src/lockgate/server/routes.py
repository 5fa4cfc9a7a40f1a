"""HTTP routes: the OpenAI API plus vLLM's operational endpoints."""
from __future__ import annotations

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

import lockgate
from lockgate.server.context import ServerContext
from lockgate.server.errors import APIError, bad_request, json_response, model_not_found
from lockgate.server.params import chat_messages
from lockgate.server.protocol import DetokenizeRequest, TokenizeRequest, parse_body
from lockgate.server.serving_chat import create_chat_completion, render_chat
from lockgate.server.serving_completions import create_completion

router = APIRouter()


def _ctx(request: Request) -> ServerContext:
    return request.app.state.ctx


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    return await create_completion(request, _ctx(request))


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await create_chat_completion(request, _ctx(request))


def _model_card(ctx: ServerContext, name: str) -> dict[str, object]:
    return {"id": name, "object": "model", "created": ctx.created, "owned_by": "lockgate",
            "root": ctx.engine_config.model or ctx.model_name, "parent": None,
            "max_model_len": ctx.client.max_model_len}


@router.get("/v1/models")
async def list_models(request: Request) -> Response:
    ctx = _ctx(request)
    return json_response({"object": "list", "data": [_model_card(ctx, n) for n in ctx.model_names]})


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request) -> Response:
    ctx = _ctx(request)
    if model not in ctx.model_names:
        raise model_not_found(model)
    return json_response(_model_card(ctx, model))


@router.post("/tokenize")
async def tokenize(request: Request) -> Response:
    ctx = _ctx(request)
    body = await parse_body(request, TokenizeRequest)
    ctx.resolve_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("send exactly one of `prompt` and `messages`", param="prompt")
    if body.messages is not None:
        if not body.messages:
            raise bad_request("messages must not be empty", param="messages")
        text = render_chat(ctx, chat_messages(body.messages, ctx.config), bool(body.add_generation_prompt),
                           False, None)
        special = bool(body.add_special_tokens)  # default False: the template has them
    else:
        text = body.prompt or ""
        special = body.add_special_tokens is None or body.add_special_tokens
    ids = await ctx.encode(text, add_special_tokens=special)
    out: dict[str, object] = {"count": len(ids), "max_model_len": ctx.client.max_model_len, "tokens": ids}
    if body.return_token_strs:
        out["token_strs"] = ctx.tokenizer.convert_ids_to_tokens(ids)
    return json_response(out)


@router.post("/detokenize")
async def detokenize(request: Request) -> Response:
    ctx = _ctx(request)
    body = await parse_body(request, DetokenizeRequest)
    ctx.resolve_model(body.model)
    vocab = ctx.tokenizer.vocab_size
    if ctx.client.model_config is not None:
        vocab = max(vocab, ctx.client.model_config.vocab_size)
    bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is outside the vocabulary [0, {vocab})", param="tokens")
    return json_response({"prompt": ctx.tokenizer.decode(body.tokens, skip_special_tokens=False)})


@router.get("/health")
async def health(request: Request) -> Response:
    ctx = _ctx(request)
    if ctx.draining:
        return APIError(503, "the server is shutting down", code="server_draining").response()
    if not ctx.client.healthy:
        return APIError(503, "the engine is unavailable", code="engine_unavailable").response()
    return json_response({"status": "ok"})


@router.get("/ping")
async def ping(request: Request) -> Response:
    return await health(request)


@router.get("/version")
async def version() -> Response:
    return json_response({"version": lockgate.__version__})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(_ctx(request).metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
