"""RequestStream: the outputs of one request, as the API process's routes read them.

The async client (`client.py`) puts each `RequestOutput` the output processor
makes for a request into its stream; a route iterates it. A consumer that falls
behind gets everything since its last read merged into one item.
"""
from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque
from collections.abc import Callable

from lockgate.engine.outputs import CompletionOutput, RequestOutput


def _merge(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """Two successive outputs of one request as one: deltas concatenated, the rest from `b`."""
    by_index: dict[int, CompletionOutput] = {c.index: c for c in a.outputs}
    for c in b.outputs:
        prev = by_index.get(c.index)
        if prev is not None:
            c.delta_text = prev.delta_text + c.delta_text
            c.delta_token_ids = prev.delta_token_ids + c.delta_token_ids
        by_index[c.index] = c
    b.outputs = [by_index[i] for i in sorted(by_index)]
    b.num_cached_tokens = max(a.num_cached_tokens, b.num_cached_tokens)
    if b.prompt_logprobs is None:
        b.prompt_logprobs = a.prompt_logprobs
    return b


class RequestStream:
    """Outputs of one (parent) request as an async iterator (for one reader).

    When the consumer falls behind (a slow HTTP client), pending outputs are
    merged into one, so a reader always gets everything since its last read
    in a single item and the backlog never grows by one item per step.
    """

    __slots__ = ("request_id", "num_children", "queued_tokens", "queued", "finished_normally",
                 "_pending", "_waiter", "_done", "_error", "_on_end", "hold_until")

    def __init__(self, request_id: str, num_children: int, queued_tokens: int,
                 on_end: Callable[[RequestStream], None]) -> None:
        self.request_id = request_id
        self.num_children = num_children  # engine requests (n > 1 fans out)
        self.queued_tokens = queued_tokens
        self.queued = True  # no output yet (admission control counts it as waiting)
        self.finished_normally = False
        self._pending: deque[RequestOutput] = deque()
        # The reader's wake-up while it waits (a bare future: an asyncio.Event costs more per output).
        self._waiter: asyncio.Future[None] | None = None
        self._done = False
        self._error: BaseException | None = None
        self._on_end = on_end
        self.hold_until = 0.0  # load_format="fake" stalls only: nothing reaches the reader before then

    @property
    def done(self) -> bool:
        return self._done

    def put(self, out: RequestOutput) -> None:
        if self._done:
            return
        if self._pending:
            self._pending[-1] = _merge(self._pending[-1], out)
        else:
            self._pending.append(out)
        if out.finished:
            self.finished_normally = True
            self._end()
        self._wake()

    def fail(self, exc: BaseException) -> None:
        """End the stream with an error the consumer sees after any pending outputs."""
        if self._done:
            return
        self._error = exc
        self._end()
        self._wake()

    def abort(self) -> None:
        """The consumer gives up (client gone): stop the request in the engine at once."""
        if not self._done:
            self._end()
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _end(self) -> None:
        self._done = True
        self._on_end(self)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.hold_until:
            wait = self.hold_until - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self.hold_until = 0.0
        while True:
            if self._pending:
                return self._pending.popleft()
            if self._error is not None:
                raise self._error
            if self._done:
                raise StopAsyncIteration
            waiter = self._waiter
            if waiter is None:
                waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                if self._waiter is waiter:
                    self._waiter = None


def stalls(request_id: str, fraction: float) -> bool:
    """Whether a fake-engine request is one of the `fraction` that stall (a stable hash of its id)."""
    digest = hashlib.blake2b(request_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < fraction
