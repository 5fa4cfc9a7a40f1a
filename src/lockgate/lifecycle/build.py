"""Putting the server's models together at start-up: the versions `lockgate serve` was given
(`--model`, `--config`, or the one model of old), the registry over them, its admin and metrics.

Every version gets its own engine client and admission queue (registry.py); the first one
keeps the server's engine test hooks.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from lockgate.engine.config import EngineConfig
from lockgate.lifecycle.cores import of_spec, share_threads
from lockgate.lifecycle.policy_metrics import PolicyCollector
from lockgate.lifecycle.admin import ModelAdmin
from lockgate.lifecycle.metrics import RouterCollector, VersionCollector
from lockgate.gateway.model_router import RouterSet
from lockgate.gateway.prompt_features import warm_language_detector
from lockgate.lifecycle.autoscale_metrics import AutoscaleCollector
from lockgate.lifecycle.replica_metrics import ReplicaCollector
from lockgate.lifecycle.models_config import ModelSettings
from lockgate.gateway.gateway import Gateway
from lockgate.lifecycle.registry import EngineOptions, ModelRegistry
from lockgate.lifecycle.spec import DEFAULT_PATH, VersionSpec, validate
from lockgate.observability.metrics import ServerMetrics


@dataclass(slots=True)
class ModelPlan:
    """What to serve: versions in start order, and per-model settings (from a --config file)."""

    specs: list[VersionSpec] = field(default_factory=list)
    settings: dict[str, ModelSettings] = field(default_factory=dict)
    routers: RouterSet = field(default_factory=RouterSet)  # router models (the config's `routers:`)

    def first_engine_config(self, base: EngineConfig) -> EngineConfig:
        """The first version's engine config (test hooks of the server's engine kept)."""
        if not self.specs:
            return base
        cfg = validate(self.specs[0], base)
        cfg.debug_hang_at_step = base.debug_hang_at_step
        return cfg


def single(engine_config: EngineConfig, names: list[str], replicas: int = 1) -> ModelPlan:
    """The one model of a plain `lockgate serve [--model PATH] [--served-model-name ...] [--replicas N]`."""
    return ModelPlan([VersionSpec(name=names[0], aliases=names[1:], path=engine_config.model or DEFAULT_PATH,
                                  replicas=replicas)])


def plan_from_args(models: list[str], config: str | None, served_names: list[str], replicas: int = 1
                   ) -> ModelPlan | None:
    """The plan of `lockgate serve --model ... --config ... --replicas N`; None for a plain single model
    (at most one `--model PATH`: served as before). `replicas` applies to every `--model` and to the
    config's versions that do not set their own. ValueError for bad arguments."""
    from lockgate.lifecycle import models_config
    from lockgate.lifecycle.spec import parse_model_arg

    parsed = [parse_model_arg(m) for m in models]
    if config is None and all(name is None for name, _, _ in parsed):
        if len(parsed) > 1:
            raise ValueError("several --model values need names: --model NAME=PATH or NAME@VERSION=PATH")
        return None
    plan = ModelPlan()
    if config is not None:
        plan.specs, plan.settings = models_config.load(config)
        for spec in plan.specs:
            spec.replicas = spec.replicas or replicas
    for name, version, path in parsed:
        if name is None:
            raise ValueError(f"--model {path!r}: name it (NAME=PATH) when serving several models or a --config")
        spec = VersionSpec(name=name, path=path, replicas=replicas)
        if version is not None:
            spec.version = version
        plan.specs.append(spec)
    if served_names:
        raise ValueError("--served-model-name names the one unnamed model; with NAME=PATH or --config, "
                         "the NAME (or the config's aliases) is the served name")
    if config is not None:  # once every version is known: a rule may name a --model too
        plan.routers = models_config.load_routers(config, plan.specs)
    return plan


def build_registry(plan: ModelPlan, base: EngineConfig, options: EngineOptions, metrics: ServerMetrics,
                   gateway: Gateway) -> tuple[ModelRegistry, ModelAdmin]:
    """Register every planned version (nothing starts until `registry.start()`). Raises ValueError
    for a bad version spec."""

    async def audit(actor: str, action: str, target: str, details: dict[str, Any]) -> None:
        if gateway.astore is None or gateway.store is None:
            return  # open mode without a store: nothing to append to
        store = gateway.store
        await gateway.astore.call(store.append_audit, actor, action, target, details)

    registry = ModelRegistry(options, metrics, audit)
    configs = []
    for i, spec in enumerate(plan.specs):
        configs.append(plan.first_engine_config(base) if i == 0 else validate(spec, base))
        if any(s.ref == spec.ref for s in plan.specs[:i]):
            raise ValueError(f"{spec.ref} is listed twice")
    share_threads([of_spec(s, c) for s, c in zip(plan.specs, configs)])  # threads: lifecycle/cores.py
    for spec, config in zip(plan.specs, configs):
        registry.register(registry.new_version(spec, config))
    for name, s in plan.settings.items():
        model = registry.models[name]
        model.shadow, model.rules = s.shadow, s.rules
        model.fallbacks, model.first_token_timeout_s = list(s.fallbacks), s.first_token_timeout_s
        model.breaker = s.breaker
        for v in model.versions.values():
            v.stats.window = s.rules.window
            registry.apply_breaker(model, v)
    registry.routers = plan.routers
    if "language" in plan.routers.needs:  # its models load in ~1.5 s: not on a request's path
        threading.Thread(target=warm_language_detector, name="language-detector", daemon=True).start()
    metrics.registry.register(VersionCollector(registry))
    metrics.registry.register(RouterCollector(registry.routers))
    metrics.registry.register(ReplicaCollector(registry))
    metrics.registry.register(AutoscaleCollector(registry))
    metrics.registry.register(PolicyCollector(registry))
    return registry, ModelAdmin(registry, base)
