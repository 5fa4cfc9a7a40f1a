"""`lockgate serve --config lockgate.yaml`: the models to serve, their versions, per-version
engine options and traffic weights, shadow and rollback rules (YAML or JSON).

    models:
      - name: smol
        aliases: [SmolLM2-135M-Instruct]        # more names for `model` (optional)
        versions:
          - {version: v1, path: default, traffic: 90, engine: {dtype: float32}}
          - {version: v2, path: default, traffic: 10, engine: {quantization: int8}, replicas: 2}
        shadow: {version: v2, fraction: 0.1}     # optional
        rollback: {max_error_rate: 0.02, min_requests: 50}   # optional (these rules are on by default)

A version may ask for `placement: {num_cpus, num_gpus, resources: {NAME: AMOUNT}}` (where
its replicas are Ray actors, `serve --ray`) and `autoscale: {min_replicas, max_replicas,
policy, ...}` (lifecycle/autoscaler.py; min 0 scales to zero).

A top-level `routers:` list declares router models (gateway/model_router.py, docs/POLICIES.md):
served names whose rules choose one of these models per request.

A model's weights must sum to 100 when any is given; without weights its first version
takes all the traffic. `replicas` (engine processes of a version) defaults to serve's
`--replicas`. The same checks as `POST`/`PATCH /admin/models` apply.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lockgate.gateway.model_router import MAX_ROUTERS, RouterSet, parse_routers
from lockgate.lifecycle.admin import GateBody
from lockgate.lifecycle.breaker import BreakerBody, BreakerConfig
from lockgate.lifecycle.placement import Placement, PlacementBody
from lockgate.lifecycle.settings import (
    MAX_MODELS,
    MAX_VERSIONS,
    AutoscaleBody,
    RollbackBody,
    RollbackRules,
    ShadowBody,
    ShadowConfig,
    Weight,
    check_traffic,
)
from lockgate.lifecycle.spec import DEFAULT_VERSION, MAX_REPLICAS, GateSpec, VersionSpec

_STRICT = ConfigDict(extra="forbid", strict=True)


class _Version(BaseModel):
    model_config = _STRICT
    version: Annotated[str, Field(min_length=1, max_length=64)] = DEFAULT_VERSION
    path: Annotated[str, Field(min_length=1, max_length=4096)] = "default"
    traffic: Weight | None = None
    engine: dict[str, Any] = Field(default_factory=dict)
    gate: bool | GateBody = False
    fail_fraction: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] = 0.0  # TEST ONLY
    replicas: Annotated[int, Field(ge=1, le=MAX_REPLICAS)] | None = None  # None: serve's --replicas
    placement: PlacementBody | None = None  # Ray: resources per replica
    autoscale: AutoscaleBody | None = None  # replicas follow the load between min and max


class _Model(BaseModel):
    model_config = _STRICT
    name: Annotated[str, Field(min_length=1, max_length=128)]
    aliases: Annotated[list[Annotated[str, Field(min_length=1, max_length=256)]], Field(max_length=16)] = \
        Field(default_factory=list)
    versions: Annotated[list[_Version], Field(min_length=1, max_length=MAX_VERSIONS)]
    shadow: ShadowBody | None = None
    rollback: RollbackBody | None = None
    # Gateway policies (fallback.py, breaker.py): other models tried, in order, when this one cannot
    # serve; a first token later than this counts as cannot; the circuit breaker's thresholds.
    fallbacks: Annotated[list[Annotated[str, Field(min_length=1, max_length=256)]], Field(max_length=8)] = \
        Field(default_factory=list)
    first_token_timeout_s: Annotated[float, Field(gt=0, le=3600, allow_inf_nan=False)] | None = None
    breaker: BreakerBody | None = None


class _File(BaseModel):
    model_config = _STRICT
    models: Annotated[list[_Model], Field(min_length=1, max_length=MAX_MODELS)]
    # Router models (gateway/model_router.py): checked against the models by `load_routers`.
    routers: Annotated[list[dict[str, Any]], Field(max_length=MAX_ROUTERS)] | None = None


def _read(path: str) -> _File:
    """The file, parsed and checked field by field; ValueError naming what is wrong."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ValueError(f"--config {path}: {e.strerror or e}") from None
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml  # only for YAML files

            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except Exception as e:  # noqa: BLE001 - any parse error is the file's
        raise ValueError(f"--config {path}: not valid {'YAML' if p.suffix.lower() in ('.yaml', '.yml') else 'JSON'}: "
                         f"{e}") from None
    try:
        parsed = _File.model_validate(raw)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        where = ".".join(str(x) for x in err.get("loc", ())) or "(top level)"
        raise ValueError(f"--config {path}: {where}: {err.get('msg', 'invalid value')}") from None
    return parsed


@dataclass(slots=True)
class ModelSettings:
    shadow: ShadowConfig | None
    rules: RollbackRules
    fallbacks: list[str] = field(default_factory=list)
    first_token_timeout_s: float | None = None
    breaker: BreakerConfig = field(default_factory=BreakerConfig)


def load(path: str) -> tuple[list[VersionSpec], dict[str, ModelSettings]]:
    """The versions to start, in order, and each model's settings; ValueError naming what is wrong."""
    parsed = _read(path)
    specs: list[VersionSpec] = []
    settings: dict[str, ModelSettings] = {}
    for m in parsed.models:
        if m.name in settings:
            raise ValueError(f"--config {path}: model {m.name!r} is listed twice")
        names = [v.version for v in m.versions]
        if len(set(names)) != len(names):
            raise ValueError(f"--config {path}: model {m.name!r} lists a version twice")
        weights = {v.version: v.traffic for v in m.versions if v.traffic is not None}
        if weights:
            try:
                check_traffic({v.version: v.traffic or 0.0 for v in m.versions}, set(names))
            except ValueError as e:
                raise ValueError(f"--config {path}: model {m.name!r}: {e}") from None
        if m.shadow is not None and m.shadow.version not in names:
            raise ValueError(f"--config {path}: model {m.name!r}: shadow version {m.shadow.version!r} is not listed")
        for v in m.versions:
            gate = GateSpec(**v.gate.model_dump()) if isinstance(v.gate, GateBody) else (GateSpec() if v.gate else None)
            try:
                placement = v.placement.placement() if v.placement else Placement()
            except ValueError as e:
                raise ValueError(f"--config {path}: model {m.name!r} version {v.version!r}: {e}") from None
            autoscale = v.autoscale.config() if v.autoscale else None
            replicas = v.replicas or 0
            if autoscale is not None:  # starts at min (at least one, unless the version may sit at zero)
                replicas = max(autoscale.min_replicas, min(replicas or 1, autoscale.max_replicas))
            specs.append(VersionSpec(name=m.name, version=v.version, path=v.path, engine=dict(v.engine),
                                     traffic=(v.traffic or 0.0) if weights else None, aliases=list(m.aliases),
                                     gate=gate, fail_fraction=v.fail_fraction, replicas=replicas,
                                     placement=placement, autoscale=autoscale))
        shadow = None
        if m.shadow is not None:
            shadow = ShadowConfig(m.shadow.version, m.shadow.fraction, m.shadow.max_concurrency)
        settings[m.name] = ModelSettings(shadow, m.rollback.rules() if m.rollback else RollbackRules(),
                                         list(m.fallbacks), m.first_token_timeout_s,
                                         m.breaker.config() if m.breaker else BreakerConfig())
    try:
        check_fallbacks(parsed.models)
    except ValueError as e:
        raise ValueError(f"--config {path}: {e}") from None
    return specs, settings


def check_fallbacks(models: list[_Model]) -> None:
    """Every fallback names a model of the file (by name or alias), never itself, and following
    the chains from any model never comes back to it (a cycle)."""
    names = {m.name: m.name for m in models}
    for m in models:
        for a in m.aliases:
            names.setdefault(a, m.name)
    edges: dict[str, list[str]] = {}
    for m in models:
        seen: set[str] = set()
        for f in m.fallbacks:
            target = names.get(f)
            if target is None:
                raise ValueError(f"model {m.name!r}: fallback {f!r} is not a model of this file")
            if target == m.name:
                raise ValueError(f"model {m.name!r}: falls back to itself")
            if target in seen:
                raise ValueError(f"model {m.name!r}: fallback {f!r} is listed twice")
            seen.add(target)
        edges[m.name] = [names[f] for f in m.fallbacks]
    for start in edges:  # depth-first from each model: a path back to a model on the path is a cycle
        path: list[str] = []

        def walk(node: str) -> None:
            if node in path:
                cycle = " -> ".join([*path[path.index(node):], node])
                raise ValueError(f"fallbacks form a cycle: {cycle}")
            path.append(node)
            for nxt in edges.get(node, []):
                walk(nxt)
            path.pop()

        walk(start)


def load_routers(path: str, specs: list[VersionSpec]) -> RouterSet:
    """The file's router models, each rule's model checked against `specs` (the file's versions:
    a served name or alias, or NAME@VERSION); ValueError naming the router and the rule."""
    raw = _read(path).routers
    served = {n for s in specs for n in (s.name, *s.aliases)}
    refs = served | {f"{n}@{s.version}" for s in specs for n in (s.name, *s.aliases)}
    try:
        return parse_routers(raw, refs.__contains__, served)
    except ValueError as e:
        raise ValueError(f"--config {path}: {e}") from None
