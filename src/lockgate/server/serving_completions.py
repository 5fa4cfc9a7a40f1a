"""POST /v1/completions: one or many prompts, n choices each, streamed or not."""
from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from lockgate.lifecycle.fleet_stream import FleetStream
from lockgate.engine.outputs import CompletionOutput, Logprob, RequestOutput
from lockgate.engine.sampling_params import SamplingParams
from lockgate.errors import APIError
from lockgate.server.errors import json_response
from lockgate.server.cached_response import lookup, mark
from lockgate.server.generation import failure_reason, merged, stream_error_event
from lockgate.server.logprobs import TokenText, completion_logprobs, join_completion_logprobs, prompt_logprobs
from lockgate.server.params import check_token_ids, completion_inputs, completion_prompts, model_defaults
from lockgate.server.pipeline import Pipeline
from lockgate.server.protocol import CompletionRequest, read_body
from lockgate.server.sse import DONE, SSEResponse, sse_event
from lockgate.server.state import AppState
from lockgate.server.structured import check_compiles, renamed, resolve_named_schema

log = logging.getLogger("lockgate.server")


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
    await p.route_prompt(body.model, body.user, prompt=body.prompt)
    return await p.idempotent(bool(body.stream), lambda: p.with_fallbacks(lambda: _create(p, body)))


async def _create(p: Pipeline, body: CompletionRequest) -> Response:
    await resolve_named_schema(p, body.response_format)  # a registered schema by name; answers checked
    params, constraint = completion_inputs(body, p.app.config, p.engine_config, model_defaults(p.routed))
    params = p.cap(params, "max_tokens")
    p.check_hedge(bool(body.stream), params)
    await check_compiles(constraint)
    check_token_ids(params, p.routed.vocab_size)
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
    cached = lookup(p, "completions", ids_list, params)  # the response cache (None: off, or not deterministic)
    if cached is not None and cached.hit:
        streams = cached.replay()  # nothing reserved, nothing run
    else:
        p.reserve(num_prompt, sum(params.n * worst_tokens(params, room - len(ids)) for ids in ids_list))
        p.shed(params.n * len(ids_list), params.n * num_prompt, cls, priority)
        try:
            streams = await p.submit(ids_list, texts, params, priority)
        except APIError as exc:  # a schema, regex or grammar the engine cannot compile: the client's field
            raise renamed(exc, constraint) from None
        if cached is not None:
            streams = cached.record(streams)  # stored once the engine has finished them
    meta = _Meta(p.request_id, p.model_name, int(time.time()), params, bool(body.echo), texts, ids_list,
                 body.logprobs if body.echo else None, body.prompt_logprobs, p.token_text)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return mark(cached, SSEResponse(_stream(meta, streams, p, include_usage), p.closer(streams)))
    finals = await p.collect(streams)
    if isinstance(finals, Response):
        return finals
    p.settle([c.finish_reason for f in finals for c in f.outputs])
    return mark(cached, json_response(_response(meta, finals)))


def worst_tokens(params: SamplingParams, room: int) -> int:
    """The most tokens one choice may generate (what the budget reserves)."""
    return room if params.max_tokens is None else params.max_tokens


PromptLogprobs = list[dict[int, Logprob] | None] | None  # as the engine gives them (RequestOutput)


@dataclass(slots=True)
class _Meta:
    id: str
    model: str
    created: int
    params: SamplingParams
    echo: bool
    texts: list[str | None]
    prompt_ids: list[list[int]]
    echo_logprobs: int | None  # echo with logprobs: the prompt's tokens lead the legacy logprobs
    prompt_logprobs: int | None  # vLLM's field: `prompt_logprobs` on each choice
    token_text: TokenText

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(ids) for ids in self.prompt_ids)

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.echo_logprobs is not None or self.prompt_logprobs is not None

    def prompt_part(self, p_idx: int, entries: PromptLogprobs) -> tuple[dict[str, Any], int] | None:
        """The echoed prompt's legacy logprobs (its first token's null) and where its text ends."""
        if self.echo_logprobs is None:
            return None
        ids = self.prompt_ids[p_idx]
        rows: list[dict[int, Logprob] | None] = list(entries) if entries is not None else [None] * len(ids)
        return completion_logprobs(ids, rows, 0, self.echo_logprobs, self.token_text)

    def vllm_prompt_logprobs(self, p_idx: int, entries: PromptLogprobs) -> list[Any] | None:
        if self.prompt_logprobs is None or entries is None:
            return None
        return prompt_logprobs(self.prompt_ids[p_idx], entries, self.prompt_logprobs)


def _last(entries: list[dict[int, Logprob]] | None, k: int) -> list[dict[int, Logprob]]:
    """The entries of a choice's last k tokens."""
    return entries[len(entries) - k:] if entries and k else []


def _choice(index: int, text: str, c: CompletionOutput, logprobs: dict[str, Any] | None,
            prompt_lps: list[Any] | None) -> dict[str, Any]:
    choice = {"index": index, "text": text, "logprobs": logprobs,
              "finish_reason": finish_reason(c.finish_reason), "stop_reason": c.stop_reason}
    if prompt_lps is not None:
        choice["prompt_logprobs"] = prompt_lps
    return choice


def _response(meta: _Meta, finals: list[RequestOutput]) -> dict[str, Any]:
    n = meta.params.n
    choices = []
    completion_tokens = cached = 0
    for p_idx, final in enumerate(finals):
        cached += final.num_cached_tokens
        prompt_entries = final.prompt_logprobs
        head = meta.prompt_part(p_idx, prompt_entries)
        vllm_lps = meta.vllm_prompt_logprobs(p_idx, prompt_entries)
        for c in final.outputs:
            completion_tokens += len(c.token_ids)
            text = (meta.texts[p_idx] or "") + c.text if meta.echo else c.text
            lp = None
            if meta.params.logprobs is not None and (c.logprobs is not None or head is not None):
                lp = completion_logprobs(c.token_ids, c.logprobs or [], head[1] if head is not None else 0)[0]
                if head is not None:
                    lp = join_completion_logprobs(head[0], lp)
            choices.append(_choice(p_idx * n + c.index, text, c, lp, vllm_lps))
    choices.sort(key=lambda ch: ch["index"])
    return {"id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model,
            "choices": choices, "usage": usage(meta.num_prompt_tokens, completion_tokens, cached),
            "system_fingerprint": None}


@dataclass(slots=True)
class _Pending:
    """A streamed choice's tokens held back until its prompt's logprobs are known (they lead its
    first chunk)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)


async def _stream(meta: _Meta, streams: list[FleetStream], p: Pipeline, include_usage: bool
                  ) -> AsyncIterator[bytes]:
    n = meta.params.n
    want_lp = meta.params.logprobs is not None
    finished: set[int] = set()
    started: set[int] = set()  # choices whose first chunk (echo, prompt logprobs) is sent
    held: dict[int, _Pending] = {}
    prompt_entries: dict[int, PromptLogprobs] = {}  # per prompt, once the engine has sent them
    offsets: dict[int, int] = {}
    reasons: list[str | None] = []
    completion_tokens = cached = 0
    head = {"id": meta.id, "object": "text_completion", "created": meta.created, "model": meta.model}
    try:
        async for p_idx, out in merged(streams):
            p.observe(out)
            cached = max(cached, out.num_cached_tokens)
            if out.prompt_logprobs is not None:
                prompt_entries.setdefault(p_idx, out.prompt_logprobs)
            for c in out.outputs:
                idx = p_idx * n + c.index
                if idx in finished:
                    continue
                completion_tokens += len(c.delta_token_ids)
                text, new_ids = c.delta_text, c.delta_token_ids
                first = idx not in started
                vllm_lps = lead = None
                if first:
                    if meta.wants_prompt_logprobs and p_idx not in prompt_entries and c.finish_reason is None:
                        pending = held.setdefault(idx, _Pending())  # the prompt's logprobs come first
                        pending.text += text
                        pending.token_ids += new_ids
                        continue
                    started.add(idx)
                    pending = held.pop(idx, None)
                    if pending is not None:
                        text, new_ids = pending.text + text, pending.token_ids + new_ids
                    entries = prompt_entries.get(p_idx)
                    if meta.wants_prompt_logprobs and entries is None:
                        log.error("%s: the engine sent no prompt logprobs", meta.id)
                    vllm_lps = meta.vllm_prompt_logprobs(p_idx, entries)
                    lead = meta.prompt_part(p_idx, entries)
                    if meta.echo:
                        text = (meta.texts[p_idx] or "") + text
                lp = None
                if want_lp and (new_ids or lead is not None):
                    if lead is not None:
                        offsets[idx] = lead[1]
                    lp, offsets[idx] = completion_logprobs(new_ids, _last(c.logprobs, len(new_ids)),
                                                           offsets.get(idx, 0))
                    if lead is not None:
                        lp = join_completion_logprobs(lead[0], lp)
                if not text and c.finish_reason is None and lp is None and vllm_lps is None:
                    continue
                chunk: dict[str, Any] = {**head, "choices": [_choice(idx, text, c, lp, vllm_lps)]}
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
