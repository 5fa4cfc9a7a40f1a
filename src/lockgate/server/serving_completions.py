"""POST /v1/completions: one or many prompts, n choices each, streamed or not."""
from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from lockgate.lifecycle.fleet_stream import FleetStream
from lockgate.engine.outputs import CompletionOutput, RequestOutput
from lockgate.engine.sampling_params import SamplingParams
from lockgate.server.errors import json_response
from lockgate.server.generation import failure_reason, merged, stream_error_event
from lockgate.server.logprobs import completion_logprobs
from lockgate.server.params import completion_params, completion_prompts
from lockgate.server.pipeline import Pipeline
from lockgate.server.protocol import CompletionRequest, read_body
from lockgate.server.sse import DONE, SSEResponse, sse_event
from lockgate.server.state import AppState


def finish_reason(reason: str | None) -> str | None:
    # The engine's "abort" never reaches a client that is still listening.
    return None if reason is None else ("length" if reason == "length" else "stop")


def usage(prompt_tokens: int, completion_tokens: int, cached: int = 0) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached}}


async def create_completion(request: Request, app: AppState) -> Response:
    p = Pipeline.open(request, app, "cmpl")
    body = await read_body(request, CompletionRequest)
    p.route(body.model, body.user)
    return await p.idempotent(bool(body.stream), lambda: _create(p, body))


async def _create(p: Pipeline, body: CompletionRequest) -> Response:
    params = p.cap(completion_params(body, p.app.config, p.engine_config), "max_tokens")
    cls, priority = p.classify(body.priority)
    prompts = completion_prompts(body, p.app.config)
    p.note(bool(body.stream), prompts if len(prompts) > 1 else prompts[0])
    p.check_ready()
    ids_list: list[list[int]] = []
    texts: list[str | None] = []
    names = ["prompt"] if len(prompts) == 1 else [f"prompt.{i}" for i in range(len(prompts))]
    for name, prompt in zip(names, prompts):  # every text bounded before any is tokenized
        if isinstance(prompt, str):
            await p.check_prompt_chars(prompt, name)
    for name, prompt in zip(names, prompts):
        ids = await p.encode(prompt, add_special_tokens=True, param=name) if isinstance(prompt, str) else prompt
        p.check_context(len(ids), params.max_tokens, name)
        ids_list.append(ids)
        texts.append(prompt if isinstance(prompt, str) else None)
    if body.echo:  # token-id prompts are echoed as their text
        texts = [t if t is not None else p.decode(ids) for t, ids in zip(texts, ids_list)]
    p.check_ready()  # again: tokenizing may have awaited
    num_prompt = sum(len(ids) for ids in ids_list)
    room = p.max_model_len
    p.reserve(num_prompt, sum(params.n * (params.max_tokens or room - len(ids)) for ids in ids_list))
    p.shed(params.n * len(ids_list), params.n * num_prompt, cls, priority)
    streams = await p.submit(ids_list, texts, params, priority)
    meta = _Meta(p.request_id, p.model_name, int(time.time()), params, bool(body.echo), texts, num_prompt)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return SSEResponse(_stream(meta, streams, p, include_usage), p.closer(streams))
    finals = await p.collect(streams)
    if isinstance(finals, Response):
        return finals
    p.settle([c.finish_reason for f in finals for c in f.outputs])
    return json_response(_response(meta, finals))


class _Meta:
    __slots__ = ("id", "model", "created", "params", "echo", "texts", "num_prompt_tokens")

    def __init__(self, id_: str, model: str, created: int, params: SamplingParams, echo: bool,
                 texts: list[str | None], num_prompt_tokens: int) -> None:
        self.id, self.model, self.created, self.params = id_, model, created, params
        self.echo, self.texts, self.num_prompt_tokens = echo, texts, num_prompt_tokens


def _choice(meta: _Meta, index: int, text: str, c: CompletionOutput, logprobs: dict[str, Any] | None,
            ) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs,
            "finish_reason": finish_reason(c.finish_reason), "stop_reason": c.stop_reason}


def _response(meta: _Meta, finals: list[RequestOutput]) -> dict[str, Any]:
    n = meta.params.n
    choices = []
    completion_tokens = cached = 0
    for p_idx, final in enumerate(finals):
        cached += final.num_cached_tokens
        for c in final.outputs:
            completion_tokens += len(c.token_ids)
            text = (meta.texts[p_idx] or "") + c.text if meta.echo else c.text
            lp = None
            if meta.params.logprobs is not None and c.logprobs is not None:
                lp = completion_logprobs(c.token_ids, c.logprobs, 0)[0]
            choices.append(_choice(meta, p_idx * n + c.index, text, c, lp))
    choices.sort(key=lambda ch: ch["index"])
    return {"id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
            "choices": choices, "usage": usage(meta.num_prompt_tokens, completion_tokens, cached),
            "system_fingerprint": None}


async def _stream(meta: _Meta, streams: list[FleetStream], p: Pipeline, include_usage: bool
                  ) -> AsyncIterator[bytes]:
    n = meta.params.n
    want_lp = meta.params.logprobs is not None
    finished: set[int] = set()
    echoed: set[int] = set()
    offsets: dict[int, int] = {}
    reasons: list[str | None] = []
    completion_tokens = cached = 0
    head = {"id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model}
    try:
        async for p_idx, out in merged(streams):
            p.observe(out)
            cached = max(cached, out.num_cached_tokens)
            for c in out.outputs:
                idx = p_idx * n + c.index
                if idx in finished:
                    continue
                completion_tokens += len(c.delta_token_ids)
                text = c.delta_text
                if meta.echo and idx not in echoed:
                    echoed.add(idx)
                    text = (meta.texts[p_idx] or "") + text
                lp = None
                if want_lp and c.logprobs is not None and c.delta_token_ids:
                    end = len(c.token_ids)
                    k = len(c.delta_token_ids)
                    lp, offsets[idx] = completion_logprobs(c.delta_token_ids, c.logprobs[end - k:end],
                                                           offsets.get(idx, 0))
                if not text and c.finish_reason is None and lp is None:
                    continue
                chunk: dict[str, Any] = {**head, "choices": [_choice(meta, idx, text, c, lp)]}
                if include_usage:
                    chunk["usage"] = None
                yield sse_event(chunk)
                p.checkpoint("stream")
                if c.finish_reason is not None:
                    finished.add(idx)
                    reasons.append(c.finish_reason)
        if include_usage:
            yield sse_event({**head, "choices": [],
                             "usage": usage(meta.num_prompt_tokens, completion_tokens, cached)})
        p.settle(reasons)
        yield DONE
    except Exception as exc:  # noqa: BLE001 - the status line is gone: report in-band
        p.settle(None, failure_reason(exc))
        yield stream_error_event(exc)
        yield DONE
