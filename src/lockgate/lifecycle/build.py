"""Putting the server's models together at start-up: the versions `lockgate serve` was given
(`--model`, `--config`, or the one model of old), the registry over them, its admin and metrics.

Every version gets its own engine client and admission queue (registry.py); the first one
keeps the server's engine test hooks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lockgate.engine.config import EngineConfig
from lockgate.lifecycle.admin import ModelAdmin
from lockgate.lifecycle.metrics import VersionCollector
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

    def first_engine_config(self, base: EngineConfig) -> EngineConfig:
        """The first version's engine config (test hooks of the server's engine kept)."""
        if not self.specs:
            return base
        cfg = validate(self.specs[0], base)
        cfg.debug_hang_at_step = base.debug_hang_at_step
        return cfg


def single(engine_config: EngineConfig, names: list[str]) -> ModelPlan:
    """The one model of a plain `lockgate serve [--model PATH] [--served-model-name ...]`."""
    return ModelPlan([VersionSpec(name=names[0], aliases=names[1:], path=engine_config.model or DEFAULT_PATH)])


def plan_from_args(models: list[str], config: str | None, served_names: list[str]) -> ModelPlan | None:
    """The plan of `lockgate serve --model ... --config ...`; None for a plain single model (at
    most one `--model PATH`: served as before). ValueError for bad arguments."""
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
    for name, version, path in parsed:
        if name is None:
            raise ValueError(f"--model {path!r}: name it (NAME=PATH) when serving several models or a --config")
        spec = VersionSpec(name=name, path=path)
        if version is not None:
            spec.version = version
        plan.specs.append(spec)
    if served_names:
        raise ValueError("--served-model-name names the one unnamed model; with NAME=PATH or --config, "
                         "the NAME (or the config's aliases) is the served name")
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
    for i, spec in enumerate(plan.specs):
        config = plan.first_engine_config(base) if i == 0 else validate(spec, base)
        if spec.name in registry.models and spec.version in registry.models[spec.name].versions:
            raise ValueError(f"{spec.ref} is listed twice")
        registry.register(registry.new_version(spec, config))
    for name, s in plan.settings.items():
        model = registry.models[name]
        model.shadow, model.rules = s.shadow, s.rules
        for v in model.versions.values():
            v.stats.window = s.rules.window
    metrics.registry.register(VersionCollector(registry))
    return registry, ModelAdmin(registry, base)
