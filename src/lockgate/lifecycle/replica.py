"""`Replica`: one engine-core process of a model version, as the version's fleet sees it.

Each replica is its own `AsyncEngineClient` (its own core process, KV cache and
supervisor) and a subscriber to that core's KV-cache events, which keep the
router's index of the replica's cached blocks exact. Its life: starting ->
ready -> draining -> stopped, or failed (a start that keeps failing is retried
with backoff, as the supervisor retries a restart).

An attached replica (`--api-workers N`: a core the primary API worker started, its client's
transport `AttachedTransport`) is not warmed up here (the primary did), and tells the router
what the other workers have on its core too.

Routable means ready, its core up (not restarting after a crash) and not silent:
a core always talks (a heartbeat every second when idle, every half second
between steps when busy), so one that has said nothing for STALE_S while it has
work, or for IDLE_STALE_S without, is stopped or stuck and gets no new request.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from enum import StrEnum
from collections.abc import Callable
from typing import Any

from lockgate.engine.frontend.client import AsyncEngineClient
from lockgate.engine.frontend.kv_events_sub import KVEventSubscriber
from lockgate.engine.kv_events import AllBlocksCleared, BlockRemoved, BlockStored
from lockgate.engine.sampling_params import SamplingParams
from lockgate.lifecycle.breaker import BreakerConfig, CircuitBreaker
from lockgate.lifecycle.router import Router

log = logging.getLogger("lockgate.lifecycle")

STALE_S = 1.0  # busy and silent this long: no new request (a stalled or SIGSTOPped core)
IDLE_STALE_S = 2.5  # idle and silent this long (the idle heartbeat comes every second)
MAX_REASON_CHARS = 2000


class ReplicaState(StrEnum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"
    FAILED = "failed"


class Replica:
    def __init__(self, name: str, index: int, client: AsyncEngineClient, router: Router) -> None:
        self.name = name  # NAME@VERSION/INDEX: the x-lockgate-replica header, the ledger, metrics labels
        self.index = index
        self.client = client
        self.router = router
        self.state = ReplicaState.STARTING
        self.reason: str | None = None
        self.created_at = time.time()
        self.ready_at: float | None = None
        # Cold start, from the decision that made it (its creation) to ready: the core up (process start
        # and weight load), then the warm-up forward pass.
        self._decided = time.monotonic()
        self.core_ready_s: float | None = None
        self.warm_up_s: float | None = None
        self.on_up: Callable[[], None] | None = None  # the fleet's activator wakes its held requests
        self.task: asyncio.Task[None] | None = None  # its start (and retries)
        self.subscriber: KVEventSubscriber | None = None
        self._was_up = False  # for clearing the router's index when the core goes down
        self._restarts_seen = 0  # the core's restarts at the last refresh (a restart resets the breaker)
        self._peer_fed = False  # the router holds other API workers' load on this core
        self._follow: asyncio.Task[None] | None = None  # the subscriber moving to a restarted remote core
        self.breaker = CircuitBreaker(name, BreakerConfig())  # the fleet sets the model's config

    # ---- routing ---------------------------------------------------------------------------
    @property
    def up(self) -> bool:
        """Ready, and its core is up (not restarting)."""
        return self.state is ReplicaState.READY and self.client.healthy

    @property
    def stale(self) -> bool:
        """Up, but its core has said nothing for too long (stalled, stopped or swamped)."""
        silent = time.monotonic() - self.client.last_message_at
        return silent > (STALE_S if self.client.num_pending else IDLE_STALE_S)

    def refresh(self) -> None:
        """Tell the router what this replica is now (called before each routing decision)."""
        up = self.up
        if self._was_up and not up:
            self.router.cleared(self.index)  # a dead core's cache died with it
        restarts = self.client.num_restarts
        if up and (not self._was_up or restarts != self._restarts_seen):
            self.breaker.reset("its engine core is up (again)")  # the failures were the dead core's
        self._restarts_seen = restarts
        self._was_up = up
        if up:
            self._follow_core()
        self.router.set_routable(self.index, up)
        self.router.set_kv_usage(self.index, self.client.core_stats.kv_cache_usage if up else 0.0)
        peers = self.client.peers
        if peers is not None:  # shared cores: the other API workers' requests there
            queued_req = sum(r for r, _t in peers.queued.values())
            queued_tok = sum(t for _r, t in peers.queued.values())
            self.router.set_peer_load(self.index, queued_tok, queued_req, max(0, peers.in_flight - queued_req))
            self._peer_fed = True
        elif self._peer_fed:  # the core died: its load went with it
            self.router.set_peer_load(self.index, 0, 0, 0)
            self._peer_fed = False

    def _follow_core(self) -> None:
        """A restarted remote core binds new ports: move the subscriber there (a local core's
        addresses never change, so this does nothing for it)."""
        sub, addrs = self.subscriber, self.client.kv_event_addresses
        if sub is None or not addrs[0] or addrs == (sub.pub_addr, sub.replay_addr):
            return
        if self._follow is None or self._follow.done():
            sub.pub_addr, sub.replay_addr = addrs
            self._follow = asyncio.ensure_future(sub.reconnect())

    # ---- life ------------------------------------------------------------------------------
    async def start(self, checkpoint: asyncio.Future[Any] | None, ref: str) -> None:
        """Start the core (sharing the version's tokenizer load), subscribe to its KV events, warm it
        with one real forward pass; then it is ready. Raises when the start fails."""
        await self.client.start(checkpoint=checkpoint)
        self.core_ready_s = time.monotonic() - self._decided
        pub, replay = self.client.kv_event_addresses
        if pub:  # a remote core with prefix caching off has no KV-event sockets
            self.subscriber = KVEventSubscriber(pub, replay, self._on_events, lambda: self.router.cleared(self.index),
                                                curve=self.client.kv_event_curve)
            await self.subscriber.start()
        if not self.client.attached:  # an attached core was warmed by the worker that started it
            await self._warm_up(ref)
        if self.state is ReplicaState.STARTING:
            self.warm_up_s = time.monotonic() - self._decided - self.core_ready_s
            self.state = ReplicaState.READY
            self.ready_at = time.time()
            if self.on_up is not None:
                self.on_up()

    @property
    def cold_start_s(self) -> float | None:
        """Seconds from the decision that started this replica to its being ready (None until then)."""
        if self.core_ready_s is None or self.warm_up_s is None:
            return None
        return self.core_ready_s + self.warm_up_s

    async def _warm_up(self, ref: str) -> None:
        tok = self.client.tokenizer
        ids = tok.encode("Hello", add_special_tokens=True) if tok is not None else []
        stream = self.client.add_request(f"warmup-{ref}/{self.index}-{time.monotonic_ns()}", ids or [1],
                                         SamplingParams(temperature=0.0, max_tokens=1))
        try:
            async for _ in stream:
                pass
        finally:
            stream.abort()

    def _on_events(self, events: list[Any]) -> None:
        router, i = self.router, self.index
        for e in events:
            if isinstance(e, BlockStored):
                router.blocks_stored(i, e.block_hashes)
            elif isinstance(e, BlockRemoved):
                router.blocks_removed(i, e.block_hashes)
            elif isinstance(e, AllBlocksCleared):
                router.cleared(i)

    def fail(self, reason: str) -> None:
        self.state = ReplicaState.FAILED
        self.reason = reason[:MAX_REASON_CHARS]

    async def stop(self) -> None:
        if self.state is not ReplicaState.FAILED:
            self.state = ReplicaState.STOPPED
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(BaseException):
                await self.task
        if self._follow is not None and not self._follow.done():
            self._follow.cancel()
        if self.subscriber is not None:
            await self.subscriber.close()
        await self.client.shutdown()

    def to_json(self) -> dict[str, Any]:
        stats = self.client.core_stats
        view = self.router.replica_view(self.index) if self.index in self.router.replicas else {}
        return {"replica": self.name, "index": self.index, "state": str(self.state), "reason": self.reason,
                "healthy": self.client.healthy, "stale": self.stale if self.up else None,
                "pid": self.client.core_pid, "node": self.client.core_node, "restarts": self.client.num_restarts,
                "in_flight": self.client.num_pending, "running": stats.num_running, "waiting": stats.num_waiting,
                "kv_cache_usage": round(stats.kv_cache_usage, 6), "kv_blocks": stats.num_total_blocks,
                "cached_blocks": view.get("cached_blocks", 0), "queued_tokens": view.get("queued_tokens", 0),
                "routed": view.get("routed", {}), "traffic_share": view.get("routed_share", 0.0),
                "kv_events": dict(zip(("publisher", "replay"), self.client.kv_event_addresses)),
                "created_at": self.created_at, "ready_at": self.ready_at, "breaker": self.breaker.to_json(),
                "cold_start": {"core_ready_s": _round(self.core_ready_s), "warm_up_s": _round(self.warm_up_s),
                               "total_s": _round(self.cold_start_s)},
                "core_timings": {k: _round(v) for k, v in self.client.core_timings.items()}}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)
