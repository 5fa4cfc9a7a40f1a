"""Driving engine streams for a route: submit, merge, collect, map engine errors to HTTP.

A request whose HTTP client goes away is aborted in the engine at once, for
streaming responses (`SSEResponse.on_close`) and non-streaming ones alike (a
watcher on the ASGI receive channel).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from lockgate.engine.client import (
    EngineDeadError,
    EngineUnavailableError,
    RequestRejectedError,
    RequestStream,
)
from lockgate.engine.outputs import RequestOutput
from lockgate.engine.sampling_params import SamplingParams
from lockgate.gateway.lease import Lease
from lockgate.server.context import LEASE_SCOPE_KEY, ServerContext
from lockgate.server.errors import APIError, internal_error, unavailable
from lockgate.server.gating import Gate
from lockgate.server.metrics import RequestTracker
from lockgate.server.params import sampling_error
from lockgate.server.sse import sse_event

log = logging.getLogger("lockgate.server")


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


def lease_of(request: Request) -> Lease:
    """The request's lease, put in the ASGI scope by the guard middleware."""
    return request.scope[LEASE_SCOPE_KEY]


def start(ctx: ServerContext, lease: Lease, request_id: str, prompts: list[list[int]],
          texts: list[str | None], params: SamplingParams, priority: int = 0,
          gate: Gate | None = None) -> tuple[list[RequestStream], RequestTracker]:
    """Take what a generation needs (a metrics record, one engine stream per prompt), each put
    on the lease as it is taken, so any failure from here to the last byte gives it all back."""
    lease.checkpoint("track")
    record = gate.record if gate is not None else None
    if record is not None:
        record.admitted = time.monotonic()  # admission ends: the engine takes over
    tracker = ctx.metrics.tracker(sum(len(ids) for ids in prompts), record)
    if gate is not None:
        gate.track(tracker)
    lease.hold(lambda outcome: tracker.finish(None, error=outcome))
    lease.accounted = True
    lease.checkpoint("submit")
    salt = gate.cache_salt if gate is not None else None
    tenant, weight = gate.tenant if gate is not None else ("", 1.0)
    streams = submit(ctx, lease, request_id, prompts, texts, params, priority, salt, tenant, weight)
    lease.checkpoint("respond")
    return streams, tracker


def submit(ctx: ServerContext, lease: Lease, request_id: str, prompts: list[list[int]],
           texts: list[str | None], params: SamplingParams, priority: int = 0,
           cache_salt: str | None = None, tenant: str = "", tenant_weight: float = 1.0) -> list[RequestStream]:
    """Submit one engine request per prompt; all or nothing."""
    streams: list[RequestStream] = []
    try:
        for i, (ids, text) in enumerate(zip(prompts, texts)):
            rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
            stream = ctx.client.add_request(rid, ids, params, prompt_text=text, priority=priority,
                                            cache_salt=cache_salt, tenant=tenant, tenant_weight=tenant_weight)
            lease.hold(lambda _outcome, s=stream: s.abort())
            streams.append(stream)
    except ValueError as exc:
        abort_all(streams)
        raise sampling_error(exc) from None
    except EngineUnavailableError as exc:
        abort_all(streams)
        raise unavailable(str(exc), "engine_unavailable", retry_after_s=5) from None
    return streams


def abort_all(streams: list[RequestStream]) -> None:
    for s in streams:
        s.abort()


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several streams as they come, tagged with the stream's index."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, s: RequestStream) -> None:
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


async def collect(request: Request, streams: list[RequestStream], on_output: Any) -> list[RequestOutput]:
    """The final output of every stream; raises ClientGone (after aborting) if the client leaves."""
    finals: list[RequestOutput | None] = [None] * len(streams)

    async def consume() -> None:
        async for i, out in merged(streams):
            on_output(out)
            finals[i] = out

    work = asyncio.ensure_future(consume())
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            raise ClientGone()
        work.result()  # re-raises engine errors
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await work
        abort_all(streams)  # no-op for finished streams
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


async def collect_or_respond(request: Request, streams: list[RequestStream],
                             tracker: Any) -> list[RequestOutput] | Response:
    """Non-streaming routes: every stream's final output, or the response to send instead.

    A client that went away gets a 499 nobody reads (its requests are already
    aborted); an engine failure becomes its HTTP error."""
    try:
        return await collect(request, streams, tracker.on_output)
    except ClientGone:
        tracker.finish(None, error="client_disconnected")
        return Response(status_code=499)
    except Exception as exc:
        tracker.finish(None, error=failure_reason(exc))
        err = engine_error(exc)
        if err is None:
            raise
        raise err from None


def stream_closer(streams: list[RequestStream], tracker: Any) -> Any:
    """`SSEResponse.on_close` for streaming routes: abort in the engine, record the hang-up."""
    def on_close() -> None:
        abort_all(streams)
        tracker.finish(None, error="client_disconnected")  # no-op when the stream completed

    return on_close
