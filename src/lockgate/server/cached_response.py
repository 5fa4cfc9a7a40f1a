"""A route's side of the response cache (gateway/response_cache.py): look a deterministic request
up once its parameters are final and its prompt tokenized, answer a hit through the route's own
renderers, and store a miss's answer once the engine has finished it.

An entry is the engine's final outputs (each choice's text, token ids, finish and stop reasons,
logprobs; the prompt's logprobs and cached-token count), msgpack-encoded. A hit replays them as
the streams the route would have read from the engine (all of a choice's tokens, then its finish),
so the JSON answer and the SSE stream (role, content, finish, usage chunks, `[DONE]`) come out of
the very code that renders fresh answers, with the request's own id, `created`, tools and
logprob options. A hit reserves nothing and runs nothing: no tokens of the tenant's tpm, no
concurrency slot, no engine; its rpm unit was charged on arrival, like every call. Its ledger row
says `cache = 'hit'` and costs the tenant's `cache_hit` price (accounting.py).
"""
from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from starlette.responses import Response

from lockgate.engine.outputs import CompletionOutput, RequestOutput
from lockgate.engine.sampling_params import SamplingParams
from lockgate.gateway.response_cache import HEADER, CacheControl, ResponseCache, cache_key, cacheable
from lockgate.lifecycle.fleet_stream import FleetStream
from lockgate.server.pipeline import Pipeline

_COMPLETE = ("stop", "length")  # finish reasons of an answer worth keeping (not aborted, not failed)
_encode = msgspec.msgpack.encode
_decode = msgspec.msgpack.Decoder(list[RequestOutput]).decode


class CachedCall:
    """One cacheable request: its key, the hit found (`answer`), and the miss's finals as they end."""

    __slots__ = ("p", "cache", "key", "control", "prompts", "answer", "_finals")

    def __init__(self, p: Pipeline, cache: ResponseCache, key: bytes, control: CacheControl,
                 prompts: list[list[int]]) -> None:
        self.p, self.cache, self.key, self.control, self.prompts = p, cache, key, control, prompts
        self.answer: list[RequestOutput] | None = None
        self._finals: list[RequestOutput | None] = [None] * len(prompts)

    @property
    def hit(self) -> bool:
        return self.answer is not None

    # ---- a hit ---------------------------------------------------------------------------------
    def replay(self) -> list[FleetStream]:
        """The hit as the route's engine streams, with its metering: the request's record and metrics
        as for any answer, the meter billed at the cache price; nothing reserved, nothing submitted."""
        assert self.answer is not None
        p = self.p
        num_prompt = sum(len(ids) for ids in self.prompts)
        meter = p.meter
        if meter is not None:
            assert meter.principal.tenant is not None
            meter.cache = "hit"
            meter.prompt_tokens = num_prompt
            meter.price = p.app.gateway.latest(meter.principal.tenant).price_for(meter.model)
        p.record.admitted = time.monotonic()
        tracker = p.app.metrics.tracker(num_prompt, p.record)
        tracker.on_tokens = meter.on_tokens if meter is not None else None  # the meter's counts, no tpm taken

        def finished(reasons: list[str | None] | None, error: str | None) -> None:
            if meter is not None:  # no version outcome either: the version did not serve it
                meter.finish(reasons, error)

        tracker.on_finish = finished
        p.tracker = tracker
        p.lease.hold(lambda outcome: tracker.finish(None, error=outcome))
        p.lease.accounted = True
        single = len(self.answer) == 1
        return [_Replay(p.request_id if single else f"{p.request_id}-{i}", ids, out)  # type: ignore[misc]
                for i, (ids, out) in enumerate(zip(self.prompts, self.answer))]

    # ---- a miss --------------------------------------------------------------------------------
    def record(self, streams: list[FleetStream]) -> list[FleetStream]:
        """The engine's streams, watched: once every one has finished complete, the answer is stored."""
        if not self.control.write:
            return streams
        return [_Recording(s, self, i) for i, s in enumerate(streams)]  # type: ignore[misc]

    def _finished(self, index: int, final: RequestOutput) -> None:
        self._finals[index] = final
        finals = self._finals
        if any(f is None for f in finals):
            return
        outs = [c for f in finals for c in f.outputs]  # type: ignore[union-attr]
        if not all(c.finish_reason in _COMPLETE for c in outs) or not any(c.token_ids for c in outs):
            return  # aborted or failed; nothing generated (prompt scoring) is not worth an entry
        self.cache.put(self.key, _encode([_entry(f) for f in finals]))  # type: ignore[arg-type]
        s = self.cache.stats()
        self.p.app.metrics.cache_size(s.entries, s.bytes)

    def mark(self, response: Response) -> Response:
        response.headers[HEADER] = "hit" if self.hit else "miss"
        return response


def lookup(p: Pipeline, route: str, prompts: list[list[int]], params: SamplingParams) -> CachedCall | None:
    """The request's cache entry, looked up (None: the cache is off, the request is not deterministic,
    or `Cache-Control: no-store`). Call once the parameters are final (defaults, the tenant's caps) and
    the prompts tokenized, before anything is reserved."""
    cache = p.app.response_cache
    if cache is None or not cacheable(params):
        return None
    control = CacheControl.parse(p.request.headers.get("cache-control"))
    if not control.read and not control.write:
        return None
    namespace = (p.principal.tenant_id or "") if p.principal is not None else ""  # open mode: one namespace
    call = CachedCall(p, cache, cache_key(namespace, p.routed.version.spec.ref, route, prompts, params), control,
                      prompts)
    if control.read and p.tracker is None:  # a fallback's retry after a submission stays on the engine path
        data = cache.get(call.key)
        if data is not None:
            call.answer = _decode(data)
        s = cache.stats()
        p.app.metrics.response_cache(call.hit, p.record.tenant, s.entries, s.bytes)
    return call


def mark(call: CachedCall | None, response: Response) -> Response:
    """`x-lockgate-cache: hit | miss` on a cacheable request's answer (nothing on the others)."""
    return response if call is None else call.mark(response)


def _entry(out: RequestOutput) -> RequestOutput:
    """What an entry keeps of a final output: the choices whole, the prompt's logprobs and cached count."""
    return RequestOutput("", None, [], [
        CompletionOutput(c.index, c.text, c.token_ids, c.finish_reason, c.stop_reason, c.cumulative_logprob,
                         c.logprobs) for c in out.outputs], True, out.num_cached_tokens, out.prompt_logprobs)


class _Replay:
    """A hit's engine stream: every choice's tokens at once, then its finish (as the engine ends one)."""

    __slots__ = ("request_id", "prompt_ids", "final")
    replica = None

    def __init__(self, request_id: str, prompt_ids: list[int], final: RequestOutput) -> None:
        self.request_id, self.prompt_ids, self.final = request_id, prompt_ids, final

    def abort(self) -> None:
        pass  # nothing runs

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._outputs()

    def _output(self, choices: list[CompletionOutput], finished: bool) -> RequestOutput:
        f = self.final
        return RequestOutput(self.request_id, None, self.prompt_ids, choices, finished, f.num_cached_tokens,
                             f.prompt_logprobs)

    async def _outputs(self) -> AsyncIterator[RequestOutput]:
        cs = self.final.outputs
        yield self._output([CompletionOutput(c.index, c.text, c.token_ids, None, None, c.cumulative_logprob,
                                             c.logprobs, c.text, list(c.token_ids)) for c in cs], False)
        yield self._output([CompletionOutput(c.index, c.text, c.token_ids, c.finish_reason, c.stop_reason,
                                             c.cumulative_logprob, c.logprobs) for c in cs], True)


class _Recording:
    """An engine stream as the route reads it, its final output handed to the cache call."""

    __slots__ = ("stream", "call", "index")

    def __init__(self, stream: FleetStream, call: CachedCall, index: int) -> None:
        self.stream, self.call, self.index = stream, call, index

    def abort(self) -> None:
        self.stream.abort()

    def __getattr__(self, name: str) -> Any:  # the stream's other attributes (replica, peek, ...)
        return getattr(self.stream, name)

    def copy(self, request_id: str, fleet: Any = None) -> Any:
        """A hedge's copy (lifecycle/hedge.py), watched too when it runs on the same version (another
        version's answer is not this key's)."""
        other = self.stream.copy(request_id, fleet)
        return other if fleet is not None else _Recording(other, self.call, self.index)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._outputs()

    async def _outputs(self) -> AsyncIterator[RequestOutput]:
        prompt_lps = None
        async for out in self.stream:
            if out.prompt_logprobs is not None:
                prompt_lps = out.prompt_logprobs
            if out.finished:
                if out.prompt_logprobs is None and prompt_lps is not None:  # sent once, with an early output
                    out.prompt_logprobs = prompt_lps
                self.call._finished(self.index, out)
            yield out
