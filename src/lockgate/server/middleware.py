"""The guard in front of every route: API key, drain, body-size limit, in-flight count.

A pure ASGI middleware (not Starlette's BaseHTTPMiddleware) so streaming
responses and disconnect notifications pass through untouched.
"""
from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lockgate.server.context import ServerContext
from lockgate.server.errors import APIError, unavailable

# Reachable without an API key and while draining (load balancers and scrapers use them).
OPEN_PATHS = frozenset({"/health", "/ping", "/metrics", "/version"})


class GuardMiddleware:
    def __init__(self, app: ASGIApp, ctx: ServerContext) -> None:
        self.app = app
        self.ctx = ctx
        key = ctx.config.api_key
        self._expected = f"Bearer {key}".encode() if key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        ctx = self.ctx
        if self._expected is not None and not self._authorized(scope):
            await _reply(send, APIError(401, "invalid or missing API key (send `Authorization: Bearer <key>`)",
                                        code="invalid_api_key"))
            return
        if ctx.draining:
            ctx.metrics.reject("draining")
            err = unavailable("the server is shutting down", "server_draining")
            err.headers["Connection"] = "close"
            await _reply(send, err)
            return
        limit = ctx.config.max_request_body_bytes
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _reply(send, _too_large(limit))
            return
        # Read the body up front (bounded), then replay it: a chunked upload that
        # overruns the limit is refused before any route sees it.
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _reply(send, _too_large(limit))
                return
            chunks.append(chunk)
            more = msg.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: disconnect notifications

        ctx.inflight += 1
        try:
            await self.app(scope, replay, send)
        finally:
            ctx.inflight -= 1

    def _authorized(self, scope: Scope) -> bool:
        got = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        return hmac.compare_digest(got, self._expected or b"")


def _content_length(scope: Scope) -> int | None:
    for k, v in scope["headers"]:
        if k == b"content-length":
            try:
                return int(v)
            except ValueError:
                return None
    return None


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body exceeds the limit of {limit} bytes", code="request_too_large")


async def _reply(send: Send, err: APIError) -> None:
    resp = err.response()
    await resp({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}
