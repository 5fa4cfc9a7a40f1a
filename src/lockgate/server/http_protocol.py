"""The HTTP/1.1 connection protocol: uvicorn's httptools (llhttp) parser, made strict and bounded.

llhttp refuses ambiguous framing (Transfer-Encoding together with
Content-Length, duplicate Content-Length, bad chunk sizes) and the connection
is closed after the 400, so nothing can be smuggled behind it. On top of
uvicorn's protocol this adds what it lacks:
- a deadline for the request line and headers: every head must be complete
  within `header_timeout_s` of its first byte (or of the connection opening),
  whatever else is in flight on the connection. A slowloris that drips header
  bytes, a connection that never sends anything, and a keep-alive or pipelined
  head dripped behind a long response are all cut off (uvicorn's keep-alive
  timer is cancelled by every byte, so it cannot be the bound);
- a bound on the size of the request line and headers (431);
- parser errors answered in the OpenAI error shape (JSON), not text/plain.
Idle keep-alive connections are closed by uvicorn's `timeout_keep_alive`.
"""
from __future__ import annotations

import asyncio
from asyncio import TimerHandle
from typing import TYPE_CHECKING

import msgspec
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from lockgate.server.errors import APIError

if TYPE_CHECKING:
    from uvicorn._types import ASGI3Application

# After an error answer: the peer's further bytes are read and dropped for this long, then the
# connection is dropped (a peer that does not read cannot hold it open).
LINGER_S = 2.0


class _HeadersTooLarge(Exception):
    pass


class GuardedHttpProtocol(HttpToolsProtocol):
    header_timeout_s: float = 10.0
    max_header_bytes: int = 64 * 1024

    _header_timer: TimerHandle | None = None
    _header_bytes: int = 0
    _reject: APIError | None = None
    _in_body: bool = False  # between a request's headers and its end: bytes are body, not a head
    _running: RequestResponseCycle | None = None  # the cycle whose response owns the connection
    _lingering: bool = False  # an error was answered: the connection only drains until it closes

    # ---- deadline for the request head ---------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        # Bytes outside a body belong to a head (or to blank lines before one): the deadline
        # runs from the first of them, even while an earlier response is still being written.
        # So does the rest of a body nobody will read (its request was answered already, say a
        # 401): every byte cancels uvicorn's keep-alive timer, so without this it has no bound.
        if self._header_timer is None and (not self._in_body or self._answered()):
            self._arm_header_timer()
        super().data_received(data)

    def _answered(self) -> bool:
        return self.cycle is not None and self.cycle.response_complete

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        if self._header_timer is None:  # a head that began in the same packet as a body's end
            self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._disarm_header_timer()
        self._in_body = True
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_body = False
        self._disarm_header_timer()  # armed only for an answered body's rest: the next head gets its own
        super().on_message_complete()

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        self._running = cycle
        super()._start_asgi_task(cycle, app)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        self._abandon_cycles()  # uvicorn only tells the newest cycle, not the one running
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
        what = "the rest of an answered request" if self._in_body else "the request head"
        self.logger.info("closing a connection: %s did not arrive within %g s", what, self.header_timeout_s)
        self._write_error(APIError(408, f"{what} did not arrive within {self.header_timeout_s:g} s",
                                   code="request_timeout"))

    def _abandon_cycles(self) -> None:
        """Every request of this connection, running or queued behind it, is disconnected."""
        cycles = [self._running, self.cycle, *(c for c, _ in self.pipeline)]
        self.pipeline.clear()
        for cycle in cycles:
            if cycle is not None and not cycle.response_complete and not cycle.disconnected:
                cycle.disconnected = True
                cycle.message_event.set()

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
        """Answer `err` and close, ending whatever else the connection carries."""
        running = self._running
        mid_response = running is not None and running.response_started and not running.response_complete
        # A request in flight is cut short (its route sees a disconnect and releases what it holds):
        # a slow head must not keep the connection, and its slot, beyond the deadline.
        self._abandon_cycles()
        if mid_response:
            # HTTP/1.1 answers in order: an error cannot follow half a response. Cut it off.
            self.transport.abort()
            return
        body = msgspec.json.encode(err.body())
        head = [STATUS_LINE[err.status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [b"content-type: application/json\r\n",
                 b"content-length: " + str(len(body)).encode() + b"\r\n",
                 b"connection: close\r\n\r\n", body]
        self.transport.write(b"".join(head))
        self._linger()

    def _linger(self) -> None:
        """Send the answer and a FIN, then drop what the peer still sends for a moment: closing with
        unread bytes makes the kernel send a reset that can destroy the answer before it is read
        (a slowloris is still sending when its 408 goes out)."""
        self._lingering = True
        self._disarm_header_timer()
        self._unset_keepalive_if_required()
        self.flow.resume_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()  # the peer's EOF then closes the transport (eof_received)
        else:
            self.transport.close()
        self.loop.call_later(LINGER_S, self.transport.abort)


def protocol_class(header_timeout_s: float, max_header_bytes: int) -> type[GuardedHttpProtocol]:
    """A protocol class carrying this server's limits (uvicorn instantiates it per connection)."""
    return type("LockgateHttpProtocol", (GuardedHttpProtocol,),
                {"header_timeout_s": header_timeout_s, "max_header_bytes": max_header_bytes})
