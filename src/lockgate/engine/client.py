"""AsyncEngineClient: the API process's side of the engine, over ZeroMQ.

It mirrors `LLMEngine` across a process boundary: inputs are tokenized and
validated here (`InputProcessor`), the engine-core process (`core.py`) only sees
token ids, and its token deltas are detokenized and matched against stop strings
here (`OutputProcessor`), off the engine's hot loop.

It also supervises the core: when the process dies, every in-flight request
fails at once with `EngineDeadError`, `healthy` turns False, and a new core is
started (with backoff) so later requests work again. A core that is alive but
makes no progress while requests are in flight (`watchdog.py`) is treated the
same way after `stall_timeout_s`: requests fail with `EngineStalledError`, the
core is killed, and the supervisor starts a new one.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import sys
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from lockgate.engine.config import EngineConfig, ModelConfig
from lockgate.engine.messages import (
    AbortRequests,
    AddRequests,
    CoreMessage,
    EngineFailed,
    Ready,
    RequestFailed,
    Shutdown,
    StepOutputs,
    encode_config,
)
from lockgate.engine.output_processor import OutputProcessor
from lockgate.engine.outputs import CompletionOutput, EngineStats, RequestOutput
from lockgate.engine.processor import InputProcessor, child_request_ids
from lockgate.engine.queue_view import QueueView
from lockgate.engine.sampling_params import SamplingParams
from lockgate.engine.step_stats import HistogramCounts
from lockgate.engine.tokenizer import Tokenizer
from lockgate.engine.watchdog import StallWatchdog

log = logging.getLogger("lockgate.engine.client")


class EngineError(RuntimeError):
    """Base of the errors a request sees when the engine cannot serve it."""


class EngineDeadError(EngineError):
    """The engine-core process died (or failed) while the request was in flight."""


class EngineStalledError(EngineDeadError):
    """The engine-core process stopped making progress; it was killed and is being restarted."""


class EngineUnavailableError(EngineError):
    """No engine core is up right now (starting, restarting or shutting down)."""


class EngineStartError(EngineError):
    """The engine-core process could not start (bad model path, out of memory, ...)."""


class RequestRejectedError(ValueError):
    """The core refused a request the frontend had accepted (a limit only it knows)."""


@dataclass(slots=True)
class EngineState:
    """What admission control and /metrics look at. Core numbers lag by at most one step."""

    healthy: bool
    num_running: int
    num_waiting: int
    num_waiting_tokens: int
    kv_cache_usage: float
    num_free_blocks: int
    num_total_blocks: int
    num_preemptions: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    # Frontend view: accepted engine requests (n > 1 counts n) with no output yet, and their prompt tokens.
    num_queued_requests: int
    num_queued_tokens: int
    num_in_flight: int
    num_restarts: int
    num_stalls: int = 0  # cores killed by the stall watchdog (each also counts as a restart)
    # Per-step histograms (step_stats.py buckets), cumulative over every core this client ran.
    step_seconds: HistogramCounts | None = None
    iteration_tokens: HistogramCounts | None = None


def _merge(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """Two successive outputs of one request as one: deltas concatenated, the rest from `b`."""
    by_index: dict[int, CompletionOutput] = {c.index: c for c in a.outputs}
    for c in b.outputs:
        prev = by_index.get(c.index)
        if prev is not None:
            c.delta_text = prev.delta_text + c.delta_text
            c.delta_token_ids = prev.delta_token_ids + c.delta_token_ids
        by_index[c.index] = c
    b.outputs = [by_index[i] for i in sorted(by_index)]
    b.num_cached_tokens = max(a.num_cached_tokens, b.num_cached_tokens)
    return b


class RequestStream:
    """Outputs of one (parent) request as an async iterator.

    When the consumer falls behind (a slow HTTP client), pending outputs are
    merged into one, so a reader always gets everything since its last read
    in a single item and the backlog never grows by one item per step.
    """

    __slots__ = ("request_id", "num_children", "queued_tokens", "queued", "finished_normally",
                 "_pending", "_event", "_done", "_error", "_on_end")

    def __init__(self, request_id: str, num_children: int, queued_tokens: int,
                 on_end: Callable[[RequestStream], None]) -> None:
        self.request_id = request_id
        self.num_children = num_children  # engine requests (n > 1 fans out)
        self.queued_tokens = queued_tokens
        self.queued = True  # no output yet (admission control counts it as waiting)
        self.finished_normally = False
        self._pending: deque[RequestOutput] = deque()
        self._event = asyncio.Event()
        self._done = False
        self._error: BaseException | None = None
        self._on_end = on_end

    @property
    def done(self) -> bool:
        return self._done

    def put(self, out: RequestOutput) -> None:
        if self._done:
            return
        if self._pending:
            self._pending[-1] = _merge(self._pending[-1], out)
        else:
            self._pending.append(out)
        if out.finished:
            self.finished_normally = True
            self._end()
        self._event.set()

    def fail(self, exc: BaseException) -> None:
        """End the stream with an error the consumer sees after any pending outputs."""
        if self._done:
            return
        self._error = exc
        self._end()
        self._event.set()

    def abort(self) -> None:
        """The consumer gives up (client gone): stop the request in the engine at once."""
        if not self._done:
            self._end()
            self._event.set()

    def _end(self) -> None:
        self._done = True
        self._on_end(self)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        while True:
            if self._pending:
                return self._pending.popleft()
            if self._error is not None:
                raise self._error
            if self._done:
                raise StopAsyncIteration
            self._event.clear()
            await self._event.wait()


def _empty_stats() -> EngineStats:
    return EngineStats(0, 0, 0, 0, 0, 0.0, 0, 0, 0)


class AsyncEngineClient:
    def __init__(
        self,
        config: EngineConfig,
        *,
        startup_timeout_s: float = 600.0,
        auto_restart: bool = True,
        max_restart_backoff_s: float = 30.0,
        stall_timeout_s: float | None = 60.0,
    ) -> None:
        self.config = config
        self.startup_timeout_s = startup_timeout_s
        self.auto_restart = auto_restart
        self.max_restart_backoff_s = max_restart_backoff_s
        self.tokenizer: Tokenizer | None = None
        self.model_config: ModelConfig | None = None
        self.max_model_len = 0
        self.engine_pid: int | None = None
        self.num_restarts = 0
        self.num_stalls = 0
        self.on_restart: Callable[[], None] | None = None  # e.g. a metrics counter

        self._ctx = zmq.asyncio.Context()
        self._tmpdir = tempfile.mkdtemp(prefix="lockgate-engine-")  # 0700: private IPC sockets
        self._generation = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._in: zmq.Socket | None = None  # PUSH, used synchronously (aborts from finally blocks)
        self._out: zmq.asyncio.Socket | None = None  # PULL
        self._reader: asyncio.Task[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._ckpt_task: asyncio.Future[Any] | None = None
        self._healthy = False
        self._closing = False
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(CoreMessage)
        self._stats = _empty_stats()
        # Cumulative counters survive restarts: add what the dead core had counted.
        self._base_preemptions = self._base_queries = self._base_hits = 0
        self._base_step_seconds = HistogramCounts()
        self._base_iteration_tokens = HistogramCounts()
        self._input: InputProcessor | None = None
        self._output: OutputProcessor | None = None
        self._streams: dict[str, RequestStream] = {}
        self.queue = QueueView()  # accepted requests with no output yet, per priority, and their drain rate
        # Stall watchdog (0 or None: off). Inactive while no core is up; never fires on an idle core.
        self._watchdog = StallWatchdog(
            stall_timeout_s, is_active=lambda: self.healthy, has_pending=lambda: bool(self._streams),
            on_stall=self._on_stall)
        self._watchdog_task: asyncio.Task[None] | None = None
        self._stalled_pid: int | None = None  # the core the watchdog killed, for the supervisor's log

    # ---- life cycle ------------------------------------------------------------------
    async def start(self) -> None:
        """Load the tokenizer here, start the core, and wait until it reports ready."""
        from lockgate.engine.fake_runner import checkpoint_load_format
        from lockgate.engine.loader import load_checkpoint  # weights are lazy: cheap here

        # Tokenizer here and model in the core load in parallel; unless the caller set them (another
        # engine of the same checkpoint shares its own: loading holds the GIL for seconds).
        if self.tokenizer is None or self.model_config is None:
            self.tokenizer = None
            self._ckpt_task = asyncio.ensure_future(asyncio.to_thread(
                load_checkpoint, self.config.model, checkpoint_load_format(self.config.load_format)))
        try:
            await self._spawn()
        finally:
            if self._ckpt_task is not None and not self._ckpt_task.done():
                self._ckpt_task.cancel()
        self._supervisor = asyncio.create_task(self._supervise(), name="engine-supervisor")
        if self._watchdog.enabled:
            self._watchdog_task = asyncio.create_task(self._watchdog.run(), name="engine-watchdog")

    @property
    def healthy(self) -> bool:
        return self._healthy and not self._closing

    @property
    def core_pid(self) -> int | None:
        """The engine-core process, from its spawn on (`engine_pid` is set only once it is ready)."""
        return self._proc.pid if self._proc is not None else None

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the core (Shutdown message, then SIGKILL after `timeout_s`) and clean up."""
        if self._closing:
            return
        self._closing = True
        self._healthy = False
        for task in (self._supervisor, self._reader, self._watchdog_task):
            if task is not None:
                task.cancel()
        self.fail_all(EngineUnavailableError("the server is shutting down"))
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(zmq.ZMQError):
                self._send(Shutdown())
            try:
                await asyncio.wait_for(proc.wait(), timeout_s)
            except TimeoutError:
                log.warning("engine core did not stop within %.0f s; killing it", timeout_s)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        self._close_sockets()
        self._ctx.term()
        shutil.rmtree(self._tmpdir, ignore_errors=True)

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
            payload = self._encoder.encode(AddRequests(reqs))
        except (OverflowError, TypeError, msgspec.EncodeError) as exc:
            raise ValueError(f"request cannot be encoded for the engine: {exc}") from None
        first = reqs[0]
        text = prompt if isinstance(prompt, str) else prompt_text
        stream = RequestStream(request_id, len(reqs), len(first.prompt_token_ids) * len(reqs), self._release)
        # From here on, any failure releases what was registered (one place: _release).
        self._streams[request_id] = stream
        self.queue.add(request_id, priority, stream.num_children, stream.queued_tokens)
        try:
            # The caller's params (with n): the children's carry n=1 and per-child seeds.
            self._output.add_request(request_id, text, first.prompt_token_ids, params)
            self._send_raw(payload)
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
                self._send(AbortRequests(child_ids))

    def _send(self, msg: object) -> None:
        self._send_raw(self._encoder.encode(msg))

    def _send_raw(self, payload: bytes) -> None:
        if self._in is None:
            raise zmq.ZMQError(zmq.ENOTCONN, "engine socket closed")
        # NOBLOCK: with the core gone a PUSH socket has no peer and would block forever.
        self._in.send(payload, flags=zmq.NOBLOCK, copy=False)

    # ---- state -----------------------------------------------------------------------
    def state(self) -> EngineState:
        s = self._stats
        return EngineState(
            healthy=self.healthy, num_running=s.num_running, num_waiting=s.num_waiting,
            num_waiting_tokens=s.num_waiting_tokens, kv_cache_usage=s.kv_cache_usage,
            num_free_blocks=s.num_free_blocks, num_total_blocks=s.num_total_blocks,
            num_preemptions=self._base_preemptions + s.num_preemptions,
            prefix_cache_queries=self._base_queries + s.prefix_cache_queries,
            prefix_cache_hits=self._base_hits + s.prefix_cache_hits,
            num_queued_requests=self.queue.num_requests, num_queued_tokens=self.queue.num_tokens,
            num_in_flight=len(self._streams), num_restarts=self.num_restarts, num_stalls=self.num_stalls,
            step_seconds=self._base_step_seconds.plus(s.step_seconds),
            iteration_tokens=self._base_iteration_tokens.plus(s.iteration_tokens),
        )

    # ---- the core process --------------------------------------------------------------
    async def _spawn(self) -> None:
        self._generation += 1
        in_addr = f"ipc://{self._tmpdir}/in-{self._generation}"
        out_addr = f"ipc://{self._tmpdir}/out-{self._generation}"
        self._in = self._ctx.socket(zmq.PUSH, socket_class=zmq.Socket)  # plain (sync) socket
        self._in.setsockopt(zmq.SNDHWM, 0)
        self._in.setsockopt(zmq.LINGER, 0)
        self._in.bind(in_addr)
        self._out = self._ctx.socket(zmq.PULL)
        self._out.setsockopt(zmq.RCVHWM, 0)
        self._out.setsockopt(zmq.LINGER, 0)
        self._out.bind(out_addr)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "lockgate.engine.core",
                "--input", in_addr, "--output", out_addr, "--config", encode_config(self.config).decode(),
                "--generation", str(self._generation),
            )
        except OSError:
            self._close_sockets()
            raise
        self._proc = proc
        try:
            ready = await self._await_ready(proc)
            if self.tokenizer is None:
                ckpt = await self._ckpt_task
                self.tokenizer, self.model_config = ckpt.tokenizer, ckpt.config
        except BaseException:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
            self._close_sockets()
            raise
        self.engine_pid = ready.pid
        self.max_model_len = ready.max_model_len
        self._stats = ready.stats
        assert self.tokenizer is not None and self.model_config is not None
        self._input = InputProcessor(self.tokenizer, self.model_config, ready.max_model_len,
                                     self.config.max_logprobs)
        self._output = OutputProcessor(self.tokenizer, clock_offset=ready.clock_offset)
        self._reader = asyncio.create_task(self._read_outputs(), name="engine-output-reader")
        self._watchdog.progress()
        self._healthy = True
        log.info("engine core ready (pid %d, max_model_len %d, %d KV blocks)",
                 ready.pid, ready.max_model_len, ready.num_total_blocks)

    async def _await_ready(self, proc: asyncio.subprocess.Process) -> Ready:
        assert self._out is not None
        exited = asyncio.ensure_future(proc.wait())
        deadline = time.monotonic() + self.startup_timeout_s
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
                    raise EngineStartError(f"engine core not ready after {self.startup_timeout_s:.0f} s")
                msg = self._decoder.decode(recv.result())
                if isinstance(msg, Ready):
                    return msg
                if isinstance(msg, EngineFailed):
                    raise EngineStartError(msg.message)
        finally:
            exited.cancel()

    async def _supervise(self) -> None:
        while not self._closing:
            proc = self._proc
            assert proc is not None
            rc = await proc.wait()
            if self._closing:
                return
            how = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
            if self._stalled_pid == proc.pid:
                log.warning("stalled engine core process %s killed; restarting it", proc.pid)
            else:
                log.error("engine core process %s died (%s)", proc.pid, how)
            self._stalled_pid = None
            self._on_engine_death(f"the engine process died ({how}); the request was not completed")
            if not self.auto_restart:
                return
            backoff = 0.5
            while not self._closing:
                try:
                    await self._spawn()
                except Exception as exc:  # noqa: BLE001 - keep trying: the server must come back
                    log.error("engine restart failed: %s; retrying in %.1f s", exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self.max_restart_backoff_s)
                    continue
                self.num_restarts += 1
                if self.on_restart is not None:
                    self.on_restart()
                break

    def _on_engine_death(self, message: str) -> None:
        self._healthy = False
        s = self._stats
        self._base_preemptions += s.num_preemptions
        self._base_queries += s.prefix_cache_queries
        self._base_hits += s.prefix_cache_hits
        self._base_step_seconds = self._base_step_seconds.plus(s.step_seconds)
        self._base_iteration_tokens = self._base_iteration_tokens.plus(s.iteration_tokens)
        self._stats = _empty_stats()
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        self.fail_all(EngineDeadError(message))
        self._input = self._output = None
        self._close_sockets()

    def _on_stall(self, stalled_s: float) -> None:
        """The watchdog's verdict: fail in-flight requests, SIGKILL the core; `_supervise` restarts it."""
        proc = self._proc
        pid = proc.pid if proc is not None else None
        self.num_stalls += 1
        log.error("engine core process %s made no progress for %.1f s with %d request(s) in flight "
                  "(stall timeout %.1f s); failing them and restarting the engine",
                  pid, stalled_s, len(self._streams), self._watchdog.timeout_s or 0.0)
        self._stalled_pid = pid
        message = (f"the engine stopped making progress for {stalled_s:.0f} s and is being restarted; "
                   "the request was not completed")
        self._healthy = False  # first: released streams must not send aborts to the stuck core
        self.fail_all(EngineStalledError(message))
        self._on_engine_death(message)
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    def fail_all(self, exc: Exception) -> None:
        """End every in-flight request with `exc` (engine death, drain timeout)."""
        for stream in list(self._streams.values()):
            stream.fail(exc)

    def _close_sockets(self) -> None:
        for sock in (self._in, self._out):
            if sock is not None:
                sock.close(linger=0)
        self._in = self._out = None

    # ---- outputs -----------------------------------------------------------------------
    async def _read_outputs(self) -> None:
        sock, decode = self._out, self._decoder.decode
        assert sock is not None
        while True:
            data = await sock.recv()
            self._watchdog.progress()
            try:
                msg = decode(data)
            except msgspec.DecodeError:
                log.exception("undecodable message from the engine core; ignored")
                continue
            if isinstance(msg, StepOutputs):
                self._stats = msg.stats
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
                self._send(AbortRequests(to_abort))
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


__all__ = [
    "AsyncEngineClient", "EngineDeadError", "EngineError", "EngineStalledError", "EngineStartError",
    "EngineState", "EngineUnavailableError", "RequestRejectedError", "RequestStream", "child_request_ids",
]
