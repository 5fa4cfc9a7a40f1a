"""The server's listening socket, bound before anything loads (`lockgate serve`, one process or the
parent of `--api-workers N`), so a port that is taken fails in a moment with a message that says
what to do, not after the model has loaded for seconds. Imports nothing heavy: the CLI reaches it."""
from __future__ import annotations

import errno
import socket


class PortUnavailable(OSError):
    """The address cannot be listened on; the message names it and the way out."""


def listen(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """The server's listening socket, bound here once (and inherited by every API worker)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _name, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def bind_port(host: str, port: int) -> socket.socket:
    """`listen`, or `PortUnavailable` with a message for a person: which address, and what to change."""
    try:
        return listen(host, port)
    except socket.gaierror as exc:
        raise PortUnavailable(f"cannot listen on {host}:{port}: {host!r} is not an address of this machine "
                              f"({exc.strerror}); change --host") from None
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise PortUnavailable(
                f"port {port} on {host} is already in use (another `lockgate serve`, or another program): stop "
                f"it, or pick a free port with --port (e.g. --port {port + 1 if port < 65535 else 8000})") from None
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise PortUnavailable(f"not allowed to listen on port {port} on {host} (ports below 1024 need "
                                  "privileges): pick another with --port") from None
        raise PortUnavailable(f"cannot listen on {host}:{port}: {exc.strerror or exc}; check --host and --port") \
            from None
