"""What a request routed to one model version talks to: `VersionClient`, the version's engine
client with three additions, none of which the serving routes need to know about:

- each engine stream is watched as its consumer reads it (`TappedStream`): time to the
  first token, time per output token, how it ended, its final tokens; the version's
  stats, the rollback rules and shadow comparisons are fed from that;
- a fraction of requests is mirrored to the model's shadow version (shadow.py);
- TEST ONLY: `fail_fraction` fails that fraction of the version's requests at submission
  (503 `engine_unavailable`), to exercise automatic rollback.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from lockgate.engine.client import AsyncEngineClient, EngineUnavailableError, RequestStream
from lockgate.engine.outputs import RequestOutput
from lockgate.engine.sampling_params import SamplingParams
from lockgate.lifecycle.stats import Outcome

if TYPE_CHECKING:
    from lockgate.lifecycle.version import ModelVersion

# (outcome, final token ids of choice 0) -> None; outcome.ok None: aborted by its consumer (not judged)
OnEnd = Callable[[Outcome | None, list[int]], None]


class StreamWatch:
    """Timing and tokens of one engine stream, as its consumer reads them."""

    __slots__ = ("started", "first", "last", "num_tokens", "ids", "ended", "on_end")

    def __init__(self, on_end: list[OnEnd]) -> None:
        self.started = time.monotonic()
        self.first: float | None = None
        self.last: float | None = None
        self.num_tokens = 0  # of the longest choice
        self.ids: list[int] = []  # choice 0's tokens so far
        self.ended = False
        self.on_end = on_end

    def observe(self, out: RequestOutput) -> None:
        now = time.monotonic()
        for c in out.outputs:
            if c.delta_token_ids:
                if self.first is None:
                    self.first = now
                self.last = now
            self.num_tokens = max(self.num_tokens, len(c.token_ids))
            if c.index == 0:
                self.ids = list(c.token_ids)

    def outcome(self, ok: bool) -> Outcome:
        ttft = None if self.first is None else self.first - self.started
        tpot = None
        if self.first is not None and self.last is not None and self.num_tokens > 1:
            tpot = (self.last - self.first) / (self.num_tokens - 1)
        return Outcome(ok, ttft, tpot)

    def end(self, ok: bool | None) -> None:
        """Once: ok True (finished), False (failed), None (given up by its consumer)."""
        if self.ended:
            return
        self.ended = True
        result = None if ok is None else self.outcome(ok)
        for fn in self.on_end:
            fn(result, self.ids)


class TappedStream:
    """A `RequestStream` whose outputs pass through a `StreamWatch` on their way to the consumer."""

    __slots__ = ("inner", "watch")

    def __init__(self, inner: RequestStream, watch: StreamWatch) -> None:
        self.inner = inner
        self.watch = watch

    @property
    def request_id(self) -> str:
        return self.inner.request_id

    @property
    def done(self) -> bool:
        return self.inner.done

    def abort(self) -> None:
        self.inner.abort()
        self.watch.end(None)  # no-op when it already ended

    def __aiter__(self) -> TappedStream:
        return self

    async def __anext__(self) -> RequestOutput:
        try:
            out = await self.inner.__anext__()
        except StopAsyncIteration:
            self.watch.end(None)  # ended without a finished output: aborted under it
            raise
        except Exception:
            self.watch.end(False)
            raise
        self.watch.observe(out)
        if out.finished:
            self.watch.end(True)
        return out


class VersionClient:
    """`AsyncEngineClient` of one version as the routes use it (everything else passes through)."""

    def __init__(self, version: ModelVersion, on_outcome: Callable[[ModelVersion, Outcome], None],
                 mirror: Callable[[ModelVersion, str, list[int], SamplingParams], OnEnd | None]) -> None:
        self._version = version
        self._client: AsyncEngineClient = version.client
        self._on_outcome = on_outcome
        self._mirror = mirror

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    **kwargs: Any) -> TappedStream:
        v = self._version
        if v.inject_fault():
            self._on_outcome(v, Outcome(False))
            raise EngineUnavailableError(f"injected fault (test-only fail_fraction of {v.spec.ref}); "
                                         "the request was not run")
        stream = self._client.add_request(request_id, prompt, params, **kwargs)
        ends: list[OnEnd] = [lambda outcome, _ids: outcome is not None and self._on_outcome(v, outcome)]
        if isinstance(prompt, list):
            paired = self._mirror(v, request_id, prompt, params)
            if paired is not None:
                ends.append(paired)
        return TappedStream(stream, StreamWatch(ends))
