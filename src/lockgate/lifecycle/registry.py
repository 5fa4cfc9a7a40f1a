"""`ModelRegistry`: every served model, its versions (one engine-core process each) and its
release settings (traffic split, shadow, rollback rules); routing a request to a version.

A request names `NAME` (follows the sticky traffic split, gateway/routing.py) or
`NAME@VERSION` (pins it). `route` answers with the request's `Target` (target.py): the
chosen version's engine, config and admission queue, which the request pipeline then
tokenizes, checks, sheds and submits against without knowing there are several. Admin
changes (admin.py) go through `set_traffic`, `set_shadow`, `add`, `remove`.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from lockgate.engine.errors import EngineStartError
from lockgate.engine.config import EngineConfig
from lockgate.engine.frontend.client import AsyncEngineClient
from lockgate.engine.frontend.queue_view import QueueView
from lockgate.engine.sampling_params import SamplingParams
from lockgate.engine.tokenizer import Tokenizer
from lockgate.gateway.admission import Admission, AdmissionPolicy, QueueBounds
from lockgate.gateway.model_router import RouterSet
from lockgate.gateway.routing import pick, split_ref, sticky_point
from lockgate.lifecycle import fallback, ray_cluster, rollback
from lockgate.lifecycle.autoscale_loop import AutoscaleLoop
from lockgate.lifecycle.autoscale_types import Decision
from lockgate.lifecycle.autoscaler import Autoscaler
from lockgate.lifecycle.breaker import BreakerConfig
from lockgate.lifecycle.fleet import Fleet
from lockgate.lifecycle.gate import run_gate
from lockgate.lifecycle.hedge import Hedger
from lockgate.lifecycle.router import RouterConfig
from lockgate.lifecycle.settings import RollbackRules, ShadowConfig
from lockgate.lifecycle.shadow import ShadowRunner
from lockgate.lifecycle.spec import VersionSpec
from lockgate.lifecycle.stats import OnEnd, Outcome, ShadowStats
from lockgate.lifecycle.target import Target
from lockgate.lifecycle.version import ModelVersion, State
from lockgate.errors import APIError, model_not_found, unavailable
from lockgate.gateway.classes import ClassTable
from lockgate.observability.metrics import ServerMetrics

log = logging.getLogger("lockgate.lifecycle")

# (actor, action, target, details) -> the audit record is on disk
Audit = Callable[[str, str, str, dict[str, Any]], Awaitable[None]]
MAX_ROLLBACK_HISTORY = 20


@dataclass(frozen=True, slots=True)
class EngineOptions:
    """What the server's configuration says about every version's engine and admission queue."""

    classes: ClassTable
    slo_admission: bool = True
    max_queued_requests: int = 256
    max_queued_tokens: int = 262_144
    startup_timeout_s: float = 600.0
    stall_timeout_s: float = 60.0
    router_policy: str = "kv"  # router.POLICIES: "kv", or a peer policy to measure it against
    # Replicas as Ray actors (`serve --ray`): the cluster this process joined; None: local processes.
    ray: ray_cluster.RayCluster | None = field(default_factory=ray_cluster.active)


@dataclass(slots=True)
class Model:
    name: str
    aliases: list[str] = field(default_factory=list)
    versions: dict[str, ModelVersion] = field(default_factory=dict)  # in load order
    traffic: dict[str, float] = field(default_factory=dict)  # version -> weight; sums to 100 once any is set
    shadow: ShadowConfig | None = None
    shadow_stats: dict[str, ShadowStats] = field(default_factory=dict)  # per shadow version
    rules: RollbackRules = field(default_factory=RollbackRules)
    rollbacks: list[dict[str, Any]] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)  # models tried in order when this one cannot serve
    first_token_timeout_s: float | None = None  # no first token by then: the next fallback (if any)
    breaker: BreakerConfig = field(default_factory=BreakerConfig)

    def share(self, version: str) -> float:
        total = sum(self.traffic.values())
        return self.traffic.get(version, 0.0) / total if total > 0 else 0.0

    def stable(self) -> str | None:
        return rollback.stable_version(self.traffic, list(self.versions))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "aliases": self.aliases, "stable": self.stable(),
                "traffic": {v: w for v, w in self.traffic.items() if w > 0},
                "shadow": self.shadow.to_json() if self.shadow else None, "rollback": self.rules.to_json(),
                "versions": [v.to_json(self.share(name)) for name, v in self.versions.items()],
                "rollbacks": self.rollbacks, "fallbacks": self.fallbacks,
                "first_token_timeout_s": self.first_token_timeout_s, "breaker": self.breaker.to_json()}


class ModelRegistry:
    def __init__(self, options: EngineOptions, metrics: ServerMetrics, audit: Audit) -> None:
        self.options = options
        self.metrics = metrics
        self.audit = audit
        self.models: dict[str, Model] = {}
        self._names: dict[str, str] = {}  # served name or alias -> model name
        self._tasks: set[asyncio.Task[Any]] = set()
        self.lowest_priority = len(options.classes.names) - 1  # shadows and gates: the lowest class
        self.shadows = ShadowRunner(self.lowest_priority)
        self.on_rollback: list[Callable[[str, str, str], None]] = []  # (model, version, rule): metrics
        self.hedger = Hedger()  # hedged requests' delays and budget (hedge.py)
        self.fallbacks_taken: dict[tuple[str, str, str], int] = {}  # (from, to, code) -> requests moved
        self.routers = RouterSet()  # router models: served names that choose a model per request

    # ---- building ----------------------------------------------------------------------
    def new_version(self, spec: VersionSpec, engine_config: EngineConfig) -> ModelVersion:
        """A version with its fleet of engine replicas and its admission queue (nothing starts yet)."""
        opts, metrics = self.options, self.metrics

        def make_client(queue: QueueView) -> AsyncEngineClient:
            transport = None
            if opts.ray is not None:  # the replica is a Ray actor placed by the version's resources
                transport = opts.ray.transport(spec.ref, spec.placement, opts.startup_timeout_s)
            return AsyncEngineClient(engine_config, startup_timeout_s=opts.startup_timeout_s,
                                     stall_timeout_s=opts.stall_timeout_s, queue=queue, transport=transport)

        router = RouterConfig(block_size=engine_config.block_size, policy=opts.router_policy,
                              fair_share=engine_config.scheduling_policy == "priority")
        fleet = Fleet(spec.ref, engine_config, spec.replicas, make_client, router)
        self._share_tokenizer(fleet)
        policy = AdmissionPolicy(opts.classes, slo=opts.slo_admission, fcfs=engine_config.scheduling_policy == "fcfs",
                                 aging_s=engine_config.priority_aging_s)
        admission = Admission(QueueBounds(opts.max_queued_requests, opts.max_queued_tokens), fleet.queue, policy,
                              metrics.reject, lambda: metrics.ttft_ema_s)
        version = ModelVersion(spec, engine_config, fleet, admission)
        if spec.autoscale is not None:
            self.set_autoscale(version, spec.autoscale)
        fleet.on_restart = lambda: log.warning("an engine core of %s restarted (%d restarts so far)",
                                               spec.ref, fleet.num_restarts)
        return version

    def set_autoscale(self, version: ModelVersion, config: Any) -> None:
        """Give the version an autoscaler (started once it is ready; at once when it already is)."""
        ref = version.spec.ref

        async def audited(d: Decision) -> None:
            await self.audit("system", "model.autoscale", ref, {"policy": config.policy, **d.to_json()})

        version.autoscaler = AutoscaleLoop(version.fleet, Autoscaler(config), version.admission, audited)
        if version.state is State.READY:
            version.autoscaler.start()

    def _share_tokenizer(self, fleet: Fleet) -> None:
        """A checkpoint some version already serves: take its tokenizer instead of loading it again in
        this process (that holds the GIL for seconds: every stream's latency would show it)."""
        from lockgate.engine.config import checkpoint_load_format

        cfg = fleet.config
        for v in self.versions():
            other = v.fleet
            if (other.tokenizer is not None and other.model_config is not None and other.config.model == cfg.model
                    and checkpoint_load_format(other.config.load_format) == checkpoint_load_format(cfg.load_format)):
                fleet.tokenizer, fleet.model_config = other.tokenizer, other.model_config
                return

    def register(self, version: ModelVersion) -> Model:
        spec = version.spec
        model = self.models.get(spec.name)
        if model is None:
            model = self.models[spec.name] = Model(spec.name, list(spec.aliases))
            self._names[spec.name] = spec.name
            for alias in spec.aliases:
                self._names.setdefault(alias, spec.name)
        model.versions[spec.version] = version
        self.apply_breaker(model, version)
        if spec.traffic is not None:
            model.traffic[spec.version] = float(spec.traffic)
        return model

    @staticmethod
    def apply_breaker(model: Model, version: ModelVersion) -> None:
        """The model's breaker thresholds on the version and on each of its replicas (new ones too)."""
        version.breaker.config = model.breaker
        version.fleet.breaker_config = model.breaker
        for r in version.fleet.replicas.values():
            r.breaker.config = model.breaker

    async def start(self) -> None:
        """Load every registered version at once (server start-up); a failure stops the start."""
        for m in self.models.values():
            if not any(w > 0 for w in m.traffic.values()):
                m.traffic = {next(iter(m.versions)): 100.0}  # a model's first version takes its traffic
        versions = [v for m in self.models.values() for v in m.versions.values()]
        await asyncio.gather(*(self._load(v) for v in versions))
        failed = [v for v in versions if v.state is State.FAILED]
        if failed:
            raise EngineStartError("; ".join(f"{v.spec.ref}: {v.reason}" for v in failed))

    def load_in_background(self, version: ModelVersion) -> None:
        task = asyncio.get_running_loop().create_task(self._load(version, background=True),
                                                      name=f"load {version.spec.ref}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        version.load_task = task

    async def _load(self, version: ModelVersion, background: bool = False) -> None:
        gate = self._gate if version.spec.gate is not None else None
        if await version.load(gate, background):
            model = self.models.get(version.name)
            if model is not None and not any(w > 0 for w in model.traffic.values()):
                model.traffic = {version.version: 100.0}  # a new model's first ready version

    async def _gate(self, version: ModelVersion) -> dict[str, Any]:
        spec = version.spec.gate
        assert spec is not None
        model = self.models[version.name]
        ref_name = spec.against or model.stable()
        ref = model.versions.get(ref_name) if ref_name and ref_name != version.version else None
        while ref is not None and ref.state in (State.LOADING, State.WARMING):  # loading with it (start-up)
            await asyncio.sleep(0.2)
        if ref is not None and not ref.available:
            raise RuntimeError(f"quality gate: reference version {ref_name!r} is not ready")
        return await run_gate(version.fleet, ref.fleet if ref else None, ref.version if ref else None,
                              spec, self.lowest_priority)

    async def shutdown(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await self.shadows.close()
        versions = [v for m in self.models.values() for v in m.versions.values()]
        await asyncio.gather(*(v.stop() for v in versions), return_exceptions=True)

    # ---- routing ----------------------------------------------------------------------
    @property
    def default(self) -> Model:
        return next(iter(self.models.values()))

    def resolve(self, requested: str | None) -> tuple[Model, str | None]:
        """The model and pinned version (None: follow the split) a `model` field names; 404 otherwise."""
        if requested is None:
            return self.default, None
        name = self._names.get(requested)
        if name is not None:
            return self.models[name], None
        base, version = split_ref(requested)
        name = self._names.get(base)
        if name is None or version is None or version not in self.models[name].versions:
            raise model_not_found(requested)
        return self.models[name], version

    def pick(self, model: Model, pinned: str | None, key: str | None) -> ModelVersion:
        """The version that serves this request: the pinned one, or the split's (sticky on `key`)."""
        if pinned is not None:
            v = model.versions[pinned]
            if v.state is not State.READY:  # a restarting core is the routes' usual 503 engine_unavailable
                detail = f": {v.reason}" if v.state is State.FAILED and v.reason else ""
                raise unavailable(f"model version `{model.name}@{pinned}` is {v.state}{detail}",
                                  "model_version_unavailable",
                                  retry_after_s=5 if v.state in (State.LOADING, State.WARMING) else None)
            if not v.breaker.allows() and model.fallbacks:  # skipped only where there is somewhere else to go
                raise _circuit_open(f"{model.name}@{pinned}", v)
            return v
        point = sticky_point(model.name, key)
        ready = {n for n, v in model.versions.items() if v.state is State.READY}
        closed = {n for n in ready if model.versions[n].breaker.allows()}  # an open breaker: skipped
        if not closed and not model.fallbacks:
            closed = ready  # nowhere else to go: failing fast would only add downtime
        healthy = {n for n in closed if model.versions[n].fleet.healthy}
        chosen = pick(model.traffic, point, healthy) or pick(model.traffic, point, closed)
        if chosen is None:
            if ready:  # every ready version's breaker is open: the fallbacks take it, at no cost
                raise _circuit_open(model.name, model.versions[next(iter(ready))])
            raise unavailable(f"model `{model.name}` has no version ready to serve", "engine_unavailable",
                              retry_after_s=5)
        return model.versions[chosen]

    def tokenizer_of(self, requested: str) -> Tokenizer | None:
        """The tokenizer of the model a name serves (a router's prompt features), None when the
        name is unknown or its engine has not loaded yet."""
        try:
            model, pinned = self.resolve(requested)
        except APIError:
            return None
        version = model.versions.get(pinned or model.stable() or "") or next(iter(model.versions.values()), None)
        return version.fleet.tokenizer if version is not None else None

    def route(self, requested: str | None, key: str | None, may_use: Callable[[str], None]) -> Target:
        """The target of one request: the model its `model` field names (404 when unknown), the
        caller's right to it (`may_use(model name)` raises: checked before any version's state can
        show), then the pinned version or the split's, sticky on `key`."""
        model, pinned = self.resolve(requested)
        may_use(model.name)
        version = self.pick(model, pinned, key)
        target = Target(version, (model.name, *model.aliases), self._on_outcome, self._mirror)
        target.probe = version.breaker.acquire()
        return target

    # ---- fallbacks ----------------------------------------------------------------------
    def fallback_chain(self, requested: str | None) -> list[str]:
        """The models a request for `requested` may fall back to, in order (fallback.py)."""
        try:
            model, _ = self.resolve(requested)
        except Exception:  # noqa: BLE001 - an unknown name has no fallbacks (its 404 comes from route)
            return []

        def of(name: str) -> list[str]:
            found = self._names.get(name)
            return list(self.models[found].fallbacks) if found is not None else []

        return [self._names[n] for n in fallback.chain(model.name, of) if n in self._names]

    def other_version(self, target: Target) -> ModelVersion | None:
        """Another ready, healthy version of the target's model whose breaker allows it (a hedge's)."""
        model = self.models.get(target.version.name)
        if model is None:
            return None
        for name, v in model.versions.items():
            if (v is not target.version and v.state is State.READY and v.fleet.healthy and v.breaker.allows()
                    and model.traffic.get(name, 0) > 0):
                return v
        return None

    def first_token_timeout(self, target: Target) -> float | None:
        model = self.models.get(target.version.name)
        return model.first_token_timeout_s if model is not None else None

    def count_fallback(self, source: str, dest: str, code: str) -> None:
        key = (source, dest, code)
        self.fallbacks_taken[key] = self.fallbacks_taken.get(key, 0) + 1
        log.info("fallback: %s -> %s (%s)", source, dest, code)

    # ---- observing ----------------------------------------------------------------------
    def _on_outcome(self, version: ModelVersion, outcome: Outcome, probe: bool = False) -> None:
        version.breaker.record(outcome.ok, probe)
        version.stats.record(outcome)
        model = self.models.get(version.name)
        if model is not None and model.versions.get(version.version) is version:
            self._check_rules(model)

    def _mirror(self, version: ModelVersion, request_id: str, prompt: list[int], params: SamplingParams
                ) -> OnEnd | None:
        model = self.models.get(version.name)
        cfg = model.shadow if model is not None else None
        if model is None or cfg is None or cfg.version == version.version:
            return None
        shadow = model.versions.get(cfg.version)
        if shadow is None:
            return None
        stats = model.shadow_stats.setdefault(cfg.version, ShadowStats(window=model.rules.window))
        return self.shadows.mirror(shadow, cfg, stats, request_id, prompt, params,
                                   lambda _pair: self._check_rules(model))

    def _check_rules(self, model: Model) -> None:
        shadow = None
        if model.shadow is not None and model.shadow.version in model.shadow_stats:
            shadow = (model.shadow.version, model.shadow_stats[model.shadow.version])
        exempt = {v for v, ver in model.versions.items() if ver.rolled_back is not None}
        stats = {v: ver.stats for v, ver in model.versions.items()}
        for breach in rollback.check(model.rules, model.traffic, list(model.versions), stats, shadow, exempt):
            self._roll_back(model, breach)

    def _roll_back(self, model: Model, breach: rollback.Breach) -> None:
        """Traffic of the breaching version to 0 at once (its share to the stable version), then
        the audit record, the metric and the log line."""
        version = model.versions[breach.version]
        before = dict(model.traffic)
        share = model.traffic.pop(breach.version, 0.0)
        stable = model.stable()
        if share > 0 and stable is not None:
            model.traffic[stable] = model.traffic.get(stable, 0.0) + share
        event = {"version": breach.version, "rule": breach.rule, "figures": breach.figures,
                 "traffic_before": before, "traffic_after": dict(model.traffic), "at": time.time()}
        version.rolled_back = event
        model.rollbacks = [*model.rollbacks, event][-MAX_ROLLBACK_HISTORY:]
        log.warning("automatic rollback of %s@%s: %s; traffic now %s", model.name, breach.version,
                    breach.message(), model.traffic)
        for fn in self.on_rollback:
            fn(model.name, breach.version, breach.rule)
        self.spawn(self.audit("system", "model.rollback", f"{model.name}@{breach.version}", event))

    def spawn(self, coro: Awaitable[Any]) -> None:
        """Fire and forget, kept referenced until done (an audit write, a drain)."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)

    # ---- state for /health and /metrics --------------------------------------------------
    @property
    def healthy(self) -> bool:
        """Every model with a traffic split can serve it (one of its versions is up), and one has one."""
        live = [m for m in self.models.values() if any(w > 0 for w in m.traffic.values())]
        return bool(live) and all(
            any(m.versions[v].available for v, w in m.traffic.items() if w > 0 and v in m.versions) for m in live)

    def versions(self) -> Iterator[ModelVersion]:
        for m in self.models.values():
            yield from m.versions.values()

    @property
    def degraded(self) -> bool:
        """Some version taking traffic has fewer replicas up than configured (it still serves)."""
        return any(v.fleet.degraded for m in self.models.values() for name, v in m.versions.items()
                   if m.traffic.get(name, 0) > 0 and v.state is State.READY)

    def fleets(self) -> list[Fleet]:
        return [v.fleet for v in self.versions()]


def _circuit_open(name: str, version: ModelVersion) -> Exception:
    b = version.breaker
    retry = max(1, int(b.to_json().get("reopens_in_s", 1) + 0.999))
    return unavailable(f"`{name}` is failing ({b.last_reason}); its circuit breaker is open, retry in {retry} s",
                       "circuit_open", retry_after_s=retry)


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("model lifecycle task failed: %s", task.exception())
