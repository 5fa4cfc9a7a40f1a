"""The HTTP/1.1 connection protocol: uvicorn's httptools (llhttp) parser, made strict and bounded.

llhttp refuses ambiguous framing (Transfer-Encoding together with
Content-Length, duplicate Content-Length, bad chunk sizes) and the connection
is closed after the 400, so nothing can be smuggled behind it. On top of
uvicorn's protocol this adds what it lacks:
- a deadline for the request line and headers (a slowloris that drips header
  bytes, or a connection that never sends anything, is cut off);
- a bound on the size of the request line and headers (431);
- parser errors answered in the OpenAI error shape (JSON), not text/plain.
Idle keep-alive connections are closed by uvicorn's `timeout_keep_alive`.
"""
from __future__ import annotations

import asyncio
from asyncio import TimerHandle

import msgspec
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from lockgate.server.errors import APIError


class _HeadersTooLarge(Exception):
    pass


class GuardedHttpProtocol(HttpToolsProtocol):
    header_timeout_s: float = 10.0
    max_header_bytes: int = 64 * 1024

    _header_timer: TimerHandle | None = None
    _header_bytes: int = 0
    _reject: APIError | None = None

    # ---- deadline for the request head ---------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        if self._header_timer is None:
            self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._disarm_header_timer()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._on_header_timeout)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a request is being served; its own timeouts apply
        self.logger.info("closing a connection whose request head did not arrive within %.0f s",
                         self.header_timeout_s)
        self._write_error(APIError(408, f"the request head did not arrive within {self.header_timeout_s:g} s",
                                   code="request_timeout"))

    # ---- size of the request head -----------------------------------------------------
    def on_url(self, url: bytes) -> None:
        self._count(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value) + 4)
        super().on_header(name, value)

    def _count(self, n: int) -> None:
        self._header_bytes += n
        if self._header_bytes > self.max_header_bytes:
            self._reject = APIError(431, f"the request line and headers exceed {self.max_header_bytes} bytes",
                                    code="headers_too_large")
            raise _HeadersTooLarge()  # the parser stops and reports an error: answered below

    # ---- errors -------------------------------------------------------------------------
    def send_400_response(self, msg: str) -> None:
        err, self._reject = self._reject, None
        self._write_error(err or APIError(
            400, "malformed HTTP request (invalid or ambiguous framing or headers); the connection is closed",
            code="bad_http_request"))

    def _write_error(self, err: APIError) -> None:
        body = msgspec.json.encode(err.body())
        head = [STATUS_LINE[err.status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [b"content-type: application/json\r\n",
                 b"content-length: " + str(len(body)).encode() + b"\r\n",
                 b"connection: close\r\n\r\n", body]
        self.transport.write(b"".join(head))
        self.transport.close()


def protocol_class(header_timeout_s: float, max_header_bytes: int) -> type[GuardedHttpProtocol]:
    """A protocol class carrying this server's limits (uvicorn instantiates it per connection)."""
    return type("LockgateHttpProtocol", (GuardedHttpProtocol,),
                {"header_timeout_s": header_timeout_s, "max_header_bytes": max_header_bytes})
