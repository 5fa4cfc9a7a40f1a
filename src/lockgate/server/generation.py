"""Driving engine streams for a route: merge, collect, map engine errors to HTTP.

A request whose HTTP client goes away is aborted in the engine at once, for
streaming responses (`SSEResponse.on_close`) and non-streaming ones alike (a
watcher on the ASGI receive channel).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from lockgate.engine.errors import EngineDeadError, EngineUnavailableError, RequestRejectedError
from lockgate.lifecycle.fleet_stream import FleetStream
from lockgate.engine.outputs import RequestOutput
from lockgate.errors import APIError, internal_error, unavailable
from lockgate.server.params import sampling_error
from lockgate.server.sse import sse_event

log = logging.getLogger("lockgate.server")

Settle = Callable[[list[str | None] | None, str | None], None]  # (finish reasons, error) -> None


class ClientGone(Exception):
    """The HTTP client disconnected before the response was ready."""


def engine_error(exc: BaseException) -> APIError | None:
    """The HTTP error for an exception from a request stream (None: not an engine error)."""
    if isinstance(exc, RequestRejectedError):
        return sampling_error(exc)
    if isinstance(exc, EngineDeadError):
        return unavailable(str(exc), "engine_dead", retry_after_s=5)
    if isinstance(exc, EngineUnavailableError):
        return unavailable(str(exc), "engine_unavailable", retry_after_s=5)
    return None


def failure_reason(exc: BaseException) -> str:
    if isinstance(exc, EngineDeadError):
        return "engine_dead"
    if isinstance(exc, EngineUnavailableError):
        return "engine_unavailable"
    if isinstance(exc, RequestRejectedError):
        return "rejected"
    return "internal"


def abort_all(streams: list[FleetStream]) -> None:
    for s in streams:
        s.abort()


async def merged(streams: list[FleetStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several streams as they come, tagged with the stream's index."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, s: FleetStream) -> None:
        try:
            async for out in s:
                queue.put_nowait((i, out))
            queue.put_nowait((i, None))
        except Exception as exc:  # noqa: BLE001 - forwarded to the consumer
            queue.put_nowait((i, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            i, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def _wait_disconnect(request: Request) -> None:
    while True:
        msg = await request.receive()
        if msg["type"] == "http.disconnect":
            return


async def collect(request: Request, streams: list[FleetStream], on_output: Any) -> list[RequestOutput]:
    """The final output of every stream (with the prompt's logprobs, whichever output brought
    them); raises ClientGone (after aborting) if the client leaves.

    Read here, in the request's own task; a watcher task waits for the client to hang up and then
    aborts the streams, which ends the loop below (one task per request, not two and a wait)."""
    finals: list[RequestOutput | None] = [None] * len(streams)
    gone = False

    def client_left(watcher: asyncio.Future[None]) -> None:
        nonlocal gone
        if watcher.cancelled():
            return
        watcher.exception()  # retrieved: a failed receive counts as the client gone, as a hang-up does
        gone = True
        abort_all(streams)  # wakes the reader: its streams end

    watcher = asyncio.ensure_future(_wait_disconnect(request))
    watcher.add_done_callback(client_left)
    outputs = merged(streams)
    try:
        async for i, out in outputs:
            if gone:
                break
            on_output(out)
            prev = finals[i]
            if prev is not None and out.prompt_logprobs is None:  # sent once, with an early output
                out.prompt_logprobs = prev.prompt_logprobs
            finals[i] = out
    finally:
        watcher.remove_done_callback(client_left)
        watcher.cancel()
        await outputs.aclose()  # several streams: stops their pumps
        abort_all(streams)  # no-op for finished streams
    if gone:
        raise ClientGone()
    missing = [i for i, f in enumerate(finals) if f is None]
    if missing:  # a stream that ended without output: aborted under us (drain timeout)
        raise unavailable("the request was cancelled because the server is shutting down", "server_draining")
    return finals  # type: ignore[return-value]


def stream_error_event(exc: BaseException) -> bytes:
    err = engine_error(exc)
    if err is None:
        log.error("stream failed: %s: %s", type(exc).__name__, exc, exc_info=exc)
        err = internal_error(exc)
    return sse_event(err.body())


async def collect_or_respond(request: Request, streams: list[FleetStream], observe: Callable[[RequestOutput], None],
                             settle: Settle) -> list[RequestOutput] | Response:
    """Non-streaming routes: every stream's final output, or the response to send instead.

    A client that went away gets a 499 nobody reads (its requests are already
    aborted); an engine failure becomes its HTTP error."""
    try:
        return await collect(request, streams, observe)
    except ClientGone:
        settle(None, "client_disconnected")
        return Response(status_code=499)
    except Exception as exc:
        settle(None, failure_reason(exc))
        err = engine_error(exc)
        if err is None:
            raise
        raise err from None
