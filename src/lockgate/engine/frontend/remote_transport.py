"""RemoteTransport: the API process's link to an engine core on another machine.

A `CoreHost` (a Ray actor, `lifecycle/ray_replica.py`; anything with its four methods) starts
the core on its node in bind mode (`python -m lockgate.engine.core --bind HOST`): the core
binds input, output, KV-event and KV-replay sockets on TCP as CurveZMQ servers and the host
reports where (`RemoteCoreInfo`). This process then connects as the CURVE client (the
cluster's client key, `engine/curve.py`): the same PUSH/PULL pair and msgspec messages as a
local core, encrypted, and refused to anyone without the key.

The supervisor sees the core as a `RemoteCore`: `wait()` returns when the host says the core
exited, or when the host itself is gone (a dead actor or node: the core died with it), so a
remote death is the same event as a local one (`EngineDeadError` for the requests in flight,
then a restart through the host: a new generation, new ports, possibly a new node).

Each generation's timings (seconds, each measured on one machine's clock): `start_call_s`
(this process: asking the host until it answered, which includes placing and starting the
actor when it had to), what the host reports (`placement_s`, `actor_start_s`,
`process_start_s`: the core process from exec to its sockets bound, on its node), `load_s`
(this process: from the addresses to `Ready`: the model load) and `total_s`.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Protocol

import msgspec
import zmq

from lockgate.engine.config import EngineConfig
from lockgate.engine.curve import CurveClient
from lockgate.engine.frontend.transport import CoreLink, CoreProcess
from lockgate.engine.messages import Ready

log = logging.getLogger("lockgate.engine.client")

LOST = -9  # the exit status of a core whose host died: it was killed with it (PR_SET_PDEATHSIG)


class RemoteCoreInfo(msgspec.Struct, forbid_unknown_fields=True):
    """What a host says about a core it started: where it runs and listens, and how long it took."""

    node: str
    pid: int
    input: str
    output: str
    kv_events: str | None = None  # None: prefix caching off (no KV events)
    kv_replay: str | None = None
    timings: dict[str, float] = msgspec.field(default_factory=dict)


class CoreHost(Protocol):
    """Starts, watches and stops one replica's core somewhere else."""

    curve: CurveClient  # what this process presents to the cores it starts

    async def start_core(self, config: EngineConfig, generation: int) -> RemoteCoreInfo:
        """Start a core (stopping one this host still runs) and say where it listens; raises
        (EngineStartError where it can say why) when it cannot."""
        ...

    async def wait_core(self, generation: int) -> int:
        """The core's exit status once it has exited; negative for a signal, and when the host
        itself died (the core went with it)."""
        ...

    def kill_core(self, generation: int) -> None:
        """SIGKILL the core (no wait)."""
        ...

    async def close(self) -> None:
        """Stop the host and give back what it holds (the core is already stopped)."""
        ...


class RemoteCore:
    """A core on another machine, as the supervisor sees a process (`transport.CoreProcess`)."""

    def __init__(self, host: CoreHost, generation: int, pid: int) -> None:
        self._host = host
        self.generation = generation
        self.pid = pid  # on its own machine
        self.returncode: int | None = None
        self._waiter: asyncio.Future[int] | None = None

    async def wait(self) -> int:
        if self.returncode is None:
            if self._waiter is None:  # one call to the host, however many wait (a waiter may be cancelled)
                self._waiter = asyncio.ensure_future(self._host.wait_core(self.generation))
            try:
                rc = await asyncio.shield(self._waiter)
            except Exception as exc:  # noqa: BLE001 - a host that cannot answer has lost its core
                log.error("lost track of engine core %s (generation %d): %s", self.pid, self.generation, exc)
                rc = LOST
            self.returncode = rc
        return self.returncode

    def kill(self) -> None:
        self._host.kill_core(self.generation)


class RemoteTransport(CoreLink):
    def __init__(self, host: CoreHost) -> None:
        super().__init__()
        self.host = host
        self._kv: tuple[str, str] = ("", "")  # the latest core's, once it is started
        self._addresses_at = 0.0

    @property
    def kv_event_addresses(self) -> tuple[str, str]:
        """The latest core's (PUB, replay) addresses: each generation listens on new ports; ("", "")
        before the first core, and without KV events."""
        return self._kv

    @property
    def kv_event_curve(self) -> CurveClient:
        return self.host.curve

    async def spawn(self, config: EngineConfig) -> RemoteCore:
        """Have the host start a core, then connect to it (it is not ready yet: `await_ready`)."""
        self._spawned_at = time.monotonic()
        self.generation += 1
        info = await self.host.start_core(config, self.generation)
        self._addresses_at = time.monotonic()
        self.timings = {"start_call_s": self._addresses_at - self._spawned_at, **info.timings}
        self.node = info.node
        self._kv = (info.kv_events or "", info.kv_replay or "")
        curve = self.host.curve
        # The core binds, this side connects: messages sent before the handshake wait in the PUSH
        # socket's pipe, as they would on a local core's bound one.
        self.open_sockets()
        for sock, addr in ((self._in, info.input), (self._out, info.output)):
            if addr.startswith("tcp://["):
                sock.setsockopt(zmq.IPV6, 1)
            curve.apply(sock)
            sock.connect(addr)
        self.proc = RemoteCore(self.host, self.generation, info.pid)
        return self.proc

    async def await_ready(self, proc: CoreProcess, timeout_s: float) -> Ready:
        ready = await super().await_ready(proc, timeout_s)
        self.timings["load_s"] = time.monotonic() - self._addresses_at
        return ready

    async def close(self, timeout_s: float) -> None:
        try:
            await super().close(timeout_s)
        finally:
            await self.host.close()
