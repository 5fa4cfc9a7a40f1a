"""`Exchange`: one HTTP call's way out, as the guard middleware sees it.

Every response message of a call passes through `Exchange.send` once. The
status line gets, in this order: the headers of the route that served the call
(model version, replica, ignored fields: model_select.py), the tenant's
`x-ratelimit-*` (unless the answer has them already, as a 429 may), CORS for an
allowed cross-origin caller, and `server-timing` (the server's own time to the
status line). One object and one copy of the header list per call: this runs
on every request, so it is kept to the bare minimum of work.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from starlette.types import Message, Scope, Send

from lockgate.server.model_select import add_route_headers
from lockgate.server.origins import cors_headers
from lockgate.server.state import PRINCIPAL_SCOPE_KEY

if TYPE_CHECKING:
    from lockgate.gateway.gateway import Gateway
    from lockgate.gateway.lease import Lease

_ACAO = b"access-control-allow-origin"


class Exchange:
    __slots__ = ("_send", "_cors_origin", "_t0", "status", "started", "lease", "_scope", "_gateway", "_traced")

    def __init__(self, send: Send, cors_origin: str | None) -> None:
        self._send = send
        self._cors_origin = cors_origin  # set only for an allowed cross-origin caller
        self._t0 = time.perf_counter()
        self.status = 0  # the status sent, for the responses counter (0: none was)
        self.started = False  # the route's answer has started (a later failure cannot be answered)
        self.lease: Lease | None = None  # set while a route runs: its messages are the route's answer
        self._scope: Scope | None = None
        self._gateway: Gateway | None = None
        self._traced = False

    def route(self, scope: Scope, lease: Lease, gateway: Gateway, traced: bool) -> None:
        """From here on the messages are a route's answer (`traced`: record its first and last byte)."""
        self._scope, self.lease, self._gateway, self._traced = scope, lease, gateway, traced

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            message = self._start(message)
        elif self._traced and self.lease is not None:
            record = self.lease.record
            if record is not None:  # the answer's first and last byte
                now = time.monotonic()
                if record.response_started is None:
                    record.response_started = now
                record.response_ended = now
        await self._send(message)

    def _start(self, message: Message) -> dict[str, Any]:
        status = message["status"]
        self.status = status
        headers = list(message.get("headers", ()))
        lease = self.lease
        if lease is not None:
            self.started = True
            lease.status = status
            if status >= 400:
                lease.outcome = "rejected"
            scope = self._scope
            assert scope is not None and self._gateway is not None
            add_route_headers(scope, headers)
            principal = scope.get(PRINCIPAL_SCOPE_KEY)
            if principal is not None and principal.tenant is not None:
                rate = self._gateway.rate_headers(principal)
                if rate:  # OpenAI's x-ratelimit-* on every response to a tenant (a 429 may carry them already)
                    have = {k for k, _ in headers}
                    for k, v in rate.items():
                        kb = k.encode()
                        if kb not in have:
                            headers.append((kb, v.encode()))
        if self._cors_origin is not None and not any(k == _ACAO for k, _ in headers):
            headers += cors_headers(self._cors_origin, preflight=False)
        headers.append((b"server-timing", f"app;dur={(time.perf_counter() - self._t0) * 1000:.1f}".encode()))
        return {**message, "headers": headers}
