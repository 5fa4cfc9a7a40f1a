"""`Fleet`: a model version's engine replicas behind the KV-cache-aware router.

To its version the fleet is one engine: it has the tokenizer, the limits, one
admission queue (`queue`, shared by every replica's client, so SLO admission
sees the version's whole backlog and service rate) and `add_request`, which
routes each request to the replica with the lowest predicted time to first token
(`router.py`: uncached prompt tokens, queued and running work, KV pressure) and
returns a `FleetStream` that re-routes it if that replica dies before answering.

`--replicas 1` is one replica: today's single engine, with the router always
answering replica 0. Replicas are added in the background (taking traffic once
ready) and removed by draining (no new requests, in-flight ones finish).

With an autoscaler (`autoscale`, driven by `autoscale_loop.py`) the count follows the
load between its bounds, down to zero: a fleet at zero is still healthy (it can
serve), and a request that finds no replica up waits in `activate` (the activator)
while one starts, up to the version's activation timeout.

Several API workers on one machine (`--api-workers N`, server/workers.py): the primary
worker's fleet starts, supervises and scales the cores as above, `share`d (each core also
takes the other workers' requests; a replica drains only once every worker's requests on it
have ended). Every other worker's fleet is `attached`: it starts nothing; the server's
topology follower (server/topology.py) `attach`es a replica for each of the primary's and
`release`s it when the primary drops it, and requests held at zero replicas are counted by
the primary's autoscaler through `remote_held`.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from lockgate.engine.config import EngineConfig, ModelConfig, checkpoint_load_format
from lockgate.engine.errors import EngineStartError, EngineUnavailableError
from lockgate.engine.frontend.client import AsyncEngineClient
from lockgate.engine.frontend.queue_view import QueueView
from lockgate.engine.frontend.supervisor import EngineState
from lockgate.engine.prefix_hash import prompt_block_hashes
from lockgate.engine.sampling_params import SamplingParams
from lockgate.engine.tokenizer import Tokenizer
from lockgate.lifecycle.breaker import BreakerConfig, CircuitBreaker, OnChange
from lockgate.lifecycle.autoscale_types import AutoscaleConfig, Decision
from lockgate.lifecycle.fleet_stream import FleetStream
from lockgate.lifecycle.replica import Replica, ReplicaState
from lockgate.lifecycle.router import NoReplicaError, Router, RouterConfig, Ticket

log = logging.getLogger("lockgate.lifecycle")

MakeClient = Callable[[QueueView], AsyncEngineClient]
COLD_START_HISTORY = 32


class Fleet:
    def __init__(self, ref: str, config: EngineConfig, replicas: int, make_client: MakeClient,
                 router_config: RouterConfig | None = None) -> None:
        self.ref = ref  # NAME@VERSION
        self.config = config
        self.configured = replicas  # how many replicas the operator asked for
        self.queue = QueueView()
        self.router = Router(router_config or RouterConfig(block_size=config.block_size))
        self.replicas: dict[int, Replica] = {}
        self.breaker_config = BreakerConfig()  # each replica's circuit breaker (the model's config)
        self.on_breaker: OnChange | None = None  # transitions into metrics
        self.tokenizer: Tokenizer | None = None  # set before start when another version shares its checkpoint
        self.model_config: ModelConfig | None = None
        self.num_reroutes = 0
        self.autoscale: AutoscaleConfig | None = None  # set: the count follows the load (autoscale_loop.py)
        self.last_evaluation: Decision | None = None  # the autoscaler's latest evaluation
        self.last_decision: Decision | None = None  # its latest applied change (scale event)
        self._held = 0  # requests waiting in `activate` for a replica to come up (this process's)
        self.remote_held = 0  # the other API workers' (the primary worker's autoscaler counts them)
        self.wake_autoscaler: Callable[[], None] | None = None  # a held request wants a decision now
        self.cold_starts: list[float] = []  # decision-to-ready seconds of the latest replicas (bounded)
        self._max_model_len = 0  # kept while no replica is up (scaled to zero)
        self._up = asyncio.Event()  # set while some replica is up
        self._make_client = make_client
        self._on_restart: Callable[[], None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        # Several API workers: the primary shares its cores (how long a core's stop waits for the
        # other workers to detach); the others attach to the primary's.
        self.share_wait_s: float | None = None
        self.attached = False
        self._listed = asyncio.Event()  # attached: the primary's version is ready
        self._checkpoint: asyncio.Future[Any] | None = None

    @property
    def held(self) -> int:
        """Requests waiting in `activate` for a replica, in every API worker."""
        return self._held + self.remote_held

    @held.setter
    def held(self, n: int) -> None:
        self._held = n - self.remote_held

    @property
    def local_held(self) -> int:
        return self._held

    # ---- the engine as one ------------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        n = next((r.client.max_model_len for r in self.replicas.values() if r.client.max_model_len), 0)
        if n:
            self._max_model_len = n
        return n or self._max_model_len

    @property
    def healthy(self) -> bool:
        """Can serve: a replica is up, or (autoscaled) one is started for the request that finds none."""
        if self._closing:
            return False
        return self.autoscale is not None or any(r.up for r in self.replicas.values())

    @property
    def num_ready(self) -> int:
        return sum(1 for r in self.replicas.values() if r.up)

    @property
    def num_starting(self) -> int:
        return sum(1 for r in self.replicas.values() if r.state is ReplicaState.STARTING)

    @property
    def degraded(self) -> bool:
        """Fewer replicas can take requests than the operator (or the autoscaler) asked for."""
        return self.num_ready < self.configured

    @property
    def max_engines(self) -> int:
        """The most engine processes this fleet may run (its autoscaler's bound, or its count)."""
        return max(self.configured, self.autoscale.max_replicas) if self.autoscale else self.configured

    @property
    def num_in_flight(self) -> int:
        """Requests in the replicas' cores: this process's, and the other API workers' on shared cores."""
        return sum(r.client.num_pending + r.client.peer_in_flight for r in self.replicas.values())

    @property
    def kv_usage(self) -> float:
        """Mean KV-cache usage over the replicas that are up (0 with none)."""
        up = [r.client.core_stats.kv_cache_usage for r in self.replicas.values() if r.up]
        return sum(up) / len(up) if up else 0.0

    @property
    def core_pids(self) -> list[int]:
        """Local cores only: a remote core's pid is a pid on its own node."""
        return [pid for r in self.replicas.values()
                if (pid := r.client.core_pid) is not None and r.client.core_node is None]

    @property
    def num_restarts(self) -> int:
        return sum(r.client.num_restarts for r in self.replicas.values())

    @property
    def on_restart(self) -> Callable[[], None] | None:
        return self._on_restart

    @on_restart.setter
    def on_restart(self, hook: Callable[[], None] | None) -> None:
        self._on_restart = hook
        for r in self.replicas.values():
            r.client.on_restart = hook

    def state(self) -> EngineState:
        """Every replica summed; the queue figures are the shared queue's (counted once)."""
        s = EngineState.combine([r.client.state() for r in self.replicas.values()], self.healthy)
        s.num_queued_requests, s.num_queued_tokens = self.queue.num_requests, self.queue.num_tokens
        return s

    # ---- life ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start every configured replica at once; return when the first is ready (the others keep
        loading and take traffic when ready). EngineStartError when every one failed."""
        from lockgate.engine.loader import load_checkpoint  # weights are lazy: cheap here

        checkpoint = None
        if self.tokenizer is None or self.model_config is None:
            cfg = self.config  # one tokenizer load for every replica, beside their cores' start
            checkpoint = asyncio.ensure_future(asyncio.to_thread(
                load_checkpoint, cfg.model, checkpoint_load_format(cfg.load_format)))
        if self.attached:
            await self._start_attached(checkpoint)
            return
        starting = [self._add(checkpoint) for _ in range(self.configured)]
        if not starting:
            return
        try:
            pending = {r.task for r in starting if r.task is not None}
            while pending and not any(r.state is ReplicaState.READY for r in starting):
                _done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if not any(r.state is ReplicaState.READY for r in starting):
                reasons = sorted({r.reason or "failed" for r in starting})
                raise EngineStartError("; ".join(reasons))
        finally:
            if checkpoint is not None and checkpoint.done() and not checkpoint.cancelled() \
                    and checkpoint.exception() is None:
                ckpt = checkpoint.result()
                self.tokenizer, self.model_config = ckpt.tokenizer, ckpt.config
        log.info("%s: replica ready (%d of %d)", self.ref, self.num_ready, self.configured)

    async def _start_attached(self, checkpoint: asyncio.Future[Any] | None) -> None:
        """Attached: the tokenizer here, the replicas as the follower attaches them; ready once the
        primary's version is (`listed`) and one replica is up here (or at once, autoscaled: healthy
        at zero, a request wakes the primary's autoscaler)."""
        self._checkpoint = checkpoint
        try:
            if checkpoint is not None:
                ckpt = await asyncio.shield(checkpoint)
                self.tokenizer, self.model_config = ckpt.tokenizer, ckpt.config
            await self._listed.wait()
            if self.autoscale is None:
                await self._up.wait()
        finally:
            self._checkpoint = None
        log.info("%s: attached to the primary worker's replicas (%d up)", self.ref, self.num_ready)

    def attach(self, index: int, client: AsyncEngineClient) -> Replica:
        """Attached: serve through replica `index` of the primary worker's fleet (`client` attaches to
        its core: `AttachedTransport`), started in the background."""
        if index in self.replicas:
            raise ValueError(f"{self.ref}: replica {index} is already here")
        return self._add(self._checkpoint, index=index, client=client)

    def listed(self, max_model_len: int) -> None:
        """Attached: the primary worker's version is ready (its gate passed, its replicas listed), with
        its context length (what requests are checked against while no replica is here)."""
        if max_model_len:
            self._max_model_len = max_model_len
        self._listed.set()

    def release(self, index: int) -> None:
        """Attached: the primary dropped (or is draining) replica `index`: no new requests; it goes
        once this process's requests on it have ended."""
        replica = self.replicas.get(index)
        if replica is not None and replica.state not in (ReplicaState.DRAINING, ReplicaState.STOPPED):
            self._spawn(self._drain(replica, math.inf))

    def _add(self, checkpoint: asyncio.Future[Any] | None = None, *, index: int | None = None,
             client: AsyncEngineClient | None = None) -> Replica:
        """A new replica (the lowest free index), started in the background."""
        if index is None:
            index = next(i for i in range(len(self.replicas) + 1) if i not in self.replicas)
        if client is None:
            client = self._make_client(self.queue)
            if self.share_wait_s is not None:
                client.share(self.share_wait_s)
        client.tokenizer, client.model_config = self.tokenizer, self.model_config
        client.on_restart = self._on_restart
        replica = Replica(f"{self.ref}/{index}", index, client, self.router)
        replica.breaker = CircuitBreaker(replica.name, self.breaker_config, self.on_breaker)
        replica.on_up = self._note_up
        self.replicas[index] = replica
        self.router.add_replica(index)
        replica.task = asyncio.ensure_future(self._start(replica, checkpoint))
        return replica

    async def _start(self, replica: Replica, checkpoint: asyncio.Future[Any] | None) -> None:
        try:
            await replica.start(checkpoint, self.ref)
        except asyncio.CancelledError:
            replica.fail("start cancelled")
            raise
        except Exception as exc:  # noqa: BLE001 - one replica's failure is its state, not the fleet's
            replica.fail(f"{type(exc).__name__}: {exc}")
            log.error("%s: replica failed to start: %s", replica.name, replica.reason)
            with contextlib.suppress(Exception):
                await replica.client.shutdown()
            return
        cold = replica.cold_start_s
        if cold is not None:
            self.cold_starts = [*self.cold_starts, cold][-COLD_START_HISTORY:]
        log.info("%s is ready (pid %s, %.2f s from decision to ready)", replica.name, replica.client.core_pid,
                 cold or 0.0)

    def _note_up(self) -> None:
        self._up.set()

    async def set_replicas(self, n: int, drain_timeout_s: float = math.inf) -> None:
        """Scale to `n` replicas: failed ones are replaced, new ones load in the background; extra ones
        stop taking requests at once and stop once their requests have ended (still-loading ones first,
        then those with the fewest requests in flight). `drain_timeout_s` inf: never cut one short."""
        if self.attached:  # the primary worker owns the count (and its autoscaler)
            log.warning("%s: the replica count is the primary API worker's to change; ignored here", self.ref)
            return
        self.configured = n
        for r in [r for r in self.replicas.values() if r.state is ReplicaState.FAILED]:
            self._forget(r)
        live = [r for r in self.replicas.values() if r.state is not ReplicaState.DRAINING]
        for _ in range(n - len(live)):
            self._add()
        # Keep the ready ones with the most work (and, among equals, the oldest).
        keep_first = sorted(live, key=lambda r: (r.state is not ReplicaState.READY, -r.client.num_pending, r.index))
        for r in keep_first[max(n, 0):]:
            self._spawn(self._drain(r, drain_timeout_s))

    async def _drain(self, replica: Replica, timeout_s: float) -> None:
        replica.state = ReplicaState.DRAINING
        replica.refresh()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        c = replica.client

        def left() -> int:  # the primary's shared core: the other workers' requests on it too
            return c.num_pending + (0 if self.attached else c.peer_in_flight)

        while left() > 0 and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if left():
            log.warning("%s: drain timeout, cutting %d request(s) short", replica.name, left())
        await replica.stop()
        self._forget(replica)
        if not any(r.up for r in self.replicas.values()):
            self._up.clear()
        log.info("%s removed", replica.name)

    def _forget(self, replica: Replica) -> None:
        if self.replicas.get(replica.index) is replica:
            del self.replicas[replica.index]
            self.router.remove_replica(replica.index)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def fail_all(self, exc: Exception) -> None:
        for r in self.replicas.values():
            r.client.fail_all(exc)

    async def shutdown(self) -> None:
        self._closing = True
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*(r.stop() for r in list(self.replicas.values())), return_exceptions=True)

    # ---- the activator ------------------------------------------------------------------------
    async def activate(self, timeout_s: float) -> None:
        """Return once a replica is up. At zero (or with every replica still loading) the caller is
        held, the autoscaler is asked for a decision at once, and EngineUnavailableError comes after
        `timeout_s` without one."""
        if any(r.up for r in self.replicas.values()):
            return
        self._up.clear()
        self.held += 1
        try:
            if self.wake_autoscaler is not None:
                self.wake_autoscaler()
            deadline = time.monotonic() + timeout_s
            while not any(r.up for r in self.replicas.values()):
                left = deadline - time.monotonic()
                if left <= 0 or self._closing:
                    raise EngineUnavailableError(
                        f"no replica of {self.ref} became ready within {timeout_s:g} s (scaled to zero, "
                        "starting one); retry shortly")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._up.wait(), min(left, 0.5))
        finally:
            self.held -= 1

    # ---- requests ----------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams, *,
                    cache_salt: str | None = None, tenant: str = "", **kwargs: Any) -> FleetStream:
        """Route and submit one request (synchronous, as `AsyncEngineClient.add_request`)."""
        hashes: list[bytes] = []
        if isinstance(prompt, list) and self.config.enable_prefix_caching and len(self.replicas) > 1:
            hashes = prompt_block_hashes(prompt, self.config.block_size, cache_salt)
        stream = FleetStream(self, request_id, prompt, params,
                             {"cache_salt": cache_salt, "tenant": tenant, **kwargs}, hashes, tenant)
        stream.submit()
        return stream

    def choose(self, hashes: list[bytes], num_tokens: int, tenant: str, tried: set[int]
               ) -> tuple[Replica, Ticket]:
        """The router's pick among replicas that are up, not tried yet and not silent (a silent one
        only when nothing else is left); counted in flight there from now on."""
        stale, failing = set(), set()
        for r in self.replicas.values():
            r.refresh()
            if r.up and r.stale:
                stale.add(r.index)
            elif r.up and not r.breaker.allows():  # an open breaker: skipped while another can serve
                failing.add(r.index)
        try:
            decision, ticket = self.router.route(hashes, num_tokens, tenant=tenant, exclude=tried | stale | failing)
        except NoReplicaError:
            if not stale and not failing:
                raise
            try:  # a failing replica before a silent one
                decision, ticket = self.router.route(hashes, num_tokens, tenant=tenant, exclude=tried | stale)
            except NoReplicaError:
                if not stale:
                    raise
                decision, ticket = self.router.route(hashes, num_tokens, tenant=tenant, exclude=tried)
        return self.replicas[decision.replica], ticket

    def note_reroute(self) -> None:
        self.num_reroutes += 1

    # ---- views -------------------------------------------------------------------------------
    def to_json(self) -> list[dict[str, Any]]:
        return [r.to_json() for r in sorted(self.replicas.values(), key=lambda r: r.index)]
