"""AsyncEngineClient: the API process's side of the engine, over ZeroMQ.

It mirrors `LLMEngine` across a process boundary: inputs are tokenized and
validated here (`InputProcessor`), the engine-core process (`core/proc.py`) only
sees token ids, and its token deltas are detokenized and matched against stop
strings here (`OutputProcessor`), off the engine's hot loop. Each request's
outputs go to its `RequestStream` (`stream.py`).

The sockets and the core process are `CoreTransport`'s (`transport.py`), or a given
transport's (`remote_transport.py`: a core on another machine); a core that dies or
stalls (`watchdog.py`) is restarted by the `Supervisor` (`supervisor.py`), after this
client has failed every in-flight request.

Several API workers on one core (`--api-workers N`): the primary worker's client `share`s its
cores (they bind an attach socket; its watchdog also counts the other workers' requests, and
it stops a core only once they have detached); the others' clients attach to them
(`attached_transport.py`). Each core's messages then carry the other workers' load
(`PeerLoad`): into the shared `QueueView` (admission) and `peers` (the router, the autoscaler).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import zmq

from lockgate.engine.config import EngineConfig, ModelConfig, checkpoint_load_format
from lockgate.engine.curve import CurveClient
from lockgate.engine.errors import EngineDeadError, EngineUnavailableError, RequestRejectedError
from lockgate.engine.frontend.input_processor import InputProcessor
from lockgate.engine.frontend.output_processor import OutputProcessor
from lockgate.engine.frontend.queue_view import QueueView
from lockgate.engine.frontend.stream import RequestStream, stalls
from lockgate.engine.frontend.supervisor import CoreCounters, EngineState, Supervisor
from lockgate.engine.frontend.transport import CoreLink, CoreTransport
from lockgate.engine.frontend.watchdog import StallWatchdog
from lockgate.engine.messages import (
    AbortRequests,
    AddRequests,
    EngineFailed,
    EngineStats,
    PeerLoad,
    RequestFailed,
    StepOutputs,
)
from lockgate.engine.outputs import RequestOutput
from lockgate.engine.sampling_params import SamplingParams
from lockgate.engine.tokenizer import Tokenizer

log = logging.getLogger("lockgate.engine.client")


class AsyncEngineClient:
    def __init__(
        self,
        config: EngineConfig,
        *,
        startup_timeout_s: float = 600.0,
        auto_restart: bool = True,
        max_restart_backoff_s: float = 30.0,
        stall_timeout_s: float | None = 60.0,
        queue: QueueView | None = None,
        transport: CoreLink | None = None,
    ) -> None:
        """`transport`: how cores are started and reached (default: local processes over IPC)."""
        self.config = config
        self.startup_timeout_s = startup_timeout_s
        self.tokenizer: Tokenizer | None = None
        self.model_config: ModelConfig | None = None
        self.max_model_len = 0
        self.quantization: str | None = None  # the weight precision the core runs, once it is ready
        self.engine_pid: int | None = None

        self._core = transport if transport is not None else CoreTransport()
        self._supervisor = Supervisor(self._core, restart=self._spawn, core_died=self._on_engine_death,
                                      is_closing=lambda: self._closing, auto_restart=auto_restart,
                                      max_restart_backoff_s=max_restart_backoff_s)
        self._reader: asyncio.Task[None] | None = None
        self._supervisor_task: asyncio.Task[None] | None = None
        self._ckpt_task: asyncio.Future[Any] | None = None
        self._healthy = False
        self._closing = False
        self._stopping = False  # shutdown called (it may first wait for other API workers to detach)
        self._counters = CoreCounters()  # cumulative counters survive restarts
        self._input: InputProcessor | None = None
        self._output: OutputProcessor | None = None
        self._streams: dict[str, RequestStream] = {}
        # Shared cores (--api-workers): the other workers' load in the current core, as it last said.
        self.peers: PeerLoad | None = None
        self._detach_wait_s = 0.0  # sharing: how long shutdown waits for the other workers to detach
        # Accepted requests with no output yet, per priority, and their drain rate; the replicas of one
        # model version share one (admission control sees the version's queue).
        self.queue = queue if queue is not None else QueueView()
        # Stall watchdog (0 or None: off). Inactive while no core is up; never fires on an idle core.
        self._watchdog = StallWatchdog(
            stall_timeout_s, is_active=lambda: self.healthy, has_pending=self._has_pending,
            on_stall=self._on_stall)
        self._watchdog_task: asyncio.Task[None] | None = None
        self._last_message_at = time.monotonic()

    # ---- supervision, as the server and its metrics see it -------------------------------
    @property
    def auto_restart(self) -> bool:
        return self._supervisor.auto_restart

    @property
    def max_restart_backoff_s(self) -> float:
        return self._supervisor.max_restart_backoff_s

    @property
    def num_restarts(self) -> int:
        return self._supervisor.num_restarts

    @property
    def num_stalls(self) -> int:
        return self._supervisor.num_stalls

    @property
    def on_restart(self) -> Callable[[], None] | None:
        """Called after each successful restart (e.g. a metrics counter)."""
        return self._supervisor.on_restart

    @on_restart.setter
    def on_restart(self, hook: Callable[[], None] | None) -> None:
        self._supervisor.on_restart = hook

    # ---- several API workers on one core -------------------------------------------------
    def share(self, detach_wait_s: float) -> None:
        """Let the server's other API workers attach to this client's cores (before `start`); on
        shutdown, wait up to `detach_wait_s` for them to detach before stopping a core."""
        if not isinstance(self._core, CoreTransport):
            raise ValueError("only local engine cores can be shared by several API workers")
        self._core.attachable = True
        self._detach_wait_s = detach_wait_s

    @property
    def attached(self) -> bool:
        """This client serves through a core another API worker started (attached_transport.py)."""
        return self._core.frontend_id != 0

    @property
    def attach_address(self) -> str | None:
        """Where the other API workers attach to the current core (None: not shared, or none yet)."""
        return self._core.attach_address

    @property
    def core_generation(self) -> int:
        """1 for the first core, +1 per restart (attached: per core attached to)."""
        return self._core.generation

    @property
    def peer_in_flight(self) -> int:
        """The other workers' requests in the current core (0 without shared cores)."""
        p = self.peers
        return p.in_flight if p is not None else 0

    def _has_pending(self) -> bool:
        """Work in the core, for the stall watchdog: ours, or another worker's."""
        return bool(self._streams) or self.peer_in_flight > 0

    async def _wait_detached(self) -> None:
        """Sharing: the other workers drain too; stop the core under them only once they have left."""
        deadline = time.monotonic() + self._detach_wait_s
        while (self.healthy and self.peers is not None and self.peers.frontends > 0
               and time.monotonic() < deadline):
            await asyncio.sleep(0.05)
        if self.healthy and self.peers is not None and self.peers.frontends > 0:
            log.warning("engine core %s: %d API worker(s) still attached after %.0f s; stopping it anyway",
                        self.engine_pid, self.peers.frontends, self._detach_wait_s)

    # ---- life cycle ------------------------------------------------------------------
    async def start(self, checkpoint: asyncio.Future[Any] | None = None) -> None:
        """Load the tokenizer here, start the core, and wait until it reports ready.

        `checkpoint`: a load of this checkpoint's tokenizer and config already under way, shared by
        several engines (the replicas of one version): awaited, never cancelled, here."""
        from lockgate.engine.loader import load_checkpoint  # weights are lazy: cheap here

        # Tokenizer here and model in the core load in parallel; unless the caller set them (another
        # engine of the same checkpoint shares its own: loading holds the GIL for seconds).
        if self.tokenizer is None or self.model_config is None:
            self.tokenizer = None
            self._ckpt_task = asyncio.shield(checkpoint) if checkpoint is not None else asyncio.ensure_future(
                asyncio.to_thread(load_checkpoint, self.config.model, checkpoint_load_format(self.config.load_format)))
        try:
            await self._spawn()
        finally:
            if self._ckpt_task is not None and not self._ckpt_task.done():
                self._ckpt_task.cancel()
        self._supervisor_task = asyncio.create_task(self._supervisor.run(), name="engine-supervisor")
        if self._watchdog.enabled:
            self._watchdog_task = asyncio.create_task(self._watchdog.run(), name="engine-watchdog")

    @property
    def healthy(self) -> bool:
        return self._healthy and not self._closing

    @property
    def core_pid(self) -> int | None:
        """The engine-core process, from its spawn on (`engine_pid` is set only once it is ready)."""
        proc = self._core.proc
        return proc.pid if proc is not None else None

    @property
    def kv_event_addresses(self) -> tuple[str, str]:
        """Where the core publishes its KV-cache events: (PUB, replay) addresses (a local client's are the
        same for every core; a remote core's change with each restart, and are ("", "") before it starts)."""
        return self._core.kv_event_addresses

    @property
    def kv_event_curve(self) -> CurveClient | None:
        """The keys a subscriber to a remote core's KV events needs (None: a local core)."""
        return self._core.kv_event_curve

    @property
    def core_node(self) -> str | None:
        """The machine the core runs on (a remote core's node address; None: this machine)."""
        return self._core.node

    @property
    def core_timings(self) -> dict[str, float]:
        """How long the latest core took to start, by phase, in seconds (transport.py, remote_transport.py)."""
        return self._core.timings

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the core (Shutdown message, then SIGKILL after `timeout_s`) and clean up."""
        if self._closing or self._stopping:
            return
        self._stopping = True
        if self._detach_wait_s > 0:
            await self._wait_detached()
        self._closing = True
        self._healthy = False
        for task in (self._supervisor_task, self._reader, self._watchdog_task):
            if task is not None:
                task.cancel()
        self.fail_all(EngineUnavailableError("the server is shutting down"))
        self.queue.drop_peers(self)
        await self._core.close(timeout_s)

    # ---- requests --------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        *,
        prompt_text: str | None = None,
        priority: int = 0,
        cache_salt: str | None = None,
        arrival_time: float | None = None,
        tenant: str = "",
        tenant_weight: float = 1.0,
    ) -> RequestStream:
        """Validate and submit a request; returns its stream of `RequestOutput`s.

        Synchronous on purpose: admission checks and submission happen without an
        await in between, so concurrent requests cannot overshoot a queue bound.
        Raises ValueError on bad input and EngineUnavailableError when no core is up.
        """
        if not self.healthy or self._input is None or self._output is None:
            raise EngineUnavailableError("the engine is not available (starting or restarting)")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        reqs = self._input.process(request_id, prompt, params, priority=priority, cache_salt=cache_salt,
                                   arrival_time=arrival_time, tenant=tenant, tenant_weight=tenant_weight)
        # Encode before anything is registered: a value the wire cannot carry (an
        # integer past 64 bits) is a bad request, not a leaked queue slot.
        try:
            payload = self._core.encode(AddRequests(reqs, self._core.frontend_id))
        except (OverflowError, TypeError, msgspec.EncodeError) as exc:
            raise ValueError(f"request cannot be encoded for the engine: {exc}") from None
        first = reqs[0]
        text = prompt if isinstance(prompt, str) else prompt_text
        stream = RequestStream(request_id, len(reqs), len(first.prompt_token_ids) * len(reqs), self._release)
        cfg = self.config
        if cfg.load_format == "fake" and cfg.fake_stall_fraction > 0 and stalls(request_id, cfg.fake_stall_fraction):
            stream.hold_until = time.monotonic() + cfg.fake_stall_s  # a stalled replica, as the reader sees it
        # From here on, any failure releases what was registered (one place: _release).
        self._streams[request_id] = stream
        self.queue.add(request_id, priority, stream.num_children, stream.queued_tokens)
        try:
            # The caller's params (with n): the children's carry n=1 and per-child seeds.
            self._output.add_request(request_id, text, first.prompt_token_ids, params)
            self._core.send_raw(payload)
        except zmq.ZMQError as exc:
            self._release(stream)
            raise EngineUnavailableError(f"could not reach the engine: {exc}") from exc
        except BaseException:
            self._release(stream)
            raise
        return stream

    async def generate(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                       **kwargs: object) -> AsyncIterator[RequestOutput]:
        """Async iterator of incremental outputs; leaving the loop early aborts the request."""
        stream = self.add_request(request_id, prompt, params, **kwargs)  # type: ignore[arg-type]
        try:
            async for out in stream:
                yield out
        finally:
            stream.abort()

    def abort(self, request_id: str) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.abort()

    def _release(self, stream: RequestStream) -> None:
        """Called once per stream when it ends for any reason: drop state, abort in the core."""
        if self._streams.pop(stream.request_id, None) is None:
            return
        if stream.queued:
            stream.queued = False
            self.queue.leave(stream.request_id, served=False)
        if stream.finished_normally or self._output is None:
            return
        child_ids = self._output.abort(stream.request_id)
        if child_ids and self.healthy:
            with contextlib.suppress(zmq.ZMQError):
                self._core.send(AbortRequests(child_ids, self._core.frontend_id))

    # ---- state -----------------------------------------------------------------------
    def state(self) -> EngineState:
        return self._counters.state(healthy=self.healthy, queue=self.queue, num_in_flight=len(self._streams),
                                    num_restarts=self.num_restarts, num_stalls=self.num_stalls)

    @property
    def core_stats(self) -> EngineStats:
        """The current core's latest stats (gauges lag by at most one step); cheap, for the router."""
        return self._counters.stats

    @property
    def last_message_at(self) -> float:
        """When the current core last sent anything (monotonic; its start before the first message):
        a core always talks (heartbeats), so a long silence means stopped or stuck."""
        return self._last_message_at

    @property
    def num_pending(self) -> int:
        """Requests in flight on this core."""
        return len(self._streams)

    # ---- the core process --------------------------------------------------------------
    async def _spawn(self) -> None:
        """Start a core and wait until it is ready; then accept requests (also the supervisor's restart)."""
        proc = await self._core.spawn(self.config)
        try:
            ready = await self._core.await_ready(proc, self.startup_timeout_s)
            if self.tokenizer is None:
                ckpt = await self._ckpt_task
                self.tokenizer, self.model_config = ckpt.tokenizer, ckpt.config
        except BaseException:
            await self._core.discard(proc)
            raise
        self.engine_pid = ready.pid
        self.max_model_len = ready.max_model_len
        self.quantization = ready.quantization
        self._counters.stats = ready.stats
        assert self.tokenizer is not None and self.model_config is not None
        self._input = InputProcessor(self.tokenizer, self.model_config, ready.max_model_len,
                                     self.config.max_logprobs)
        self._output = OutputProcessor(self.tokenizer, clock_offset=ready.clock_offset)
        self._reader = asyncio.create_task(self._read_outputs(), name="engine-output-reader")
        self._watchdog.progress()
        self._last_message_at = time.monotonic()
        self._healthy = True
        log.info("engine core ready (pid %d, max_model_len %d, %d KV blocks)",
                 ready.pid, ready.max_model_len, ready.num_total_blocks)

    def _on_engine_death(self, error: EngineDeadError) -> None:
        """The core died or stalled: fail every in-flight request with `error`, drop the core's state."""
        self._healthy = False  # first: released streams must not send aborts to a dead or stuck core
        self._counters.core_died()
        self.peers = None
        self.queue.drop_peers(self)
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        self.fail_all(error)
        self._input = self._output = None
        self._core.close_sockets()

    def _on_stall(self, stalled_s: float) -> None:
        """The watchdog's verdict: the supervisor fails in-flight requests and kills the core."""
        self._supervisor.stalled(stalled_s, len(self._streams), self._watchdog.timeout_s or 0.0)

    def fail_all(self, exc: Exception) -> None:
        """End every in-flight request with `exc` (engine death, drain timeout)."""
        for stream in list(self._streams.values()):
            stream.fail(exc)

    # ---- outputs -----------------------------------------------------------------------
    async def _read_outputs(self) -> None:
        sock, decode = self._core.output_socket, self._core.decode
        while True:
            data = await sock.recv()
            self._watchdog.progress()
            self._last_message_at = time.monotonic()
            try:
                msg = decode(data)
            except msgspec.DecodeError:
                log.exception("undecodable message from the engine core; ignored")
                continue
            if isinstance(msg, StepOutputs):
                self._counters.stats = msg.stats
                if msg.peers is not None:
                    self.peers = msg.peers
                    self.queue.set_peers(self, msg.peers)
                if msg.outputs:
                    self._dispatch(msg)
            elif isinstance(msg, RequestFailed):
                self._fail_child(msg)
            elif isinstance(msg, EngineFailed):
                # The core is exiting; fail now rather than when the process is reaped.
                log.error("engine core reported a fatal error: %s", msg.message)
                self._healthy = False
                self.fail_all(EngineDeadError(f"the engine failed: {msg.message}"))

    def _dispatch(self, msg: StepOutputs) -> None:
        assert self._output is not None
        try:
            results, to_abort = self._output.process(msg.outputs, msg.timestamp)
        except Exception:  # noqa: BLE001 - a frontend bug must not kill the reader for everyone
            log.exception("output processing failed; failing the affected requests")
            parents = {self._parent_of(o.request_id) for o in msg.outputs}
            for rid in parents:
                stream = self._streams.get(rid)
                if stream is not None:
                    stream.fail(EngineDeadError("internal error while processing the engine's output"))
            return
        if to_abort:
            with contextlib.suppress(zmq.ZMQError):
                self._core.send(AbortRequests(to_abort, self._core.frontend_id))
        for out in results:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if stream.queued:
                stream.queued = False
                self.queue.leave(stream.request_id, served=True)
            stream.put(out)

    def _parent_of(self, child_id: str) -> str:
        if child_id in self._streams:
            return child_id
        return child_id.rsplit("#", 1)[0]

    def _fail_child(self, msg: RequestFailed) -> None:
        stream = self._streams.get(self._parent_of(msg.request_id))
        if stream is not None:
            stream.fail(RequestRejectedError(msg.message))  # _release aborts the siblings

