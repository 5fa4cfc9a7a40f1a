"""The server's listening socket, bound before anything loads (`lockgate serve`, one process or the
parent of `--api-workers N`), so a port that is taken fails in a moment with a message that says
what to do, not after the model has loaded for seconds. Imports nothing heavy: the CLI reaches it.

`reserve` binds the port first of all, before the option checks import the lifecycle (most of a second), and
holds it unlistened while they run; `bind_port` starts listening on it once they have passed."""
from __future__ import annotations

import errno
import socket


class PortUnavailable(OSError):
    """The address cannot be listened on; the message names it and the way out."""


def _bound(host: str, port: int) -> socket.socket:
    """A socket bound to the address, not listening yet."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _name, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def listen(host: str, port: int, backlog: int = 2048, held: socket.socket | None = None) -> socket.socket:
    """The server's listening socket, bound here once (and inherited by every API worker); `held`:
    the socket `reserve` bound."""
    sock = held if held is not None else _bound(host, port)
    try:
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def reserve(host: str, port: int) -> socket.socket | None:
    """The port bound but not listening (a client is refused, not left waiting on a server that may
    refuse to start), held while the options are checked: `PortUnavailable` at once when the port is
    in use. None for any other error, which `bind_port` reports after the checks, as before (a bad
    option is named before an address that cannot be used)."""
    try:
        return _bound(host, port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise unavailable(host, port, exc) from None
        return None


def bind_port(host: str, port: int, held: socket.socket | None = None) -> socket.socket:
    """`listen` (on `held`, from `reserve`), or `PortUnavailable` with a message for a person: which
    address, and what to change."""
    try:
        return listen(host, port, held=held)
    except OSError as exc:
        raise unavailable(host, port, exc) from None


def unavailable(host: str, port: int, exc: OSError) -> PortUnavailable:
    """Why `host:port` cannot be listened on, and what to change."""
    if isinstance(exc, socket.gaierror):
        return PortUnavailable(f"cannot listen on {host}:{port}: {host!r} is not an address of this machine "
                               f"({exc.strerror}); change --host")
    if exc.errno == errno.EADDRINUSE:
        return PortUnavailable(
            f"port {port} on {host} is already in use (another `lockgate serve`, or another program): stop "
            f"it, or pick a free port with --port (e.g. --port {port + 1 if port < 65535 else 8000})")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return PortUnavailable(f"not allowed to listen on port {port} on {host} (ports below 1024 need "
                               "privileges): pick another with --port")
    return PortUnavailable(f"cannot listen on {host}:{port}: {exc.strerror or exc}; check --host and --port")
