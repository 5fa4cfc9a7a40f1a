"""AttachedTransport: this API worker's link to an engine core that another worker of the same
server started and supervises (`lockgate serve --api-workers N`).

The primary worker starts every core (`transport.CoreTransport`, attachable) and publishes where
each one listens (`CoreAddress`, through the server's topology, `server/topology.py`). Here,
`spawn` waits for the replica's current core (a newer one after a death: `locate`), connects a
PUSH socket to its attach socket, binds a PULL socket of its own for the outputs (a private IPC
directory) and sends `Attach`; `await_ready` (CoreLink's) then gets the core's `Ready`. The whole
client runs on top unchanged (input/output processing, streams, the supervisor): the core's death,
seen through a pidfd on its process, fails this worker's in-flight requests as it does the
primary's, and the "restart" waits for the primary's new core and attaches to it.

This process never starts, kills or stops a core: `close` detaches (the core aborts whatever this
worker left running, and also notices when this process exits without a word).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable

import msgspec
import zmq

from lockgate.engine.config import EngineConfig
from lockgate.engine.errors import EngineStartError
from lockgate.engine.frontend.transport import CoreLink, CoreProcess
from lockgate.engine.messages import Attach, Detach, Ready

log = logging.getLogger("lockgate.engine.client")


class CoreAddress(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where one running core of the primary worker listens, as the server's topology lists it."""

    pid: int
    generation: int  # the primary's count for this replica (1, then +1 per restart)
    attach: str
    kv_events: str = ""
    kv_replay: str = ""


# The replica's current core, up: not `dead` (the one this worker saw die; None at first). Waits
# until there is one; cancelled when the replica goes away.
Locate = Callable[[CoreAddress | None], Awaitable[CoreAddress]]


class AttachedCore:
    """A core another process started, as the supervisor sees a process (`transport.CoreProcess`):
    its exit comes from a pidfd; its status is its starter's to know."""

    exit_description = "ended (its exit status is the primary worker's to see)"

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self._pidfd: int | None = os.pidfd_open(pid)  # ProcessLookupError: gone already
        self._exited: asyncio.Future[None] | None = None

    async def wait(self) -> int:
        if self.returncode is None:
            if self._exited is None:
                self._exited = self._watch()
            await asyncio.shield(self._exited)
            self.returncode = -1
        return self.returncode

    def _watch(self) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        fd = self._pidfd
        if fd is None:
            fut.set_result(None)
            return fut

        def readable() -> None:
            loop.remove_reader(fd)
            if not fut.done():
                fut.set_result(None)

        loop.add_reader(fd, readable)
        return fut

    def kill(self) -> None:
        log.warning("engine core %d belongs to the primary API worker: not killing it", self.pid)

    def close(self) -> None:
        fd, self._pidfd = self._pidfd, None
        if fd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)
        if self._exited is not None and not self._exited.done():
            self._exited.set_result(None)


class AttachedTransport(CoreLink):
    def __init__(self, locate: Locate, directory: str | None = None) -> None:
        """`directory`: where this worker's private socket directory goes (the server's run directory,
        which outlives a killed worker's and is removed with the server; default: the temp dir)."""
        super().__init__()
        self._locate = locate
        self._tmpdir = tempfile.mkdtemp(prefix="lockgate-attach-", dir=directory)  # 0700: this worker's output sockets
        self.frontend_id = secrets.randbits(62) + 1  # never 0, the starter's
        self.address: CoreAddress | None = None  # the core attached to (or last attached to)
        self._dead: CoreAddress | None = None

    @property
    def kv_event_addresses(self) -> tuple[str, str]:
        a = self.address
        return (a.kv_events, a.kv_replay) if a is not None else ("", "")

    async def spawn(self, config: EngineConfig) -> AttachedCore:
        """Attach to the replica's current core (a newer one than a core that died under us)."""
        if self.proc is not None and self.proc.returncode is not None:
            self._dead = self.address
        while True:
            address = await self._locate(self._dead)
            self._spawned_at = time.monotonic()
            try:
                core = AttachedCore(address.pid)
            except ProcessLookupError:
                self._dead = address  # it died before we got there: wait for its successor
                continue
            break
        self.generation += 1
        self.address = address
        out_addr = f"ipc://{self._tmpdir}/out-{self.generation}"
        self.open_sockets()
        try:
            self._out.bind(out_addr)
            self._in.connect(address.attach)
            self.send(Attach(frontend=self.frontend_id, output=out_addr, pid=os.getpid()))
        except zmq.ZMQError:
            core.close()
            self.close_sockets()
            raise
        self.proc = core
        return core

    async def await_ready(self, proc: CoreProcess, timeout_s: float) -> Ready:
        ready = await super().await_ready(proc, timeout_s)
        if self.address is not None and ready.pid != self.address.pid:
            raise EngineStartError(f"attached to engine core {ready.pid}, expected {self.address.pid}")
        return ready

    async def discard(self, proc: CoreProcess) -> None:
        """Attaching failed: drop the sockets (the core is not ours to kill)."""
        if isinstance(proc, AttachedCore):
            proc.close()
        self.close_sockets()

    async def close(self, timeout_s: float) -> None:
        """Detach (never stop the core) and clean up."""
        if self._in is not None:
            with contextlib.suppress(zmq.ZMQError):
                self.send(Detach(frontend=self.frontend_id))
            self._in.close(linger=100)  # let the Detach leave
            self._in = None
        self.close_sockets()
        if isinstance(self.proc, AttachedCore):
            self.proc.close()
        self._ctx.term()
        shutil.rmtree(self._tmpdir, ignore_errors=True)
