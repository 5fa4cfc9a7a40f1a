"""POST /v1/chat/completions: messages through the model's chat template, n choices."""
from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from lockgate.engine.client import RequestStream
from lockgate.engine.outputs import CompletionOutput, RequestOutput
from lockgate.server.context import ServerContext
from lockgate.server.errors import bad_request, json_response
from lockgate.gateway.lease import Lease
from lockgate.server.gating import Gate
from lockgate.server.generation import (
    collect_or_respond,
    failure_reason,
    lease_of,
    start,
    stream_closer,
    stream_error_event,
)
from lockgate.server.idempotency import idempotent
from lockgate.server.model_select import route
from lockgate.server.logprobs import chat_logprobs
from lockgate.server.metrics import RequestTracker
from lockgate.server.params import chat_messages, chat_params
from lockgate.server.protocol import ChatCompletionRequest, parse_body
from lockgate.server.serving_completions import finish_reason, usage
from lockgate.server.sse import DONE, SSEResponse, sse_event


INLINE_RENDER_CHARS = 65536  # longer conversations are rendered in a worker thread

# Template variables the server itself passes: a client may not override them.
RESERVED_TEMPLATE_KEYS = frozenset({
    "messages", "add_generation_prompt", "tools", "continue_final_message", "documents",
    "bos_token", "eos_token", "pad_token", "unk_token", "raise_exception", "strftime_now", "self",
})


def render_chat(ctx: ServerContext, messages: list[dict[str, Any]], add_generation_prompt: bool,
                continue_final: bool, kwargs: dict[str, Any] | None) -> str:
    """The chat template's text; a template error (bad role order, ...) is a 400."""
    if continue_final and messages[-1]["role"] != "assistant":
        raise bad_request("continue_final_message needs the last message to be from the assistant",
                          param="continue_final_message")
    reserved = sorted(RESERVED_TEMPLATE_KEYS.intersection(kwargs or ()))
    if reserved:
        raise bad_request(f"chat_template_kwargs must not set {', '.join(reserved)} (the server sets them)",
                          param="chat_template_kwargs", code="invalid_value")
    try:
        text = ctx.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt and not continue_final, **(kwargs or {}))
    except (ValueError, TypeError) as exc:
        raise bad_request(str(exc), param="messages", code="invalid_messages") from None
    if continue_final:  # cut the end-of-turn markup after the final message's content
        last = messages[-1]["content"]
        cut = text.rfind(last)
        if last and cut >= 0:
            text = text[: cut + len(last)]
    return text


async def render_chat_async(ctx: ServerContext, messages: list[dict[str, Any]], add_generation_prompt: bool,
                            continue_final: bool, kwargs: dict[str, Any] | None) -> str:
    """`render_chat` off the event loop when the messages are many or long (the rendered text is
    then bounded by `ServerContext.encode` before it is tokenized)."""
    args = (ctx, messages, add_generation_prompt, continue_final, kwargs)
    size = sum(len(m["content"]) for m in messages)
    if len(messages) < 64 and size <= INLINE_RENDER_CHARS:
        return render_chat(*args)
    return await asyncio.to_thread(render_chat, *args)


async def create_chat_completion(request: Request, ctx: ServerContext) -> Response:
    lease = lease_of(request)
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    gate = Gate.open(request, ctx, lease, request_id)
    body = await parse_body(request, ChatCompletionRequest)
    ctx, model = route(request, ctx, gate, body.model, body.user)  # the version that serves it, bound in
    return await idempotent(request, gate, bool(body.stream), request_id,
                            lambda: _create(request, ctx, lease, gate, request_id, body, model))


async def _create(request: Request, ctx: ServerContext, lease: Lease, gate: Gate, request_id: str,
                  body: ChatCompletionRequest, model: str) -> Response:
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    params = gate.cap(chat_params(body, ctx.config, ctx.engine_config), param)
    cls, priority = gate.priority(body.priority)
    messages = chat_messages(body.messages, ctx.config)
    gate.note(bool(body.stream), messages)
    ctx.check_engine()
    args = (ctx, messages, bool(body.add_generation_prompt), bool(body.continue_final_message),
            body.chat_template_kwargs)
    prompt = await render_chat_async(*args)
    ids = await ctx.encode(prompt, add_special_tokens=False, param="messages")  # the template has them
    if not ids:
        raise bad_request("the rendered chat prompt is empty", param="messages")
    ctx.check_context(len(ids), params.max_tokens, "messages")
    ctx.check_engine()
    gate.admit(len(ids), params.n * (params.max_tokens or ctx.client.max_model_len - len(ids)))
    ctx.admit(lease, params.n, params.n * len(ids), cls, priority)
    await gate.reserved()
    streams, tracker = start(ctx, lease, request_id, [ids], [prompt], params, priority, gate)
    top_n = (body.top_logprobs or 0) if body.logprobs else None
    meta = {"id": request_id, "model": model, "created": int(time.time())}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return SSEResponse(_stream(meta, streams[0], params.n, len(ids), top_n, tracker, include_usage, lease),
                           stream_closer(streams, tracker))
    finals = await collect_or_respond(request, streams, tracker)
    if isinstance(finals, Response):
        return finals
    final = finals[0]
    tracker.finish([c.finish_reason for c in final.outputs])
    return json_response(_response(meta, final, len(ids), top_n))


def _choice_logprobs(c: CompletionOutput, token_ids: list[int], top_n: int | None) -> dict[str, Any] | None:
    if top_n is None or c.logprobs is None:
        return None
    end = len(c.token_ids)
    return chat_logprobs(token_ids, c.logprobs[end - len(token_ids):end], top_n)


def _response(meta: dict[str, Any], final: RequestOutput, num_prompt: int, top_n: int | None) -> dict[str, Any]:
    choices = [{
        "index": c.index,
        "message": {"role": "assistant", "content": c.text, "refusal": None},
        "logprobs": _choice_logprobs(c, c.token_ids, top_n),
        "finish_reason": finish_reason(c.finish_reason),
        "stop_reason": c.stop_reason,
    } for c in final.outputs]
    completion_tokens = sum(len(c.token_ids) for c in final.outputs)
    return {**meta, "object": "chat.completion", "choices": choices,
            "usage": usage(num_prompt, completion_tokens, final.num_cached_tokens), "system_fingerprint": None}


async def _stream(meta: dict[str, Any], stream: RequestStream, n: int, num_prompt: int, top_n: int | None,
                  tracker: RequestTracker, include_usage: bool, lease: Lease) -> AsyncIterator[bytes]:
    head = {**meta, "object": "chat.completion.chunk", "system_fingerprint": None}
    extra = {"usage": None} if include_usage else {}
    finished: set[int] = set()
    reasons: list[str | None] = []
    completion_tokens = cached = 0
    try:
        # OpenAI opens each choice with the role and an empty content.
        for i in range(n):
            yield sse_event({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}], **extra})
        async for out in stream:
            tracker.on_output(out)
            cached = max(cached, out.num_cached_tokens)
            for c in out.outputs:
                if c.index in finished:
                    continue
                completion_tokens += len(c.delta_token_ids)
                lp = _choice_logprobs(c, c.delta_token_ids, top_n) if c.delta_token_ids else None
                if not c.delta_text and c.finish_reason is None and lp is None:
                    continue
                delta = {"content": c.delta_text} if c.delta_text or lp is not None else {}
                choice = {"index": c.index, "delta": delta, "logprobs": lp,
                          "finish_reason": finish_reason(c.finish_reason)}
                if c.finish_reason is not None:
                    choice["stop_reason"] = c.stop_reason
                    finished.add(c.index)
                    reasons.append(c.finish_reason)
                yield sse_event({**head, "choices": [choice], **extra})
                lease.checkpoint("stream")
        if include_usage:
            yield sse_event({**head, "choices": [], "usage": usage(num_prompt, completion_tokens, cached)})
        tracker.finish(reasons)
        yield DONE
    except Exception as exc:  # noqa: BLE001 - the status line is gone: report in-band
        tracker.finish(None, error=failure_reason(exc))
        yield stream_error_event(exc)
        yield DONE
