"""Supervising the engine-core process from the API process.

When the core process dies, every in-flight request fails at once with
`EngineDeadError`, the client turns unhealthy, and `Supervisor` starts a new
core (with backoff) so later requests work again. A core on another machine
(`remote_transport.py`) dies the same way: its host reports the exit, or is
gone itself; one another API worker started (`attached_transport.py`) dies
when its process ends, and its "restart" is attaching to the one that replaces it.
A core that is alive but makes no progress while requests are in
flight (`watchdog.py`) is treated the same way: its requests fail with
`EngineStalledError` and the supervisor kills it, then restarts it like a dead
one.

Also here: `EngineState`, what admission control and /metrics read, and
`CoreCounters`, the core's stats with the cumulative counters every earlier
core had counted (they survive restarts).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from lockgate.engine.errors import EngineDeadError, EngineStalledError
from lockgate.engine.frontend.queue_view import QueueView
from lockgate.engine.frontend.transport import CoreLink
from lockgate.engine.messages import EngineStats
from lockgate.engine.step_stats import HistogramCounts
from lockgate.engine.spec.stats import SpecStats
from lockgate.engine.structured.stats import StructuredStats

log = logging.getLogger("lockgate.engine.client")


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
    structured: StructuredStats | None = None  # structured outputs' counters, cumulative likewise
    spec: SpecStats | None = None  # speculative decoding's counters, cumulative likewise


    @classmethod
    def combine(cls, states: list[EngineState], healthy: bool) -> EngineState:
        """Several engines as one: counts summed, KV usage over all their blocks."""
        total_blocks = sum(s.num_total_blocks for s in states)
        used = sum(s.kv_cache_usage * s.num_total_blocks for s in states)
        step, tokens = HistogramCounts(), HistogramCounts()
        structured = StructuredStats()
        spec = SpecStats()
        for s in states:
            step, tokens = step.plus(s.step_seconds), tokens.plus(s.iteration_tokens)
            structured = structured.plus(s.structured)
            spec = spec.plus(s.spec)

        def total(name: str) -> int:
            return sum(getattr(s, name) for s in states)

        return cls(
            healthy=healthy, num_running=total("num_running"), num_waiting=total("num_waiting"),
            num_waiting_tokens=total("num_waiting_tokens"),
            kv_cache_usage=used / total_blocks if total_blocks else 0.0,
            num_free_blocks=total("num_free_blocks"), num_total_blocks=total_blocks,
            num_preemptions=total("num_preemptions"), prefix_cache_queries=total("prefix_cache_queries"),
            prefix_cache_hits=total("prefix_cache_hits"), num_queued_requests=total("num_queued_requests"),
            num_queued_tokens=total("num_queued_tokens"), num_in_flight=total("num_in_flight"),
            num_restarts=total("num_restarts"), num_stalls=total("num_stalls"), step_seconds=step,
            iteration_tokens=tokens, structured=structured, spec=spec)


def empty_stats() -> EngineStats:
    return EngineStats(0, 0, 0, 0, 0, 0.0, 0, 0, 0)


class CoreCounters:
    """The latest stats of the current core, plus what the cores before it had counted."""

    def __init__(self) -> None:
        self.stats = empty_stats()
        self._base_preemptions = self._base_queries = self._base_hits = 0
        self._base_step_seconds = HistogramCounts()
        self._base_iteration_tokens = HistogramCounts()
        self._base_structured = StructuredStats()
        self._base_spec = SpecStats()

    def core_died(self) -> None:
        """Keep the dead core's cumulative counters; its gauges go to zero."""
        s = self.stats
        self._base_preemptions += s.num_preemptions
        self._base_queries += s.prefix_cache_queries
        self._base_hits += s.prefix_cache_hits
        self._base_step_seconds = self._base_step_seconds.plus(s.step_seconds)
        self._base_iteration_tokens = self._base_iteration_tokens.plus(s.iteration_tokens)
        self._base_structured = self._base_structured.plus(s.structured)
        self._base_spec = self._base_spec.plus(s.spec)
        self.stats = empty_stats()

    def state(self, *, healthy: bool, queue: QueueView, num_in_flight: int, num_restarts: int,
              num_stalls: int) -> EngineState:
        s = self.stats
        return EngineState(
            healthy=healthy, num_running=s.num_running, num_waiting=s.num_waiting,
            num_waiting_tokens=s.num_waiting_tokens, kv_cache_usage=s.kv_cache_usage,
            num_free_blocks=s.num_free_blocks, num_total_blocks=s.num_total_blocks,
            num_preemptions=self._base_preemptions + s.num_preemptions,
            prefix_cache_queries=self._base_queries + s.prefix_cache_queries,
            prefix_cache_hits=self._base_hits + s.prefix_cache_hits,
            num_queued_requests=queue.num_requests, num_queued_tokens=queue.num_tokens,
            num_in_flight=num_in_flight, num_restarts=num_restarts, num_stalls=num_stalls,
            step_seconds=self._base_step_seconds.plus(s.step_seconds),
            iteration_tokens=self._base_iteration_tokens.plus(s.iteration_tokens),
            structured=self._base_structured.plus(s.structured),
            spec=self._base_spec.plus(s.spec),
        )


class Supervisor:
    """Restarts the core when its process ends; kills a stalled one first.

    `core_died(error)` is the client's part: turn unhealthy, fail every in-flight
    request with `error`, drop the dead core's state. `restart()` starts a new
    core and returns once it is ready (or raises).
    """

    def __init__(self, transport: CoreLink, *, restart: Callable[[], Awaitable[None]],
                 core_died: Callable[[EngineDeadError], None], is_closing: Callable[[], bool],
                 auto_restart: bool, max_restart_backoff_s: float) -> None:
        self._transport = transport
        self._restart = restart
        self._core_died = core_died
        self._is_closing = is_closing
        self.auto_restart = auto_restart
        self.max_restart_backoff_s = max_restart_backoff_s
        self.num_restarts = 0
        self.num_stalls = 0
        self.on_restart: Callable[[], None] | None = None  # e.g. a metrics counter
        self._stalled_pid: int | None = None  # the core the watchdog killed, for the log

    async def run(self) -> None:
        while not self._is_closing():
            proc = self._transport.proc
            assert proc is not None
            rc = await proc.wait()
            if self._is_closing():
                return
            how = getattr(proc, "exit_description", None) or (
                f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}")
            where = "" if self._transport.node is None else f" on {self._transport.node}"  # a remote core
            if self._stalled_pid == proc.pid:
                log.warning("stalled engine core process %s%s killed; restarting it", proc.pid, where)
            else:
                log.error("engine core process %s%s died (%s)", proc.pid, where, how)
            self._stalled_pid = None
            self._core_died(EngineDeadError(f"the engine process died ({how}); the request was not completed"))
            if not self.auto_restart:
                return
            backoff = 0.5
            while not self._is_closing():
                try:
                    await self._restart()
                except Exception as exc:  # noqa: BLE001 - keep trying: the server must come back
                    log.error("engine restart failed: %s; retrying in %.1f s", exc, backoff)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, self.max_restart_backoff_s)
                    continue
                self.num_restarts += 1
                if self.on_restart is not None:
                    self.on_restart()
                break

    def stalled(self, stalled_s: float, num_in_flight: int, timeout_s: float) -> None:
        """The watchdog's verdict: fail in-flight requests, SIGKILL the core; `run` restarts it."""
        proc = self._transport.proc
        pid = proc.pid if proc is not None else None
        self.num_stalls += 1
        log.error("engine core process %s made no progress for %.1f s with %d request(s) in flight "
                  "(stall timeout %.1f s); failing them and restarting the engine",
                  pid, stalled_s, num_in_flight, timeout_s)
        self._stalled_pid = pid
        self._core_died(EngineStalledError(
            f"the engine stopped making progress for {stalled_s:.0f} s and is being restarted; "
            "the request was not completed"))
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
