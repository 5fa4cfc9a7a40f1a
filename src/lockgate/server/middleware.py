"""The guard in front of every route.

In order: Host and Origin checks (open mode), CORS preflight, the caller's key
(keyed mode: 401, and 403 for a key without the route's scope; `/metrics` needs
a key with the metrics scope or a global admin key unless --metrics-public), drain (503),
JSON-only bodies (415), body size (413) and body deadline (408); then the
route runs with a `Lease` in its scope that is released here when the call ends,
however it ends; then, still here, an inference request's record is closed (its
log line, SLO verdict and cost) and its trace finished. An exception no route
handled is logged once and answered as an OpenAI-shaped 500. Every response is
counted by route and status.

A pure ASGI middleware (not Starlette's BaseHTTPMiddleware) so streaming
responses and disconnect notifications pass through untouched. Every answer's
status line passes one `Exchange` (exchange.py: the route's, rate-limit, CORS
and timing headers); the hot inference routes are called straight from here
(direct.py), the rest through FastAPI's stack.
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lockgate.gateway.auth import Principal
from lockgate.gateway.lease import FAULT_POINTS, Lease
from lockgate.server.state import LEASE_SCOPE_KEY, PRINCIPAL_SCOPE_KEY, AppState
from lockgate.server.docs_ui import ASSETS, ASSETS_PREFIX
from lockgate.server.errors import APIError, internal_error, unavailable
from lockgate.server.pipeline import charge_call
from lockgate.server.origins import OriginPolicy, cors_headers
from lockgate.server.exchange import Exchange

if TYPE_CHECKING:
    from lockgate.observability.observer import Observer
    from lockgate.server.direct import DirectRoutes
    from lockgate.observability.tracing import RequestTracer

log = logging.getLogger("lockgate.server")

# Reachable without an API key and while draining (load balancers and probes use them).
OPEN_PATHS = frozenset({"/health", "/ping", "/version"})
# Every tenant's ids, spend and latencies: with keys, only a metrics or global admin key reads them
# (unless --metrics-public); served while draining too, so the scrape shows the drain.
METRICS_PATH = "/metrics"
ADMIN_PREFIX = "/admin/"
SLO_PATH = "/slo"  # open mode's SLO report; with keys it needs the admin scope, as /admin/slo
DOC_PATHS = frozenset({"/openapi.json", "/docs", "/docs/oauth2-redirect"})  # any valid key
# Swagger UI's script, stylesheet and icon (docs_ui.py): the same public files in every install,
# no data of anyone's: without a key, as the open paths (those exact paths only).
DOC_ASSET_PATHS = frozenset(ASSETS_PREFIX + name for name in ASSETS)
BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
FAULT_HEADER = b"x-lockgate-fault"
DRAIN_FACTOR = 4  # a refused body up to this many times the limit is read and dropped before the 413


class GuardMiddleware:
    def __init__(self, app: ASGIApp, state: AppState, direct: DirectRoutes | None = None) -> None:
        self.app = app
        self.state = state
        self.direct = direct  # the hot routes, called straight from here (direct.py)
        cfg = state.config
        self.policy = OriginPolicy.build(cfg.host, cfg.allowed_origins, cfg.allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        origin = headers.get(b"origin")
        origin_s = origin.decode("latin-1") if origin is not None else None
        cors = origin_s is not None and self.policy.cors_allowed(origin_s)
        ex = Exchange(send, origin_s if cors else None)
        try:
            await self._guarded(scope, receive, ex.send, headers, origin_s, cors, ex)
        finally:
            self.state.metrics.http_response(self._route(scope), ex.status)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send, headers: dict[bytes, bytes],
                       origin: str | None, cors: bool, ex: Exchange) -> None:
        state = self.state
        err = self._screen(scope, headers, origin)
        if err is not None:
            await self._reply(send, err)
            return
        if scope["method"] == "OPTIONS" and b"access-control-request-method" in headers:
            if cors:  # an allowed cross-origin preflight: answered here, before auth
                await send({"type": "http.response.start", "status": 204,
                            "headers": cors_headers(origin or "", preflight=True)})
                await send({"type": "http.response.body", "body": b""})
            else:
                await self._reply(send, APIError(403, f"cross-origin requests from {origin!r} are not allowed "
                                                      "(see --allowed-origins)", code="origin_not_allowed"))
            return
        path = scope["path"]
        if path == METRICS_PATH:
            err = self._authorize_metrics(headers)
            if err is not None:
                await self._reply(send, err)
            else:
                await self._run(scope, receive, ex, None)
            return
        if path in OPEN_PATHS or path in DOC_ASSET_PATHS:
            await self._run(scope, receive, ex, None)
            return
        err = self._authorize(scope, headers, path)
        if err is not None and err.status == 401 and await state.gateway.refresh_on_miss():
            err = self._authorize(scope, headers, path)  # a key made through another instance just now
        if err is None:  # every call on an inference route costs its caller one request of rpm
            err = await charge_call(state.gateway, scope, path)
        if err is not None:
            await self._reply(send, err)
            return
        if state.draining:
            state.metrics.reject("draining")
            err = unavailable("the server is shutting down", "server_draining")
            err.headers["Connection"] = "close"
            await self._reply(send, err)
            return
        if scope["method"] in BODY_METHODS and not _is_json(headers.get(b"content-type")):
            await self._reply(send, APIError(
                415, "the request body must be JSON: send `Content-Type: application/json`",
                param="Content-Type", code="unsupported_media_type"))
            return
        body = await self._read_body(headers, receive, send)
        if body is None:
            return
        await self._run(scope, receive, ex, headers, body)

    def _authorize(self, scope: Scope, headers: dict[bytes, bytes], path: str) -> APIError | None:
        """Keyed mode: who is calling, and may that key use this route? Open mode: no admin API."""
        gw = self.state.gateway
        admin_route = path.startswith(ADMIN_PREFIX)
        if not gw.keyed:
            if admin_route:
                return APIError(403, "the admin API needs the server to run with --admin-key",
                                code="admin_disabled")
            return None
        admin_route = admin_route or path == SLO_PATH
        try:
            principal: Principal = gw.authenticate(headers.get(b"authorization"))
        except APIError as err:
            return err
        if admin_route and not principal.is_admin:
            return APIError(403, "this key has no admin scope", code="insufficient_scope")
        if not admin_route and not principal.can_infer and path not in DOC_PATHS:
            return APIError(403, "this key has no inference scope (use a tenant key with the inference scope)",
                            code="insufficient_scope")
        scope[PRINCIPAL_SCOPE_KEY] = principal
        return None

    def _authorize_metrics(self, headers: dict[bytes, bytes]) -> APIError | None:
        """Open mode (loopback, no keys) and --metrics-public: anyone; else a metrics or global admin key."""
        gw = self.state.gateway
        if not gw.keyed or self.state.config.metrics_public:
            return None
        try:
            principal: Principal = gw.authenticate(headers.get(b"authorization"))
        except APIError as err:
            return err
        if not principal.can_read_metrics:
            return APIError(403, "/metrics needs a key with the metrics scope or a global admin key (it shows "
                                 "every tenant's usage; --metrics-public opens it)", code="insufficient_scope")
        return None

    def _screen(self, scope: Scope, headers: dict[bytes, bytes], origin: str | None) -> APIError | None:
        """Open mode: refuse what a browser page could send on the user's behalf."""
        if self.state.gateway.keyed:
            return None
        host = headers.get(b"host")
        host_s = host.decode("latin-1") if host is not None else None
        if not self.policy.host_allowed(host_s):
            return APIError(403, f"host {host_s!r} is not allowed (loopback names only without an API key; "
                                 "see --allowed-hosts)", code="host_not_allowed")
        if origin is not None and not self.policy.origin_allowed(origin, host_s):
            return APIError(403, f"cross-origin requests from {origin!r} are not allowed (see --allowed-origins)",
                            code="origin_not_allowed")
        return None

    async def _read_body(self, headers: dict[bytes, bytes], receive: Receive, send: Send) -> bytes | None:
        """The whole body, bounded in size and time; None when a reply was sent instead."""
        limit = self.state.config.max_request_body_bytes
        declared = _content_length(headers)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.state.config.body_timeout_s
        if declared is not None and declared > limit:
            if declared <= DRAIN_FACTOR * limit:
                await _discard(receive, DRAIN_FACTOR * limit, deadline)
            await self._reply(send, _too_large(limit))
            return None
        chunks: list[bytes] = []
        size = 0
        more = True
        try:
            async with asyncio.timeout_at(deadline):  # one timer for the whole body (wait_for: a task per chunk)
                while more:
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        return None
                    chunk = msg.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        break
                    chunks.append(chunk)
                    more = msg.get("more_body", False)
        except TimeoutError:
            err = APIError(408, f"the request body did not arrive within {self.state.config.body_timeout_s:g} s",
                           code="request_timeout", headers={"Connection": "close"})
            await self._reply(send, err)
            return None
        if size > limit:
            if more:
                await _discard(receive, DRAIN_FACTOR * limit - size, deadline)
            await self._reply(send, _too_large(limit))
            return None
        return b"".join(chunks)

    async def _run(self, scope: Scope, receive: Receive, ex: Exchange, headers: dict[bytes, bytes] | None,
                   body: bytes | None = None) -> None:
        """Run the route with a lease; release it whatever happens; a stray exception is one 500.
        `body`: the request's body, read already (the route gets it again from `receive`)."""
        state = self.state
        fault = None
        if state.config.enable_fault_injection and headers is not None:
            name = headers.get(FAULT_HEADER, b"").decode("latin-1")
            fault = name if name in FAULT_POINTS else None
        lease = Lease(fault)
        scope[LEASE_SCOPE_KEY] = lease
        observer: Observer | None = getattr(state, "observer", None)
        # Tracing: only when configured, and not for probes and scrapes (the open paths).
        tracer = observer.tracer if observer is not None and headers is not None else None
        span = tracer.start_http(scope["method"], scope["path"], headers) if tracer is not None else None
        ex.route(scope, lease, state.gateway, span is not None)
        direct = self.direct.match(scope) if self.direct is not None else None

        state.inflight += 1
        try:
            if direct is not None:
                await self.direct(direct, scope, receive, ex, body)
            else:
                await self.app(scope, _replay(body, receive) if body is not None else receive, ex.send)
        except Exception as exc:  # noqa: BLE001 - the one place an unhandled error is logged and answered
            lease.outcome = "internal"
            if not lease.accounted:  # a request with a metrics record is counted by it on release
                rec = lease.record
                if rec is not None:
                    state.metrics.fail("internal", rec.tenant, rec.class_name)
                else:
                    state.metrics.fail("internal")
            log.exception("unhandled error in %s %s", scope["method"], scope["path"])
            if not ex.started:
                err = internal_error(exc)
                err.headers["Connection"] = "close"
                lease.status = err.status
                ex.lease = None  # the 500 is the guard's own answer: no route headers on it
                await self._reply(ex.send, err)
            # Started: the connection is closed by the server (the response cannot complete).
        finally:
            state.inflight -= 1
            lease.release()
            self._observe(scope, lease, observer, tracer, span)

    @staticmethod
    def _observe(scope: Scope, lease: Lease, observer: Observer | None, tracer: RequestTracer | None,
                 span: Any) -> None:
        """The request has ended and given everything back: close its record and its trace."""
        try:
            if lease.record is not None and observer is not None:
                observer.end(lease.record, lease)
            if span is not None and tracer is not None:
                route = getattr(scope.get("route"), "path", None)
                tracer.end_http(span, scope["method"], route, lease.status, lease.record)
        except Exception:  # noqa: BLE001 - observing a request must never fail it
            log.exception("recording the end of a request failed")

    async def _reply(self, send: Send, err: APIError) -> None:
        self.state.metrics.error(err.status, err.code)
        await err.response()({"type": "http"}, _no_receive, send)

    @staticmethod
    def _route(scope: Scope) -> str:
        """A bounded label for metrics: the matched route's path template (set by the router), or 'other'."""
        route = scope.get("route")
        path = getattr(route, "path", None)
        return path if isinstance(path, str) else "other"


def _headers(scope: Scope) -> dict[bytes, bytes]:
    out: dict[bytes, bytes] = {}
    for k, v in scope["headers"]:
        out.setdefault(k, v)  # the first of repeated headers
    return out


def _is_json(content_type: bytes | None) -> bool:
    """application/json or application/<anything>+json, parameters (charset) allowed."""
    if content_type is None:
        return False
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (media.startswith(b"application/") and media.endswith(b"+json"))


def _replay(body: bytes, receive: Receive) -> Receive:
    replayed = False

    async def replay() -> Message:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: disconnect notifications

    return replay


def _content_length(headers: dict[bytes, bytes]) -> int | None:
    value = headers.get(b"content-length")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return None


async def _discard(receive: Receive, budget: int, deadline: float) -> None:
    """Read and drop the rest of a refused body (up to `budget` bytes, until `deadline`).

    Closing a connection with unread request bytes makes the kernel send a TCP
    reset, which can destroy the 413 before the client reads it (RFC 9112 9.6):
    a body not much over the limit is drained first; a huge one is not worth it.
    """
    loop = asyncio.get_running_loop()
    while budget > 0:
        try:
            msg = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
        except TimeoutError:
            return
        if msg["type"] != "http.request":
            return
        budget -= len(msg.get("body", b""))
        if not msg.get("more_body", False):
            return


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body exceeds the limit of {limit} bytes", code="request_too_large",
                    headers={"Connection": "close"})


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}
