"""Several API processes on one engine core (`lockgate serve --api-workers N`): the core's side.

The core's starter (the primary API worker) talks to it over its own PUSH/PULL pair, as
always (frontend 0). With `--attach ADDR` the core also binds a PULL socket there for the
other API workers of the same server. One attaches with `Attach(frontend, output, pid)`:
the core connects a PUSH socket to that frontend's own output address and answers `Ready`
there; from then on the outputs of the requests that frontend sent (its id rides in each
`AddRequests`) go there, and every frontend gets a message, with the core's stats, each
time the starter does.

Admission and routing must see the whole server's load, not one process's: `LoadBook`
keeps, per frontend, its requests queued (no output yet, per priority) and in flight, and
cumulative arrivals and first outputs; each frontend's messages carry the others' sums
(`PeerLoad`). A frontend that detaches or dies (its pidfd, polled with the sockets) has its
unfinished requests aborted at once: their KV blocks are freed, nobody would read them.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass

import msgspec
import zmq

from lockgate.engine.messages import Attach, EngineCoreOutput, EngineCoreRequest, PeerLoad, Ready

log = logging.getLogger("lockgate.engine.core")

PRIMARY = 0  # the core's starter, on its own socket pair


@dataclass(slots=True)
class _Tracked:
    owner: int
    priority: int
    tokens: int
    queued: bool = True  # no output yet


def _add(table: dict[int, list[int]], key: int, requests: int, tokens: int) -> None:
    slot = table.get(key)
    if slot is None:
        table[key] = [requests, tokens]
    else:
        slot[0] += requests
        slot[1] += tokens


class LoadBook:
    """Every unfinished request of a shared core by frontend: queued and in flight now, and
    cumulative arrivals and first outputs (departures), per frontend and in all."""

    def __init__(self) -> None:
        self.requests: dict[str, _Tracked] = {}
        self.queued: dict[int, dict[int, list[int]]] = {}  # owner -> priority -> [requests, tokens]
        self.total_queued: dict[int, list[int]] = {}
        self.in_flight: dict[int, int] = {}
        self.total_in_flight = 0
        self.departed: dict[int, list[int]] = {}  # owner -> [requests, tokens], cumulative
        self.total_departed = [0, 0]
        self.arrived: dict[int, dict[int, list[int]]] = {}  # owner -> priority -> [requests, tokens], cumulative
        self.total_arrived: dict[int, list[int]] = {}

    def added(self, owner: int, req: EngineCoreRequest) -> None:
        n, p = len(req.prompt_token_ids), req.priority
        self.requests[req.request_id] = _Tracked(owner, p, n)
        _add(self.queued.setdefault(owner, {}), p, 1, n)
        _add(self.total_queued, p, 1, n)
        _add(self.arrived.setdefault(owner, {}), p, 1, n)
        _add(self.total_arrived, p, 1, n)
        self.in_flight[owner] = self.in_flight.get(owner, 0) + 1
        self.total_in_flight += 1

    def owner(self, request_id: str) -> int | None:
        t = self.requests.get(request_id)
        return t.owner if t is not None else None

    def output(self, out: EngineCoreOutput) -> int:
        """The owner of the request this output is for (the starter for one it never saw)."""
        t = self.requests.get(out.request_id)
        if t is None:
            return PRIMARY
        if t.queued:
            self._unqueue(t)
            _add_pair(self.departed.setdefault(t.owner, [0, 0]), t.tokens)
            _add_pair(self.total_departed, t.tokens)
        if out.finish_reason is not None:
            self._end(out.request_id, t)
        return t.owner

    def removed(self, request_id: str) -> None:
        """Aborted (or never run): it leaves without a departure."""
        t = self.requests.get(request_id)
        if t is not None:
            if t.queued:
                self._unqueue(t)
            self._end(request_id, t)

    def forget(self, owner: int) -> list[str]:
        """A frontend left: its unfinished requests (to abort), and its counters dropped."""
        ids = [rid for rid, t in self.requests.items() if t.owner == owner]
        for rid in ids:
            self.removed(rid)
        for table in (self.queued, self.in_flight, self.departed, self.arrived):
            table.pop(owner, None)
        return ids

    def peers(self, owner: int, frontends: int) -> PeerLoad:
        """Everything but `owner`'s: what the other frontends have in this core."""
        own_q = self.queued.get(owner, {})
        queued = {}
        for p, (r, t) in self.total_queued.items():
            o = own_q.get(p)
            if o is not None:
                r, t = r - o[0], t - o[1]
            if r:
                queued[p] = (r, t)
        own_a = self.arrived.get(owner, {})
        arrived = {}
        for p, (r, t) in self.total_arrived.items():
            o = own_a.get(p)
            if o is not None:
                r, t = r - o[0], t - o[1]
            if r:
                arrived[p] = (r, t)
        own_d = self.departed.get(owner, (0, 0))
        return PeerLoad(frontends=frontends, in_flight=self.total_in_flight - self.in_flight.get(owner, 0),
                        queued=queued, departed=(self.total_departed[0] - own_d[0], self.total_departed[1] - own_d[1]),
                        arrived=arrived)

    def _unqueue(self, t: _Tracked) -> None:
        t.queued = False
        for table in (self.queued[t.owner], self.total_queued):
            slot = table[t.priority]
            slot[0] -= 1
            slot[1] -= t.tokens
            if slot[0] == 0:
                del table[t.priority]

    def _end(self, request_id: str, t: _Tracked) -> None:
        del self.requests[request_id]
        self.in_flight[t.owner] -= 1
        self.total_in_flight -= 1


def _add_pair(pair: list[int], tokens: int) -> None:
    pair[0] += 1
    pair[1] += tokens


@dataclass(slots=True)
class _Frontend:
    id: int
    pid: int
    sock: zmq.Socket
    pidfd: int


class FrontendHub:
    """The attach socket, the attached frontends' output sockets and pidfds, and the load book."""

    def __init__(self, ctx: zmq.Context, addr: str, encoder: msgspec.msgpack.Encoder) -> None:
        self.ctx = ctx
        self.encoder = encoder
        self.inp = ctx.socket(zmq.PULL)
        self.inp.setsockopt(zmq.RCVHWM, 0)
        self.inp.setsockopt(zmq.LINGER, 0)
        self.inp.bind(addr)
        self.frontends: dict[int, _Frontend] = {}
        self.by_pidfd: dict[int, int] = {}  # pidfd -> frontend id
        self.book = LoadBook()

    def attach(self, msg: Attach, ready: Ready, poller: zmq.Poller) -> list[str]:
        """Connect to the frontend's output address and answer `Ready` there; nothing when its
        process is already gone. Returns the requests to abort (of an earlier attach by the same id)."""
        if msg.frontend == PRIMARY:
            log.warning("engine core: attach with the starter's id refused")
            return []
        stale = self.detach(msg.frontend, poller) if msg.frontend in self.frontends else []
        try:
            pidfd = os.pidfd_open(msg.pid)
        except OSError as exc:  # gone already (or no pidfd support): nobody to serve
            log.warning("engine core: frontend %d (pid %d) cannot be watched (%s); not attached",
                        msg.frontend, msg.pid, exc)
            return stale
        sock = self.ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(msg.output)
        except zmq.ZMQError as exc:
            log.warning("engine core: frontend %d: bad output address %r (%s)", msg.frontend, msg.output, exc)
            sock.close()
            os.close(pidfd)
            return stale
        self.frontends[msg.frontend] = _Frontend(msg.frontend, msg.pid, sock, pidfd)
        self.by_pidfd[pidfd] = msg.frontend
        poller.register(pidfd, zmq.POLLIN)
        self.send(msg.frontend, ready)
        log.info("engine core: API process %d attached (%d attached)", msg.pid, len(self.frontends))
        return stale

    def detach(self, frontend: int, poller: zmq.Poller) -> list[str]:
        """Forget a frontend; returns its unfinished requests (the caller aborts them in the core)."""
        fe = self.frontends.pop(frontend, None)
        if fe is not None:
            self.by_pidfd.pop(fe.pidfd, None)
            with contextlib.suppress(KeyError):
                poller.unregister(fe.pidfd)
            os.close(fe.pidfd)
            fe.sock.close(linger=0)
            log.info("engine core: API process %d detached (%d attached)", fe.pid, len(self.frontends))
        return self.book.forget(frontend)

    def send(self, frontend: int, msg: object) -> None:
        fe = self.frontends.get(frontend)
        if fe is None:
            return
        try:
            fe.sock.send(self.encoder.encode(msg), flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:  # its pipe is gone: the pidfd will tell us it exited
            log.debug("engine core: cannot send to frontend %d: %s", frontend, exc)

    def route(self, outputs: list[EngineCoreOutput]) -> dict[int, list[EngineCoreOutput]]:
        """Outputs by the frontend that sent their request (the book updated as they go)."""
        per: dict[int, list[EngineCoreOutput]] = {}
        book = self.book
        for o in outputs:
            per.setdefault(book.output(o), []).append(o)
        return per

    def close(self) -> None:
        for fe in self.frontends.values():
            fe.sock.close(linger=200)  # the last message (EngineFailed) may still leave
            os.close(fe.pidfd)
        self.frontends.clear()
        self.by_pidfd.clear()
        self.inp.close(linger=0)
