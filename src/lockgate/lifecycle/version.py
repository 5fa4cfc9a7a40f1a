"""`ModelVersion`: one model version's engines (its fleet of replicas, fleet.py), its admission
queue and its life: loading -> warming -> ready -> draining, or failed.

A version takes traffic only when `ready`: one of its replicas is up and has answered one
real forward pass (a 1-token greedy generation), and the quality gate, when asked for,
has passed. Loading runs in the background: the event loop only awaits the cores'
start-up, so the other versions keep serving while it loads.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from enum import StrEnum
from typing import Any

from lockgate.engine.config import EngineConfig
from lockgate.gateway.admission import Admission
from lockgate.lifecycle import priority
from lockgate.lifecycle.autoscale_loop import AutoscaleLoop
from lockgate.lifecycle.breaker import CircuitBreaker
from lockgate.lifecycle.fleet import Fleet
from lockgate.lifecycle.spec import VersionSpec
from lockgate.lifecycle.stats import VersionStats

log = logging.getLogger("lockgate.lifecycle")

MAX_REASON_CHARS = 2000
IDLE_LOAD_LIMIT_S = 60.0  # a background load runs at idle CPU priority for this long at most


class State(StrEnum):
    LOADING = "loading"
    WARMING = "warming"
    READY = "ready"
    DRAINING = "draining"
    FAILED = "failed"


class ModelVersion:
    def __init__(self, spec: VersionSpec, engine_config: EngineConfig, fleet: Fleet, admission: Admission) -> None:
        self.spec = spec
        self.engine_config = engine_config
        self.fleet = fleet
        self.admission = admission
        self.state = State.LOADING
        self.reason: str | None = None  # why it failed
        self.created_at = time.time()
        self.load_seconds: float | None = None  # start of loading to ready (warm-up and gate included)
        self.ready_at: float | None = None
        self.users = 0  # requests routed here and not yet ended (a drain waits for them)
        self.stats = VersionStats()
        self.gate_report: dict[str, Any] | None = None
        self.rolled_back: dict[str, Any] | None = None  # the last automatic rollback's rule and figures
        self.load_task: asyncio.Task[None] | None = None  # a load started by the admin API
        self.autoscaler: AutoscaleLoop | None = None  # runs once the version is ready
        self._faults = 0  # TEST ONLY: requests seen by fail_fraction
        # Routing skips the version while it keeps failing (breaker.py); the model's config replaces it.
        self.breaker = CircuitBreaker(spec.ref, fleet.breaker_config)
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopped = False

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def version(self) -> str:
        return self.spec.version

    @property
    def available(self) -> bool:
        """May take new requests: ready, and one of its replicas is up (not restarting after a crash)."""
        return self.state is State.READY and self.fleet.healthy

    # ---- life -----------------------------------------------------------------------
    async def load(self, gate: Callable[[ModelVersion], Awaitable[dict[str, Any] | None]] | None = None,
                   background: bool = False) -> bool:
        """Start the core, warm it, run the gate; True when ready. Never raises: a failure is the
        `failed` state with its reason (the other versions keep serving). `background`: other
        versions serve meanwhile, so the core loads at idle CPU priority (priority.py)."""
        started = time.monotonic()
        try:
            if background:
                await self._start_at_idle_priority()
            else:
                await self.fleet.start()  # each replica warms itself: one real forward pass
            if self.state is not State.LOADING:  # unloaded while it loaded
                return False
            self.state = State.WARMING
            if gate is not None:
                report = await gate(self)
                self.gate_report = report
                if report is not None and not report.get("passed", False):
                    raise RuntimeError(f"quality gate failed: {'; '.join(report.get('failures', [])) or 'see gate'}")
        except asyncio.CancelledError:
            self.fail("loading was cancelled")
            raise
        except Exception as exc:  # noqa: BLE001 - any load failure is this version's state, not the server's
            self.fail(f"{type(exc).__name__}: {exc}")
            with contextlib.suppress(Exception):
                await self.stop()  # the core (if it started), its sockets and temp dir
            return False
        if self.state is not State.WARMING:
            return False
        self.load_seconds = time.monotonic() - started
        self.ready_at = time.time()
        self.state = State.READY
        log.info("model %s is ready (loaded and warmed in %.1f s)", self.spec.ref, self.load_seconds)
        if self.autoscaler is not None:
            self.autoscaler.start()
        return True

    async def _start_at_idle_priority(self) -> None:
        """`fleet.start()` with the cores at SCHED_IDLE until the first is ready (serving runs at
        normal priority), for IDLE_LOAD_LIMIT_S at most: a machine saturated for longer must not
        starve the load for ever."""
        start = asyncio.ensure_future(self.fleet.start())
        idle: set[int] = set()
        deadline = time.monotonic() + IDLE_LOAD_LIMIT_S
        try:
            while not start.done():
                late = time.monotonic() > deadline
                for pid in self.fleet.core_pids:
                    if pid not in idle and not late and priority.set_idle(pid, True):
                        idle.add(pid)
                if late and idle:
                    log.warning("model %s still loading after %.0f s at idle CPU priority; going on at normal "
                                "priority", self.spec.ref, IDLE_LOAD_LIMIT_S)
                    for pid in idle:
                        priority.set_idle(pid, False)
                    idle.clear()
                await asyncio.wait({start}, timeout=0.02)
        finally:
            for pid in idle:
                priority.set_idle(pid, False)
            if not start.done():
                start.cancel()
        await start

    def fail(self, reason: str) -> None:
        self.state = State.FAILED
        self.reason = reason[:MAX_REASON_CHARS]
        log.error("model %s failed: %s", self.spec.ref, self.reason)

    def enter(self) -> Callable[[str], None]:
        """A request is routed here: hold the version until it ends (returns the release)."""
        self.users += 1
        self._idle.clear()
        done = False

        def release(_outcome: str = "") -> None:
            nonlocal done
            if done:
                return
            done = True
            self.users -= 1
            if self.users <= 0:
                self._idle.set()

        return release

    async def drain(self, timeout_s: float) -> None:
        """No new requests (the caller has set `draining`); wait for those routed here, up to
        `timeout_s`, then cut the rest short."""
        self.state = State.DRAINING
        if self.autoscaler is not None:  # its count is no longer the autoscaler's to change
            await self.autoscaler.stop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        if self.users > 0:
            log.warning("model %s: drain timeout, cutting %d request(s) short", self.spec.ref, self.users)

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self.autoscaler is not None:
            await self.autoscaler.stop()
        await self.fleet.shutdown()

    def inject_fault(self) -> bool:
        """TEST ONLY (`fail_fraction`): whether this request fails. Deterministic: the k-th request
        fails when floor(k * f) steps up, so f = 0.5 fails every second request."""
        f = self.spec.fail_fraction
        if f <= 0:
            return False
        self._faults += 1
        k = self._faults
        return int(k * f) > int((k - 1) * f)

    def to_json(self, share: float) -> dict[str, Any]:
        s = self.spec
        return {"version": s.version, "path": s.path, "state": str(self.state), "reason": self.reason,
                "healthy": self.fleet.healthy if self.state is State.READY else None,
                "traffic_share": round(share, 6), "load_seconds": None if self.load_seconds is None
                else round(self.load_seconds, 3), "created_at": self.created_at, "ready_at": self.ready_at,
                "in_flight": self.users, "engine": dict(s.engine), "fail_fraction": s.fail_fraction or None,
                "gate": self.gate_report, "rolled_back": self.rolled_back,
                "max_model_len": self.fleet.max_model_len or None,
                "replicas": self._replicas_json(), "placement": s.placement.to_json(),
                "breaker": self.breaker.to_json()}

    def _replicas_json(self) -> dict[str, Any]:
        f = self.fleet
        out: dict[str, Any] = {"configured": f.configured, "desired": f.configured, "ready": f.num_ready,
                               "starting": f.num_starting, "rerouted": f.num_reroutes,
                               "cold_start_s": [round(x, 3) for x in f.cold_starts], "list": f.to_json()}
        if self.autoscaler is not None:
            c = self.autoscaler.autoscaler.config
            last, seen = f.last_decision, f.last_evaluation
            out["autoscale"] = {
                "policy": c.policy, "min_replicas": c.min_replicas, "max_replicas": c.max_replicas,
                "interval_s": c.interval_s, "stable_window_s": c.stable_window_s, "panic_window_s": c.panic_window_s,
                "scale_down_cooldown_s": c.scale_down_cooldown_s, "activation_timeout_s": c.activation_timeout_s,
                "held": f.held, "last_decision": last.to_json() if last is not None else None,
                "last_evaluation": seen.to_json() if seen is not None else None,
                "scale_events": sum(self.autoscaler.events.counts.values())}
        return out
