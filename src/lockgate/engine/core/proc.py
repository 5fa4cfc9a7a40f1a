"""The engine-core process's loop (`CoreLoop`, `main`): `EngineCore` behind two ZeroMQ sockets.

    API process ──PUSH──▶ [input]  core loop  [output] ──PUSH──▶ API process

The loop drains every pending input message between steps (a non-blocking
poll), so an abort lands before the next step and its KV blocks are freed at
once; when no request is unfinished it blocks on the input socket instead of
spinning. While busy it also sends a heartbeat at least every `BUSY_HEARTBEAT_S`
(between steps), so the API process's stall watchdog can tell a slow engine
from a stuck one. The API process owns this process's lifetime: it starts it with
`python -m lockgate.engine.core`, stops it with a `Shutdown` message, and the
core exits by itself if its parent disappears.

With `--kv-events ADDR --kv-replay ADDR` (and prefix caching on) the loop also
publishes its KV cache's events (`engine/kv_events.py`, vLLM's schema) after each
step and after handling inputs, and answers replay requests between steps and at
once while idle (it waits on the input and replay sockets together). Its first
batch, seq 0, is `AllBlocksCleared`: a new core's cache starts empty.

Bind mode (`--bind HOST`, a core on another machine: `lifecycle/ray_replica.py` starts it):
the core binds all four sockets on TCP at HOST (free ports) as CurveZMQ servers, with the keys
its starter put in `$LOCKGATE_CURVE_SERVER` (`engine/curve.py`: only the API process's key gets
through, every refused attempt is logged), writes where they listen to `--addresses-fd` as one
JSON line, and the API process connects. Its parent is then the starter (a Ray actor): the core
still exits with it.

Shared mode (`--attach ADDR`, `lockgate serve --api-workers N`): the other API workers of the
server attach to this core on a third socket (`frontends.py`): each gets its own requests'
outputs and the core's stats, with the other frontends' load (`PeerLoad`) so every worker's
admission and router see the whole server's queue. Only the starter may stop the core.
"""
from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import time
import traceback
from typing import TYPE_CHECKING

import msgspec
import zmq

from lockgate.engine.config import EngineConfig
from lockgate.engine.core.frontends import PRIMARY, FrontendHub
from lockgate.engine.curve import ENV_VAR, CurveGuard, CurveServer
from lockgate.engine.kv_events import AllBlocksCleared, KVEvent, KVEventPublisher
from lockgate.engine.threads import openmp_env
from lockgate.engine.messages import (
    AbortRequests,
    AddRequests,
    Attach,
    ClientMessage,
    Detach,
    EngineCoreOutput,
    EngineFailed,
    EngineStats,
    Ready,
    RequestFailed,
    Shutdown,
    StepOutputs,
    decode_config,
)

if TYPE_CHECKING:
    from lockgate.engine.core.engine_core import EngineCore

log = logging.getLogger("lockgate.engine.core")
_EXEC_AT = time.monotonic()  # about when this process began: imports done by here are its start-up

# Idle: wake this often to send a heartbeat and check that the parent still lives.
IDLE_POLL_MS = 1000
# Busy: send at least this often (between steps), so the client's stall watchdog sees
# progress even through steps that produce no output (chunked prefill).
BUSY_HEARTBEAT_S = 0.5
# Shared core: a frontend with no outputs in a step hears the load (stats, the other frontends')
# this often, not after every step (each message wakes its event loop).
SHARED_REFRESH_S = 0.02


class CoreLoop:
    def __init__(self, config: EngineConfig, input_addr: str, output_addr: str, generation: int = 1,
                 kv_events_addr: str | None = None, kv_replay_addr: str | None = None, *,
                 curve: CurveServer | None = None, attach_addr: str | None = None) -> None:
        """`curve`: bind mode. The four addresses are `tcp://HOST:*` endpoints this core binds as
        CURVE servers (the API process connects); `addresses` then says where they were bound.
        `attach_addr`: shared mode, where other API processes attach (frontends.py)."""
        self.config = config
        self.generation = generation  # 1 for the first core, +1 per restart
        self.num_steps = 0
        self.ctx = zmq.Context(io_threads=1)
        if curve is not None and input_addr.startswith("tcp://["):
            self.ctx.setsockopt(zmq.IPV6, 1)  # an IPv6 node address: every socket of this core
        self.guard = CurveGuard(self.ctx, curve) if curve is not None else None
        self.inp = self.ctx.socket(zmq.PULL)
        self.out = self.ctx.socket(zmq.PUSH)
        self.out.setsockopt(zmq.LINGER, 2000)  # let the last outputs leave on shutdown
        if self.guard is None:
            self.inp.connect(input_addr)
            self.out.connect(output_addr)
        else:
            for sock, name, addr in ((self.inp, "input", input_addr), (self.out, "output", output_addr)):
                self.guard.protect(sock, name)
                sock.bind(addr)
        self.encoder = msgspec.msgpack.Encoder()
        self.decoder = msgspec.msgpack.Decoder(ClientMessage)
        self.parent_pid = os.getppid()
        self.core = None  # set by start(); loading the model can take a while
        self.ready: Ready | None = None  # what start() told the starter (an attaching frontend gets it too)
        # Shared mode: bound now, so frontends can attach as soon as the starter says the core is up.
        self.hub = FrontendHub(self.ctx, attach_addr, self.encoder) if attach_addr else None
        self._handled_from: set[int] = set()  # shared: the frontends whose messages this iteration handled
        self._sent_at: dict[int, float] = {}  # shared: when each frontend last got a message
        # KV-cache events: bound now, so subscribers (re)connect while the model loads.
        self.kv_pub: KVEventPublisher | None = None
        self.poller: zmq.Poller | None = None
        if kv_events_addr and kv_replay_addr and config.enable_prefix_caching:
            try:
                self.kv_pub = KVEventPublisher(kv_events_addr, kv_replay_addr, snapshot=self._kv_snapshot,
                                               ctx=self.ctx, guard=self.guard)
            except zmq.ZMQError as exc:  # serving matters more than events: go on without them
                log.error("engine core: cannot bind the KV event sockets (%s); no KV events", exc)
        if self.kv_pub is not None or self.hub is not None:
            self.poller = zmq.Poller()
            self.poller.register(self.inp, zmq.POLLIN)
            if self.kv_pub is not None:
                self.poller.register(self.kv_pub.replay_socket, zmq.POLLIN)
            if self.hub is not None:
                self.poller.register(self.hub.inp, zmq.POLLIN)
        if self.guard is not None:
            self.guard.start()

    @property
    def addresses(self) -> dict[str, str | None]:
        """Bind mode: where each socket listens (what the API process connects to)."""
        kv_events, kv_replay = self.kv_pub.endpoints if self.kv_pub is not None else (None, None)
        return {"input": self.inp.last_endpoint.decode(), "output": self.out.last_endpoint.decode(),
                "kv_events": kv_events, "kv_replay": kv_replay}

    def send(self, msg: object) -> None:
        self.out.send(self.encoder.encode(msg), copy=False)

    def send_to(self, owner: int, msg: object) -> None:
        """To the frontend that sent a request: the starter, or an attached one."""
        if owner == PRIMARY or self.hub is None:
            self.send(msg)
        else:
            self.hub.send(owner, msg)

    def fail(self, message: str) -> None:
        """EngineFailed to every frontend: the core is exiting."""
        msg = EngineFailed(message=message)
        self.send(msg)
        if self.hub is not None:
            for fid in list(self.hub.frontends):
                self.hub.send(fid, msg)

    def start(self) -> bool:
        from lockgate.engine.core.engine_core import EngineCore  # heavy for a real model (torch): in the child only

        loading = time.monotonic()
        try:
            self.core = EngineCore(self.config, record_kv_events=self.kv_pub is not None)
        except Exception as exc:  # noqa: BLE001 - any start-up failure is reported, then we exit
            log.exception("engine core failed to start")
            self.fail(f"engine failed to start: {exc}")
            return False
        core = self.core
        if self.kv_pub is not None:
            self.kv_pub.publish([AllBlocksCleared()])  # seq 0: this cache starts empty
        self.ready = Ready(
            pid=os.getpid(), max_model_len=core.max_model_len, model_config=core.model_config,
            num_total_blocks=core.stats().num_total_blocks, block_size=self.config.block_size,
            stats=core.stats(), clock_offset=time.time() - time.monotonic(),
            load_s=time.monotonic() - loading, started_s=loading - _EXEC_AT,
            quantization=getattr(core.runner, "quantization", None) or "none",  # a fake runner has none
        )
        self.send(self.ready)
        return True

    def run(self) -> int:
        core = self.core
        assert core is not None
        last_sent = time.monotonic()
        while True:
            busy = core.has_unfinished_requests()
            # Drain all pending inputs; block (with a heartbeat timeout) only when idle.
            handled = False
            timeout = 0 if busy else IDLE_POLL_MS
            while (sock := self._wait_input(timeout)) is not None:
                timeout = 0
                msg = self.decoder.decode(sock.recv(copy=False))
                own = sock is self.inp
                if isinstance(msg, Shutdown):
                    if own:
                        log.info("engine core: shutdown requested")
                        return 0
                    log.warning("engine core: Shutdown from an attached API process ignored (only its starter "
                                "stops it)")
                    continue
                self.handle(msg, own)
                handled = True
                if self.hub is not None:
                    self._handled_from.add(PRIMARY if own else getattr(msg, "frontend", PRIMARY))
            if os.getppid() != self.parent_pid:
                log.error("engine core: parent process is gone, exiting")
                return 1
            outputs: list[EngineCoreOutput] = []
            if core.has_unfinished_requests():
                self.num_steps += 1
                self._maybe_hang()
                outputs = core.step()
            self._send_failed(core)
            if self.kv_pub is not None:
                self._publish_kv()
                self.kv_pub.serve_replay()
            # After an abort the engine may be idle: still tell the frontend (freed blocks).
            # While busy, a heartbeat every BUSY_HEARTBEAT_S tells the watchdog steps still finish.
            now = time.monotonic()
            if outputs or handled or not busy or now - last_sent >= BUSY_HEARTBEAT_S:
                if self.hub is None:
                    self.send(StepOutputs(outputs=outputs, stats=core.stats(), timestamp=core.last_step_end))
                else:
                    self._send_shared(outputs, core.stats(), core.last_step_end, now, busy)
                last_sent = now

    def _send_failed(self, core: EngineCore) -> None:
        """Requests the core dropped (a grammar that did not compile, or rejected a token): each
        owner hears at once, as for a request refused on arrival."""
        for rid, message in core.take_failed():
            owner = PRIMARY
            if self.hub is not None:
                owner = self.hub.book.owner(rid)
                self.hub.book.removed(rid)
                if owner is None:
                    owner = PRIMARY
            self.send_to(owner, RequestFailed(request_id=rid, message=message))

    def _send_shared(self, outputs: list[EngineCoreOutput], stats: EngineStats, timestamp: float, now: float,
                     busy: bool) -> None:
        """Each frontend its own requests' outputs, the stats, and the other frontends' load: at once
        when it has outputs or sent something, else at most every SHARED_REFRESH_S while busy."""
        hub = self.hub
        assert hub is not None
        per = hub.route(outputs) if outputs else {}
        attached = len(hub.frontends)
        book, handled, sent_at = hub.book, self._handled_from, self._sent_at
        for fid in (PRIMARY, *hub.frontends):
            mine = per.get(fid)
            if not (mine or fid in handled or not busy or now - sent_at.get(fid, 0.0) >= SHARED_REFRESH_S):
                continue
            msg = StepOutputs(outputs=mine or [], stats=stats, timestamp=timestamp,
                              peers=book.peers(fid, attached - (fid != PRIMARY)))
            if fid == PRIMARY:
                self.send(msg)
            else:
                hub.send(fid, msg)
            sent_at[fid] = now
        handled.clear()

    def _wait_input(self, timeout_ms: int) -> zmq.Socket | None:
        """The socket with an input message within `timeout_ms` (the starter's first), or None; replay
        requests that come meanwhile are answered at once (after publishing what the cache has
        pending), and an attached frontend whose process ended is dropped."""
        if self.poller is None:
            return self.inp if self.inp.poll(timeout_ms) else None
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            ready = dict(self.poller.poll(timeout_ms))
            if self.kv_pub is not None and self.kv_pub.replay_socket in ready:
                self._publish_kv()
                self.kv_pub.serve_replay()
            if self.inp in ready:
                return self.inp
            hub = self.hub
            if hub is not None:
                if hub.inp in ready:
                    return hub.inp
                for fd in [fd for fd in ready if isinstance(fd, int) and fd in hub.by_pidfd]:
                    self._frontend_gone(hub.by_pidfd[fd])
            timeout_ms = int((deadline - time.monotonic()) * 1000)
            if timeout_ms <= 0:
                return None

    def _publish_kv(self) -> None:
        assert self.kv_pub is not None and self.core is not None
        events = self.core.kv.take_events()
        if events:
            self.kv_pub.publish(events)

    def _kv_snapshot(self) -> list[KVEvent]:
        return [] if self.core is None else list(self.core.kv.snapshot_events())

    def _maybe_hang(self) -> None:
        """Test only (`EngineConfig.debug_hang_at_step`): the first core hangs forever in that step."""
        hang_at = self.config.debug_hang_at_step
        if hang_at is not None and self.generation == 1 and self.num_steps == hang_at:
            log.warning("engine core: hanging in step %d (debug_hang_at_step, a test option)", hang_at)
            while True:
                time.sleep(1)

    def handle(self, msg: AddRequests | AbortRequests | Attach | Detach, own: bool = True) -> None:
        """One input message; `own`: from the starter's socket (else from an attached frontend)."""
        core = self.core
        hub = self.hub
        if isinstance(msg, (Attach, Detach)):
            if hub is None or own:
                log.warning("engine core: %s on the wrong socket ignored", type(msg).__name__)
            elif isinstance(msg, Attach):
                assert self.ready is not None and self.poller is not None
                stale = hub.attach(msg, msgspec.structs.replace(self.ready, stats=core.stats()), self.poller)
                if stale:
                    core.abort_requests(stale)
            else:
                self._frontend_gone(msg.frontend)
            return
        owner = PRIMARY if own else msg.frontend
        if hub is not None and owner != PRIMARY and owner not in hub.frontends:
            log.warning("engine core: a message from frontend %d, which is not attached, dropped", owner)
            return
        if isinstance(msg, AbortRequests):
            ids = msg.request_ids
            if hub is not None:  # a frontend aborts only its own requests
                ids = [rid for rid in ids if hub.book.owner(rid) == owner]
                for rid in ids:
                    hub.book.removed(rid)
            core.abort_requests(ids)
            return
        for req in msg.requests:
            try:
                core.add_request(req)
            except ValueError as exc:
                self.send_to(owner, RequestFailed(request_id=req.request_id, message=str(exc)))
                continue
            if hub is not None:
                hub.book.added(owner, req)

    def _frontend_gone(self, frontend: int) -> None:
        """An attached frontend detached or exited: abort what it left running."""
        assert self.hub is not None and self.poller is not None
        ids = self.hub.detach(frontend, self.poller)
        self._sent_at.pop(frontend, None)
        if ids and self.core is not None:
            self.core.abort_requests(ids)

    def close(self) -> None:
        if self.hub is not None:
            self.hub.close()
        if self.kv_pub is not None:
            self.kv_pub.close()
        if self.guard is not None:
            self.guard.stop()
        self.inp.close(linger=0)
        self.out.close()
        self.ctx.term()


def _die_with_parent() -> None:
    """Linux: have the kernel SIGKILL us when the parent dies (best effort elsewhere)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _report_addresses(fd: int, addresses: dict[str, str | None]) -> None:
    """Tell the starter where the sockets listen (before the model loads: it connects meanwhile)."""
    with os.fdopen(fd, "wb") as f:
        f.write(msgspec.json.encode(addresses) + b"\n")


def main(argv: list[str] | None = None) -> int:
    openmp_env()  # before torch loads libgomp: its threads sleep soon when idle (engine/threads.py)
    parser = argparse.ArgumentParser(prog="python -m lockgate.engine.core",
                                     description="lockgate engine core (started by the API server)")
    parser.add_argument("--input", help="ZMQ address to receive requests on (connected; not with --bind)")
    parser.add_argument("--output", help="ZMQ address to send outputs to (connected; not with --bind)")
    parser.add_argument("--bind", metavar="HOST", default=None,
                        help="Bind every socket on TCP at this node address instead, as CURVE servers (keys in "
                             f"${ENV_VAR}); where they listen goes to --addresses-fd as one JSON line")
    parser.add_argument("--addresses-fd", type=int, default=None, metavar="FD",
                        help="With --bind: an inherited file descriptor to write the bound addresses to")
    parser.add_argument("--config", required=True, help="EngineConfig as JSON")
    parser.add_argument("--generation", type=int, default=1, help="1 for the first core, +1 per restart")
    parser.add_argument("--kv-events", default=None, metavar="ADDR",
                        help="ZMQ address to publish KV-cache events on (vLLM's schema; with --kv-replay)")
    parser.add_argument("--kv-replay", default=None, metavar="ADDR",
                        help="ZMQ address to answer KV-event replay requests on (with --kv-events)")
    parser.add_argument("--attach", default=None, metavar="ADDR",
                        help="ZMQ address to bind for other API processes of the same server to attach on "
                             "(lockgate serve --api-workers N; not with --bind)")
    args = parser.parse_args(argv)
    if (args.kv_events is None) != (args.kv_replay is None):
        parser.error("--kv-events and --kv-replay go together")
    curve = None
    if args.bind is not None:
        if args.input or args.output or args.kv_events or args.attach or args.addresses_fd is None:
            parser.error("--bind takes --addresses-fd and no --input, --output, --kv-events, --kv-replay or --attach")
        try:
            curve = CurveServer.pop_env()
        except ValueError as exc:
            parser.error(str(exc))
        if curve is None:
            parser.error(f"--bind needs CURVE keys in ${ENV_VAR}: a core on a network never listens in the clear")
        host = f"[{args.bind}]" if ":" in args.bind and not args.bind.startswith("[") else args.bind
        args.input = args.output = args.kv_events = args.kv_replay = f"tcp://{host}:*"
    elif not (args.input and args.output):
        parser.error("--input and --output are required (or --bind)")

    _die_with_parent()
    # Ctrl-C reaches the whole process group, and SIGTERM may too (systemd, containers):
    # the API process decides when we stop, after draining, by sending Shutdown.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=os.environ.get("LOCKGATE_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s [engine] %(message)s")

    loop = CoreLoop(decode_config(args.config), args.input, args.output, args.generation,
                    kv_events_addr=args.kv_events, kv_replay_addr=args.kv_replay, curve=curve,
                    attach_addr=args.attach)
    if args.addresses_fd is not None:
        _report_addresses(args.addresses_fd, loop.addresses)
    rc = 1
    try:
        if loop.start():
            t0 = time.monotonic()
            rc = loop.run()
            log.info("engine core exiting after %.0f s", time.monotonic() - t0)
    except Exception as exc:  # noqa: BLE001 - report, then exit non-zero so the supervisor restarts us
        log.exception("engine core crashed")
        try:
            loop.fail(f"engine core crashed: {type(exc).__name__}: {exc}")
        except zmq.ZMQError:
            traceback.print_exc()
    finally:
        loop.close()
    return rc

