"""CoreTransport: the API process's end of the link to an engine-core process.

It starts the core as `python -m lockgate.engine.core` with two private IPC
sockets (a PUSH for requests, a PULL for outputs, bound here in a 0700
temporary directory, new ones per core), waits for the core's `Ready`, and
encodes and decodes the wire messages (`messages.py`). Each restart is a new
generation: fresh sockets, a fresh process.

Every core also publishes its KV-cache events (`engine/kv_events.py`) on two fixed
addresses in the same directory, `kv-events` (PUB) and `kv-replay` (ROUTER), the same
for every generation: a restarted core binds them again (replacing the socket files a
killed one left), and subscribers (`kv_events_sub.py`) reconnect by themselves.

What every way of starting a core shares is `CoreLink` (the two sockets, the messages,
waiting for `Ready`, stopping); a core on another machine is `remote_transport.py`'s, one that
another API worker of the same server started is `attached_transport.py`'s. The supervisor
sees any core as a `CoreProcess` (pid, returncode, wait, kill).

`attachable` (`--api-workers N`, set before the first spawn): each core also binds an attach
socket (`attach-GEN` in the same directory) where the server's other API workers attach.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import sys
import tempfile
import time
from typing import Protocol

import msgspec
import zmq
import zmq.asyncio

from lockgate.engine.config import EngineConfig
from lockgate.engine.curve import CurveClient
from lockgate.engine.errors import EngineStartError
from lockgate.engine.messages import CoreMessage, EngineFailed, Ready, Shutdown, encode_config

log = logging.getLogger("lockgate.engine.client")


class CoreProcess(Protocol):
    """An engine-core process as its supervisor sees it (an `asyncio.subprocess.Process` is one)."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int: ...

    def kill(self) -> None: ...


class CoreLink:
    """One core at a time, however it was started: its two sockets, the wire messages, its
    start-up (`await_ready`) and its end (`discard`, `close`). Subclasses start the core."""

    def __init__(self) -> None:
        self._ctx = zmq.asyncio.Context()
        self.generation = 0  # 1 for the first core, +1 per restart
        self.proc: CoreProcess | None = None  # the latest core, from its spawn on
        self.node: str | None = None  # the machine the core runs on (None: this one)
        # Seconds the latest core took to start, by phase (durations: each from one clock).
        self.timings: dict[str, float] = {}
        self._spawned_at = 0.0
        self._in: zmq.Socket | None = None  # PUSH, used synchronously (aborts from finally blocks)
        self._out: zmq.asyncio.Socket | None = None  # PULL
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(CoreMessage)
        self.frontend_id = 0  # this process's id in the core's messages (0: the core's starter)

    # ---- messages ----------------------------------------------------------------------
    def encode(self, msg: object) -> bytes:
        return self._encoder.encode(msg)

    def decode(self, data: bytes) -> CoreMessage:
        return self._decoder.decode(data)

    def send(self, msg: object) -> None:
        self.send_raw(self._encoder.encode(msg))

    def send_raw(self, payload: bytes) -> None:
        if self._in is None:
            raise zmq.ZMQError(zmq.ENOTCONN, "engine socket closed")
        # NOBLOCK: with the core gone a PUSH socket has no peer and would block forever.
        self._in.send(payload, flags=zmq.NOBLOCK, copy=False)

    @property
    def output_socket(self) -> zmq.asyncio.Socket:
        """The current core's output socket (a reader keeps the one it started on)."""
        assert self._out is not None
        return self._out

    @property
    def kv_event_addresses(self) -> tuple[str, str]:
        """(PUB, replay ROUTER) addresses of the core's KV-cache events."""
        raise NotImplementedError

    @property
    def kv_event_curve(self) -> CurveClient | None:
        """The CURVE keys a subscriber to those addresses needs (None: local IPC, none)."""
        return None

    @property
    def attach_address(self) -> str | None:
        """Where the server's other API workers attach to the current core (None: not shared)."""
        return None

    # ---- the process -------------------------------------------------------------------
    async def spawn(self, config: EngineConfig) -> CoreProcess:
        """Start a core with fresh sockets (it is not ready yet: `await_ready`)."""
        raise NotImplementedError

    async def await_ready(self, proc: CoreProcess, timeout_s: float) -> Ready:
        """The core's `Ready`; EngineStartError if it fails, exits or takes longer than `timeout_s`."""
        assert self._out is not None
        exited = asyncio.ensure_future(proc.wait())
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                recv = asyncio.ensure_future(self._out.recv())
                left = deadline - time.monotonic()
                done, _ = await asyncio.wait({recv, exited}, timeout=max(left, 0),
                                             return_when=asyncio.FIRST_COMPLETED)
                if recv not in done:
                    recv.cancel()
                    if exited in done:
                        raise EngineStartError(f"engine core exited during start-up (exit code {proc.returncode})")
                    raise EngineStartError(f"engine core not ready after {timeout_s:.0f} s")
                msg = self._decoder.decode(recv.result())
                if isinstance(msg, Ready):
                    self.timings["total_s"] = time.monotonic() - self._spawned_at
                    # The core's own account: its imports, then the model's load (weights, KV cache).
                    self.timings["core_imports_s"], self.timings["model_load_s"] = msg.started_s, msg.load_s
                    return msg
                if isinstance(msg, EngineFailed):
                    raise EngineStartError(msg.message)
        finally:
            exited.cancel()

    async def discard(self, proc: CoreProcess) -> None:
        """A core that failed to start: kill it if it still runs, and drop its sockets."""
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        self.close_sockets()

    def open_sockets(self) -> None:
        """The pair every transport uses: PUSH requests in (a plain sync socket: sends never wait on
        the loop), PULL outputs out; no high-water mark (the queue bounds live above), no linger."""
        self._in = self._ctx.socket(zmq.PUSH, socket_class=zmq.Socket)
        self._in.setsockopt(zmq.SNDHWM, 0)
        self._in.setsockopt(zmq.LINGER, 0)
        self._out = self._ctx.socket(zmq.PULL)
        self._out.setsockopt(zmq.RCVHWM, 0)
        self._out.setsockopt(zmq.LINGER, 0)

    def close_sockets(self) -> None:
        for sock in (self._in, self._out):
            if sock is not None:
                sock.close(linger=0)
        self._in = self._out = None

    async def close(self, timeout_s: float) -> None:
        """Stop the core (Shutdown message, then SIGKILL after `timeout_s`) and clean up."""
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(zmq.ZMQError):
                self.send(Shutdown())
            try:
                await asyncio.wait_for(proc.wait(), timeout_s)
            except TimeoutError:
                log.warning("engine core did not stop within %.0f s; killing it", timeout_s)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        self.close_sockets()
        self._ctx.term()


class CoreTransport(CoreLink):
    """A core on this machine: a child process on private IPC sockets this process binds."""

    def __init__(self) -> None:
        super().__init__()
        self._tmpdir = tempfile.mkdtemp(prefix="lockgate-engine-")  # 0700: private IPC sockets
        self._kv_events_addr = f"ipc://{self._tmpdir}/kv-events"
        self._kv_replay_addr = f"ipc://{self._tmpdir}/kv-replay"
        self.attachable = False  # shared by several API workers (--api-workers): cores bind an attach socket

    @property
    def kv_event_addresses(self) -> tuple[str, str]:
        """(PUB, replay ROUTER) addresses of every core's KV-cache events, fixed for this transport."""
        return self._kv_events_addr, self._kv_replay_addr

    @property
    def attach_address(self) -> str | None:
        if not self.attachable or self.generation == 0:
            return None
        return f"ipc://{self._tmpdir}/attach-{self.generation}"

    async def spawn(self, config: EngineConfig) -> asyncio.subprocess.Process:
        """Bind fresh sockets and start a core on them (it is not ready yet: `await_ready`)."""
        self._spawned_at = time.monotonic()
        self.generation += 1
        in_addr = f"ipc://{self._tmpdir}/in-{self.generation}"
        out_addr = f"ipc://{self._tmpdir}/out-{self.generation}"
        self.open_sockets()
        self._in.bind(in_addr)
        self._out.bind(out_addr)
        attach = ["--attach", self.attach_address] if self.attachable else []
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "lockgate.engine.core",
                "--input", in_addr, "--output", out_addr, "--config", encode_config(config).decode(),
                "--generation", str(self.generation),
                "--kv-events", self._kv_events_addr, "--kv-replay", self._kv_replay_addr, *attach,
            )
        except OSError:
            self.close_sockets()
            raise
        self.proc = proc
        return proc

    async def close(self, timeout_s: float) -> None:
        await super().close(timeout_s)
        shutil.rmtree(self._tmpdir, ignore_errors=True)
