"""CurveZMQ for engine sockets open to a network: a cluster's keys, and the core's guard.

An engine core reached over TCP (`serve --ray`) is an attack surface: anyone who can reach
its input socket could submit work, and its output and KV-event sockets show what others
run. So every TCP socket of a core is a CURVE server (authenticated, encrypted), and only
the API process that started it, holding the cluster's client key, gets through:

- `CurveKeys.generate()`: one server key pair (every core of the cluster) and one client key
  pair (the API process), made when the server starts or joins a cluster, kept in memory.
  The cores get the server pair and the client's public key in their environment
  (`CurveServer.to_env` / `from_env`), never on a command line.
- `CurveGuard` (in the core process): a ZAP handler that admits only the allowed client
  public keys, and a watcher of every guarded socket's handshakes; each refused attempt is
  logged with the socket and, where ZeroMQ says it, the peer's address (a client that keeps
  retrying is summarised, not logged 10 times a second). With no ZAP answer a CURVE
  handshake never completes, so the guard fails closed.

Z85 text keys (40 characters) throughout; msgspec JSON for the environment value.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass

import msgspec
import zmq
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

log = logging.getLogger("lockgate.engine.core")

ENV_VAR = "LOCKGATE_CURVE_SERVER"  # the core's keys, set by whoever starts it
ZAP_ENDPOINT = "inproc://zeromq.zap.01"  # fixed by the ZAP specification (RFC 27)
DOMAIN_PREFIX = "lockgate-"  # each guarded socket's ZAP domain: lockgate-<its name>
LOG_EVERY_S = 10.0  # per socket and cause: one line, then a count of the repeats


def _key(text: str | bytes, what: str) -> bytes:
    """A Z85 key as bytes; ValueError unless it is 40 Z85 characters (32 bytes)."""
    raw = text.encode() if isinstance(text, str) else text
    try:
        if len(raw) == 40 and len(z85.decode(raw)) == 32:
            return raw
    except (ValueError, KeyError, TypeError):
        pass
    raise ValueError(f"{what} is not a CURVE key (40 Z85 characters)")


@dataclass(frozen=True, slots=True)
class CurveClient:
    """The API process's side: its key pair and the cores' public key."""

    public: bytes
    secret: bytes  # never logged (see __repr__)
    server_public: bytes

    def apply(self, sock: zmq.Socket) -> None:
        """Make `sock` a CURVE client of the cluster's cores (before it connects)."""
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        sock.curve_serverkey = self.server_public

    def __repr__(self) -> str:  # never print a secret key
        return f"CurveClient(public={self.public.decode()!r})"


class _ServerEnv(msgspec.Struct, forbid_unknown_fields=True):
    public: str
    secret: str
    clients: list[str]


@dataclass(frozen=True, slots=True)
class CurveServer:
    """A core's side: its key pair and the client public keys it admits."""

    public: bytes
    secret: bytes
    clients: frozenset[bytes]

    def to_env(self) -> str:
        return msgspec.json.encode(_ServerEnv(self.public.decode(), self.secret.decode(),
                                              sorted(c.decode() for c in self.clients))).decode()

    @classmethod
    def from_env(cls, value: str) -> CurveServer:
        """Parse `to_env`'s text; ValueError (naming no key material) when malformed."""
        try:
            env = msgspec.json.decode(value, type=_ServerEnv)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ValueError(f"{ENV_VAR} is malformed: {exc}") from None
        if not env.clients:
            raise ValueError(f"{ENV_VAR} admits no client key")
        return cls(_key(env.public, "the server public key"), _key(env.secret, "the server secret key"),
                   frozenset(_key(c, "a client public key") for c in env.clients))

    @classmethod
    def pop_env(cls) -> CurveServer | None:
        """The keys the starter put in this process's environment (removed from it, so that
        nothing this process starts inherits them); None when there are none."""
        value = os.environ.pop(ENV_VAR, None)
        return None if value is None else cls.from_env(value)

    def __repr__(self) -> str:
        return f"CurveServer(public={self.public.decode()!r}, clients={len(self.clients)})"


@dataclass(frozen=True, slots=True)
class CurveKeys:
    """One cluster's keys: the cores' server pair and the API process's client pair."""

    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes

    @classmethod
    def generate(cls) -> CurveKeys:
        if not zmq.has("curve"):
            raise RuntimeError("this libzmq has no CURVE support (pyzmq's wheels do; rebuild with libsodium)")
        server_public, server_secret = zmq.curve_keypair()
        client_public, client_secret = zmq.curve_keypair()
        return cls(server_public, server_secret, client_public, client_secret)

    @property
    def server(self) -> CurveServer:
        return CurveServer(self.server_public, self.server_secret, frozenset({self.client_public}))

    @property
    def client(self) -> CurveClient:
        return CurveClient(self.client_public, self.client_secret, self.server_public)

    def __repr__(self) -> str:
        return f"CurveKeys(server={self.server_public.decode()!r}, client={self.client_public.decode()!r})"


# The refusals a guarded socket's monitor reports (a ZAP refusal is logged by the handler, with more).
_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
_PROTOCOL_CAUSES = {
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "a client without CURVE (plain ZeroMQ)",
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "a CURVE client with the wrong server key",
}


class CurveGuard:
    """The core's ZAP handler and handshake watcher, on one thread (see the module docstring).

    `protect(sock, name)` makes a socket a CURVE server (before it binds); `start()` once every
    socket is protected; `stop()` before the context is terminated. Counters for tests:
    `num_admitted`, `num_refused`."""

    def __init__(self, ctx: zmq.Context, keys: CurveServer) -> None:
        self._ctx = ctx
        self._keys = keys
        self._allowed = frozenset(z85.decode(c) for c in keys.clients)
        self._zap = ctx.socket(zmq.REP)
        self._zap.setsockopt(zmq.LINGER, 0)
        self._zap.bind(ZAP_ENDPOINT)  # bound first: a handshake that comes early waits for the thread
        self._monitors: dict[zmq.Socket, str] = {}  # monitor -> the guarded socket's name
        self._watched: list[zmq.Socket] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_logged: dict[tuple[str, str], tuple[float, int]] = {}  # (socket, cause) -> (when, repeats)
        self.num_admitted = 0
        self.num_refused = 0

    def protect(self, sock: zmq.Socket, name: str) -> None:
        sock.curve_server = True
        sock.curve_publickey = self._keys.public
        sock.curve_secretkey = self._keys.secret
        sock.zap_domain = (DOMAIN_PREFIX + name).encode()
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)  # no ZAP handler: refuse, never admit
        addr = f"inproc://lockgate-curve-monitor-{id(self)}-{name}"
        sock.monitor(addr, _HANDSHAKE_FAILED)
        mon = self._ctx.socket(zmq.PAIR)
        mon.setsockopt(zmq.LINGER, 0)
        mon.connect(addr)
        self._monitors[mon] = name
        self._watched.append(sock)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="curve-guard", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and close the guard's sockets (the guarded ones stay the caller's)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
        for sock in self._watched:
            try:
                sock.disable_monitor()
            except zmq.ZMQError:
                pass
        for mon in self._monitors:
            mon.close(linger=0)
        self._zap.close(linger=0)

    # ---- the thread --------------------------------------------------------------------
    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._zap, zmq.POLLIN)
        for mon in self._monitors:
            poller.register(mon, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                for sock, _ in poller.poll(200):
                    if sock is self._zap:
                        self._answer(self._zap.recv_multipart())
                    else:
                        self._handshake_failed(sock, sock.recv_multipart())
            except zmq.ZMQError as exc:
                if exc.errno == zmq.ETERM:
                    return
                log.warning("curve guard: %s", exc)
            except Exception:  # noqa: BLE001 - the guard must keep answering (refusing) clients
                log.exception("curve guard: unexpected error")

    def _answer(self, frames: list[bytes]) -> None:
        """One ZAP request (RFC 27): admit a CURVE client whose key is allowed, refuse the rest."""
        if len(frames) < 6:  # libzmq never sends one; REP must still answer to stay usable
            log.warning("curve guard: malformed ZAP request (%d frames) refused", len(frames))
            self._zap.send_multipart([b"1.0", frames[1] if len(frames) > 1 else b"", b"400", b"malformed", b"", b""])
            return
        version, request_id, domain, address, _identity, mechanism = frames[:6]
        key = frames[6] if len(frames) > 6 else b""
        ok = mechanism == b"CURVE" and key in self._allowed
        name = domain.decode(errors="replace").removeprefix(DOMAIN_PREFIX)
        if ok:
            self.num_admitted += 1
            log.debug("curve guard: admitted the API process from %s on %s", address.decode(errors="replace"), name)
        else:
            self.num_refused += 1
            who = z85.encode(key).decode() if len(key) == 32 else "none"
            self._refused(name, f"a CURVE client with an unknown key ({who})",
                          f"from {address.decode(errors='replace')}")
        self._zap.send_multipart([version, request_id, b"200" if ok else b"400",
                                  b"OK" if ok else b"not this cluster's client key", b"", b""])

    def _handshake_failed(self, mon: zmq.Socket, frames: list[bytes]) -> None:
        msg = parse_monitor_message(frames)
        if msg["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return  # the ZAP handler refused it and said so, with the peer's address
        self.num_refused += 1
        cause = "a CURVE handshake that did not complete"  # no detail: e.g. a port scan, or a peer that left
        if msg["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            cause = _PROTOCOL_CAUSES.get(msg["value"], "a CURVE handshake with a protocol error")
        # A bound socket's monitor names its own endpoint, not the peer's (ZeroMQ's v1 events).
        self._refused(self._monitors.get(mon, "?"), cause, f"at {msg['endpoint'].decode(errors='replace')}")

    def _refused(self, name: str, cause: str, where: str) -> None:
        now = time.monotonic()
        key = (name, cause)
        last = self._last_logged.get(key)
        if last is not None and now - last[0] < LOG_EVERY_S:
            self._last_logged[key] = (last[0], last[1] + 1)
            return
        repeats = f" ({last[1]} more like it in the last {now - last[0]:.0f} s)" if last and last[1] else ""
        self._last_logged[key] = (now, 0)
        log.warning("engine core: refused a connection to its %s socket %s: %s%s", name, where, cause, repeats)
