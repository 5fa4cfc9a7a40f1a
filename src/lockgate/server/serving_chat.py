"""POST /v1/chat/completions: messages through the model's chat template, n choices."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from lockgate.lifecycle.fleet_stream import FleetStream
from lockgate.engine.outputs import CompletionOutput, RequestOutput
from lockgate.errors import APIError
from lockgate.server.cached_response import lookup, mark
from lockgate.server.errors import bad_request, json_response
from lockgate.server.generation import failure_reason, stream_error_event
from lockgate.server.logprobs import chat_logprobs, prompt_logprobs
from lockgate.server.params import chat_inputs, chat_messages, check_token_ids, model_defaults
from lockgate.server.pipeline import Pipeline
from lockgate.server.protocol import ChatCompletionRequest, read_body
from lockgate.server.serving_completions import usage, worst_tokens
from lockgate.server.structured import check_compiles, renamed, resolve_named_schema
from lockgate.server.tool_output import ToolAnswers, parser_name
from lockgate.server.tool_prompt import render_tool_chat
from lockgate.server.sse import DONE, SSEResponse, sse_event
from lockgate.server.state import AppState


async def create_chat_completion(request: Request, app: AppState) -> Response:
    p = Pipeline.open(request, app, "chatcmpl")
    body = await read_body(request, ChatCompletionRequest)
    await p.route_prompt(body.model, body.user, messages=body.messages)
    return await p.idempotent(bool(body.stream), lambda: p.with_fallbacks(lambda: _create(p, body)))


async def _create(p: Pipeline, body: ChatCompletionRequest) -> Response:
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    await resolve_named_schema(p, body.response_format)  # a registered schema by name; answers checked
    params, tools, constraint = chat_inputs(body, p.app.config, p.engine_config, model_defaults(p.routed))
    params = p.cap(params, param)
    p.check_hedge(bool(body.stream), params)
    await check_compiles(*(tools.checks if tools is not None else ()), constraint)
    check_token_ids(params, p.routed.vocab_size)
    cls, priority = p.classify(body.priority)
    messages = chat_messages(body.messages, p.app.config)
    p.note(bool(body.stream), messages)
    p.check_ready()
    prompt, fallback = await render_tool_chat(p.routed, messages, tools, bool(body.add_generation_prompt),
                                              bool(body.continue_final_message), body.chat_template_kwargs)
    answers = ToolAnswers.of(tools, parser_name(p.app.config.tool_call_parser, p.routed.tokenizer.chat_template,
                                                fallback))
    ids = await p.encode(prompt, add_special_tokens=False, param="messages")  # the template has them
    if not ids:
        raise bad_request("the rendered chat prompt is empty", param="messages")
    p.check_context(len(ids), params.max_tokens, "messages")
    p.check_ready()
    cached = lookup(p, "chat", [ids], params)  # the response cache (None: off, or not deterministic)
    if cached is not None and cached.hit:
        streams = cached.replay()  # nothing reserved, nothing run
    else:
        p.reserve(len(ids), params.n * worst_tokens(params, p.max_model_len - len(ids)))
        p.shed(params.n, params.n * len(ids), cls, priority)
        try:
            streams = await p.submit([ids], [prompt], params, priority)
        except APIError as exc:  # a schema, regex or grammar the engine cannot compile: the client's field
            raise renamed(exc, constraint) from None
        if cached is not None:
            streams = cached.record(streams)  # stored once the engine has finished it
    top_n = (body.top_logprobs or 0) if body.logprobs else None
    meta = {"id": p.request_id, "model": p.model_name, "created": int(time.time())}
    prompt_lps = _PromptLogprobs(ids, body.prompt_logprobs)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return mark(cached, SSEResponse(_stream(meta, streams[0], params.n, len(ids), top_n, prompt_lps, p,
                                                include_usage, answers), p.closer(streams)))
    finals = await p.collect(streams)
    if isinstance(finals, Response):
        return finals
    final = finals[0]
    p.settle([c.finish_reason for c in final.outputs])
    return mark(cached, json_response(_response(meta, final, len(ids), top_n, prompt_lps, answers)))


class _PromptLogprobs:
    """vLLM's `prompt_logprobs` (top level in the answer, or in the first chunk that follows them)."""

    __slots__ = ("ids", "top_n")

    def __init__(self, ids: list[int], top_n: int | None) -> None:
        self.ids, self.top_n = ids, top_n

    def render(self, out: RequestOutput) -> list[Any] | None:
        if self.top_n is None or out.prompt_logprobs is None:
            return None
        return prompt_logprobs(self.ids, out.prompt_logprobs, self.top_n)


def _choice_logprobs(c: CompletionOutput, token_ids: list[int], top_n: int | None) -> dict[str, Any] | None:
    if top_n is None or c.logprobs is None:
        return None
    end = len(c.token_ids)
    return chat_logprobs(token_ids, c.logprobs[end - len(token_ids):end], top_n)


def _response(meta: dict[str, Any], final: RequestOutput, num_prompt: int, top_n: int | None,
              prompt_lps: _PromptLogprobs, answers: ToolAnswers) -> dict[str, Any]:
    choices = []
    for c in final.outputs:  # each choice parsed on its own
        message, reason = answers.message(c.text, c.finish_reason)
        choices.append({"index": c.index, "message": message, "logprobs": _choice_logprobs(c, c.token_ids, top_n),
                        "finish_reason": reason, "stop_reason": c.stop_reason})
    completion_tokens = sum(len(c.token_ids) for c in final.outputs)
    response = {**meta, "object": "chat.completion", "choices": choices,
                "usage": usage(num_prompt, completion_tokens, final.num_cached_tokens), "system_fingerprint": None}
    if prompt_lps.top_n is not None:
        response["prompt_logprobs"] = prompt_lps.render(final)
    return response


async def _stream(meta: dict[str, Any], stream: FleetStream, n: int, num_prompt: int, top_n: int | None,
                  prompt_lps: _PromptLogprobs, p: Pipeline, include_usage: bool, answers: ToolAnswers
                  ) -> AsyncIterator[bytes]:
    head = {**meta, "object": "chat.completion.chunk", "system_fingerprint": None}
    extra = {"usage": None} if include_usage else {}
    finished: set[int] = set()
    reasons: list[str | None] = []
    completion_tokens = cached = 0
    pending_prompt_lps: list[Any] | None = None  # goes out with the next chunk
    took_prompt_lps = False
    parsers = [answers.stream() for _ in range(n)]  # each choice parsed on its own
    try:
        # OpenAI opens each choice with the role and an empty content.
        for i in range(n):
            yield sse_event({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}], **extra})
        async for out in stream:
            p.observe(out)
            cached = max(cached, out.num_cached_tokens)
            if not took_prompt_lps and out.prompt_logprobs is not None:
                pending_prompt_lps = prompt_lps.render(out)
                took_prompt_lps = True
            for c in out.outputs:
                if c.index in finished:
                    continue
                completion_tokens += len(c.delta_token_ids)
                lp = _choice_logprobs(c, c.delta_token_ids, top_n) if c.delta_token_ids else None
                if not c.delta_text and c.finish_reason is None and lp is None:
                    continue
                delta, reason = parsers[c.index].feed(c.delta_text), None
                if c.finish_reason is not None:
                    held, reason = parsers[c.index].finish(c.finish_reason)
                    _merge(delta, held)
                if not delta and lp is not None:
                    delta = {"content": ""}  # logprobs of text a parser holds back
                if not delta and reason is None:
                    continue
                choice = {"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": reason}
                if c.finish_reason is not None:
                    choice["stop_reason"] = c.stop_reason
                    finished.add(c.index)
                    reasons.append(c.finish_reason)
                chunk = {**head, "choices": [choice], **extra}
                if pending_prompt_lps is not None:
                    chunk["prompt_logprobs"], pending_prompt_lps = pending_prompt_lps, None
                yield sse_event(chunk)
                p.checkpoint("stream")
        if pending_prompt_lps is not None:
            yield sse_event({**head, "choices": [], "prompt_logprobs": pending_prompt_lps, **extra})
        if include_usage:
            yield sse_event({**head, "choices": [], "usage": usage(num_prompt, completion_tokens, cached)})
        p.settle(reasons)
        yield DONE
    except Exception as exc:  # noqa: BLE001 - the status line is gone: report in-band
        p.settle(None, failure_reason(exc))
        yield stream_error_event(exc)
        yield DONE


def _merge(delta: dict[str, Any], more: dict[str, Any]) -> None:
    """A parser's held-back fields after a chunk's own (content joined, tool-call deltas in order)."""
    if "content" in more:
        delta["content"] = delta.get("content", "") + more["content"]
    if "tool_calls" in more:
        delta["tool_calls"] = delta.get("tool_calls", []) + more["tool_calls"]
