"""The model admin operations behind `/admin/models`: load, change traffic/shadow/rules, unload.

Every operation validates its whole body first (400 naming the field, 404 for an unknown
model or version, 409 for a state that forbids it) and only then changes anything, all
at once, under one lock; the audit record is written before the answer, and a change
whose audit record cannot be written is undone (503): nothing is half-applied and every
applied change, and only those, is audited.
"""
from __future__ import annotations

import asyncio
import json
import logging
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from lockgate.bodies import parse_body
from lockgate.engine.config import EngineConfig
from lockgate.engine.errors import EngineUnavailableError
from lockgate.lifecycle.cores import Engines, most_engines, of_spec, share_threads
from lockgate.lifecycle.registry import Model, ModelRegistry
from lockgate.lifecycle.autoscale_types import AutoscaleConfig
from lockgate.lifecycle.placement import Placement, PlacementBody
from lockgate.lifecycle.settings import (
    MAX_ENGINES,
    MAX_MODELS,
    MAX_REPLICAS,
    MAX_VERSIONS,
    AutoscaleBody,
    ModelPatch,
    ReplicaBounds,
    ShadowConfig,
    check_traffic,
)
from lockgate.lifecycle.spec import ENGINE_OPTION_NAMES, GateSpec, VersionSpec, validate
from lockgate.lifecycle.version import ModelVersion, State
from lockgate.errors import APIError, bad_request, field_error, unavailable

log = logging.getLogger("lockgate.lifecycle")

_STRICT = ConfigDict(extra="forbid", strict=True)
_Unit = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
LOAD_FIELDS = ("name", "version", "path", "gate", "fail_fraction", "replicas", "placement", "autoscale")


class GateBody(BaseModel):
    model_config = _STRICT
    against: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    min_agreement: _Unit = 0.4
    max_accuracy_drop: _Unit = 0.1
    min_accuracy: _Unit = 0.0
    max_tokens: Annotated[int, Field(ge=1, le=256)] = 16


class LoadBody(BaseModel):
    """`POST /admin/models`: these fields, and any engine option (spec.EngineOptions) beside them."""

    model_config = _STRICT
    name: Annotated[str, Field(min_length=1, max_length=128)]
    version: Annotated[str, Field(min_length=1, max_length=64)]
    path: Annotated[str, Field(min_length=1, max_length=4096)]
    gate: bool | GateBody = False  # pass the quality gate (lifecycle/gate.py) before taking traffic
    fail_fraction: _Unit = 0.0  # TEST ONLY: fail this fraction of the version's requests
    replicas: Annotated[int, Field(ge=1, le=MAX_REPLICAS)] = 1  # engine processes (lifecycle/fleet.py)
    placement: PlacementBody | None = None  # Ray: what one replica asks of the cluster
    autoscale: AutoscaleBody | None = None  # the count follows the load (lifecycle/autoscaler.py)


def conflict(message: str, code: str) -> APIError:
    return APIError(409, message, code=code)


def not_found(message: str) -> APIError:
    return APIError(404, message, code="model_not_found")


class ModelAdmin:
    def __init__(self, registry: ModelRegistry, base: EngineConfig) -> None:
        self.registry = registry
        self.base = base  # the server's engine options: what a version does not set
        self._lock = asyncio.Lock()

    def _model(self, name: str) -> Model:
        model = self.registry.models.get(name)
        if model is None:
            raise not_found(f"model {_shown(name)} is not served")
        return model

    def _version(self, model: Model, version: str) -> ModelVersion:
        v = model.versions.get(version)
        if v is None:
            raise not_found(f"model {model.name!r} has no version {_shown(version)}")
        return v

    # ---- reads -----------------------------------------------------------------------
    def list(self) -> dict[str, Any]:
        return {"object": "list", "data": [m.to_json() for m in self.registry.models.values()]}

    def get(self, name: str) -> dict[str, Any]:
        return self._model(name).to_json()

    def compare(self, name: str) -> dict[str, Any]:
        m = self._model(name)
        versions = {v: {"state": str(ver.state), "traffic_share": round(m.share(v), 6), **ver.stats.to_json(),
                        "rolled_back": ver.rolled_back is not None} for v, ver in m.versions.items()}
        shadow = None
        if m.shadow is not None:
            stats = m.shadow_stats.get(m.shadow.version)
            shadow = {**m.shadow.to_json(), **(stats.to_json() if stats else {})}
        return {"model": m.name, "stable": m.stable(), "versions": versions, "shadow": shadow,
                "rollback": m.rules.to_json(), "rollbacks": m.rollbacks}

    # ---- load ------------------------------------------------------------------------
    async def load(self, raw: bytes, actor: str) -> dict[str, Any]:
        spec, engine_config = self._parse_load(raw)
        reg = self.registry
        async with self._lock:
            model = reg.models.get(spec.name)
            if model is None and spec.name in reg._names:
                raise conflict(f"{spec.name!r} is another model's alias", "model_exists")
            if model is not None and spec.version in model.versions:
                raise conflict(f"{spec.ref} exists (state {model.versions[spec.version].state}); delete it first",
                               "version_exists")
            if model is None and len(reg.models) >= MAX_MODELS:
                raise conflict(f"at most {MAX_MODELS} models are served", "too_many_models")
            if model is not None and len(model.versions) >= MAX_VERSIONS:
                raise conflict(f"model {spec.name!r} has {MAX_VERSIONS} versions, the most it may have; "
                               "delete one first", "too_many_versions")
            self._check_engines({}, most_engines(spec))
            if spec.gate is not None and spec.gate.against is not None and (
                    model is None or spec.gate.against not in model.versions):
                raise bad_request(f"gate.against: {spec.name!r} has no version {spec.gate.against!r}",
                                  param="gate.against")
            self._share_threads(spec, engine_config)
            version = reg.new_version(spec, engine_config)
            created = model is None
            reg.register(version)
            details = {"path": spec.path, "engine": spec.engine, "gate": spec.gate is not None,
                       "replicas": spec.replicas, "placement": spec.placement.to_json(),
                       "autoscale": _autoscale_json(spec.autoscale),
                       "fail_fraction": spec.fail_fraction or None}
            try:
                await reg.audit(actor, "model.load", spec.ref, details)
            except Exception:
                self._unregister(spec, created)
                await version.stop()
                raise unavailable("the audit log is not writable; nothing was changed", "store_unavailable") from None
            reg.load_in_background(version)
        log.info("loading %s from %s (%s)", spec.ref, spec.path, actor)
        return version.to_json(0.0) | {"name": spec.name}

    def _parse_load(self, raw: bytes) -> tuple[VersionSpec, EngineConfig]:
        try:
            body = json.loads(raw) if raw else None
        except ValueError as e:
            raise bad_request(f"the request body is not valid JSON: {e}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object")
        known = {k: v for k, v in body.items() if k in LOAD_FIELDS}
        parsed = parse_body(LoadBody, known, errors=field_error)
        gate = None
        if parsed.gate is True:
            gate = GateSpec()
        elif isinstance(parsed.gate, GateBody):
            gate = GateSpec(**parsed.gate.model_dump())
        autoscale = parsed.autoscale.config() if parsed.autoscale is not None else None
        replicas = parsed.replicas
        if autoscale is not None:  # starts inside its bounds (at least one: the version must warm up)
            replicas = max(autoscale.min_replicas, min(replicas, autoscale.max_replicas), 1)
        try:
            placement = parsed.placement.placement() if parsed.placement is not None else Placement()
        except ValueError as e:
            raise bad_request(str(e), param="placement.resources") from None
        spec = VersionSpec(name=parsed.name, version=parsed.version, path=parsed.path,
                           engine={k: v for k, v in body.items() if k not in LOAD_FIELDS}, gate=gate,
                           fail_fraction=parsed.fail_fraction, replicas=replicas, placement=placement,
                           autoscale=autoscale)
        try:
            return spec, validate(spec, self.base)
        except ValueError as e:
            raise bad_request(str(e), param=_param_of(str(e))) from None

    def _share_threads(self, spec: VersionSpec, engine_config: EngineConfig) -> None:
        """The new version's share of the cores among the engine processes running once it is added
        (lifecycle/cores.py, as at start-up). The running engines keep their threads: a core sets
        them when it starts, so an even share for them too takes a restart."""
        running = [Engines(v.spec.ref, v.fleet.max_engines, v.engine_config) for v in self.registry.versions()
                   if v.state not in (State.DRAINING, State.FAILED)]  # those are stopping or stopped
        share_threads([of_spec(spec, engine_config)], running)

    def _unregister(self, spec: VersionSpec, created: bool) -> None:
        reg = self.registry
        model = reg.models.get(spec.name)
        if model is None:
            return
        model.versions.pop(spec.version, None)
        if created and not model.versions:
            del reg.models[spec.name]
            reg._names.pop(spec.name, None)

    # ---- change ------------------------------------------------------------------------
    async def patch(self, name: str, raw: bytes, actor: str, drain_timeout_s: float = 30.0) -> dict[str, Any]:
        body = parse_body(ModelPatch, raw, errors=field_error)
        given = body.model_fields_set
        if not given:
            raise bad_request("nothing to change: send traffic, shadow, rollback and/or replicas")
        async with self._lock:
            model = self._model(name)
            replicas = self._check_replicas(model, body.replicas) if "replicas" in given else None
            given = given - {"replicas"}
            if not given:
                assert replicas is not None
                await self._set_replicas(model, replicas, actor, drain_timeout_s)
                return model.to_json()
            new_traffic = None
            if "traffic" in given:
                if body.traffic is None:
                    raise bad_request("traffic: cannot be null (the split must sum to 100)", param="traffic")
                try:
                    new_traffic = {v: float(w) for v, w in check_traffic(body.traffic, set(model.versions)).items()
                                   if w > 0}
                except ValueError as e:
                    raise bad_request(f"traffic: {e}", param="traffic") from None
                for v in new_traffic:
                    ver = model.versions[v]
                    if ver.state is not State.READY:
                        raise conflict(f"version {v!r} is {ver.state}; only a ready version can take traffic",
                                       "version_not_ready")
            new_shadow: ShadowConfig | None = model.shadow
            if "shadow" in given:
                if body.shadow is None:
                    new_shadow = None
                else:
                    target = self._version(model, body.shadow.version)
                    if target.state in (State.FAILED, State.DRAINING):
                        raise conflict(f"version {body.shadow.version!r} is {target.state}", "version_not_ready")
                    new_shadow = ShadowConfig(body.shadow.version, body.shadow.fraction, body.shadow.max_concurrency)
            new_rules = body.rollback.rules() if "rollback" in given and body.rollback is not None else model.rules
            if "rollback" in given and body.rollback is None:
                raise bad_request("rollback: cannot be null (send {\"enabled\": false} to turn it off)",
                                  param="rollback")
            before = (dict(model.traffic), model.shadow, model.rules)
            self._apply(model, new_traffic, new_shadow, new_rules)
            details = {"traffic": model.traffic, "shadow": model.shadow.to_json() if model.shadow else None,
                       "rollback": model.rules.to_json(), "changed": sorted(given),
                       "traffic_before": before[0]}
            try:
                await self.registry.audit(actor, "model.update", name, details)
            except Exception:
                model.traffic, model.shadow, model.rules = before
                raise unavailable("the audit log is not writable; nothing was changed", "store_unavailable") from None
            log.info("model %s updated by %s: traffic %s, shadow %s", name, actor, model.traffic,
                     model.shadow.to_json() if model.shadow else None)
            if replicas is not None:
                await self._set_replicas(model, replicas, actor, drain_timeout_s)
        return model.to_json()

    def _check_replicas(self, model: Model, replicas: dict[str, int | ReplicaBounds] | None
                        ) -> dict[str, int | ReplicaBounds]:
        if replicas is None:
            raise bad_request("replicas: cannot be null (send {\"VERSION\": N})", param="replicas")
        for v in replicas:
            ver = self._version(model, v)
            if ver.state in (State.FAILED, State.DRAINING):
                raise conflict(f"version {v!r} is {ver.state}; its replicas cannot change", "version_not_ready")
        self._check_engines({model.versions[v].spec.ref: n if isinstance(n, int) else n.max_replicas
                             for v, n in replicas.items()}, 0)
        return replicas

    def _check_engines(self, changed: dict[str, int], added: int) -> None:
        """At most MAX_ENGINES engine processes on this server (409 beyond)."""
        total = added + sum(changed.get(v.spec.ref, v.fleet.max_engines) for v in self.registry.versions()
                            if v.state is not State.DRAINING)
        if total > MAX_ENGINES:
            raise conflict(f"this would run {total} engine processes; at most {MAX_ENGINES} run on one server",
                           "too_many_engines")

    async def _set_replicas(self, model: Model, replicas: dict[str, int | ReplicaBounds], actor: str,
                            drain_timeout_s: float) -> None:
        """Audited first (nothing changes when the audit log cannot be written), then applied: new
        replicas load in the background, extra ones drain before they stop. An autoscaled version (or
        one given bounds) gets new bounds, and its count is brought inside them at once; the autoscaler
        moves it from there."""
        changes: dict[str, dict[str, Any]] = {}
        for v, n in replicas.items():
            ver = model.versions[v]
            if isinstance(n, int) and ver.autoscaler is None:
                changes[v] = {"before": ver.fleet.configured, "after": n}
            else:
                lo, hi = (n, n) if isinstance(n, int) else (n.min_replicas, n.max_replicas)
                before = ver.autoscaler.autoscaler.config if ver.autoscaler is not None else None
                changes[v] = {"before": _bounds(before) if before else ver.fleet.configured,
                              "after": {"min_replicas": lo, "max_replicas": hi}}
        try:
            await self.registry.audit(actor, "model.replicas", model.name, {"replicas": changes})
        except Exception:
            raise unavailable("the audit log is not writable; nothing was changed", "store_unavailable") from None
        for v, n in replicas.items():
            ver = model.versions[v]
            if isinstance(n, int) and ver.autoscaler is None:
                await ver.fleet.set_replicas(n, drain_timeout_s)
                continue
            after = changes[v]["after"]
            if ver.autoscaler is None:
                self.registry.set_autoscale(ver, AutoscaleConfig(**after))
            else:
                ver.autoscaler.set_bounds(after["min_replicas"], after["max_replicas"])
            count = ver.fleet.num_ready + ver.fleet.num_starting
            clamped = max(after["min_replicas"], min(count, after["max_replicas"]))
            if clamped != count:
                await ver.fleet.set_replicas(clamped)
        log.info("model %s replicas set by %s: %s", model.name, actor, changes)

    @staticmethod
    def _apply(model: Model, traffic: dict[str, float] | None, shadow: ShadowConfig | None,
               rules: Any) -> None:
        if traffic is not None:
            for v, ver in model.versions.items():
                if traffic.get(v, 0.0) != model.traffic.get(v, 0.0):
                    ver.stats.reset_window()  # a deliberate change starts a fresh judgement
                    ver.rolled_back = None
            model.traffic = traffic
        if shadow is not None and (model.shadow is None or model.shadow.version != shadow.version):
            model.shadow_stats.pop(shadow.version, None)  # new comparison, new figures
        model.shadow = shadow
        model.rules = rules
        for ver in model.versions.values():
            ver.stats.window = rules.window

    # ---- unload ------------------------------------------------------------------------
    async def unload(self, name: str, version: str, actor: str, drain_timeout_s: float) -> dict[str, Any]:
        reg = self.registry
        async with self._lock:
            model = self._model(name)
            v = self._version(model, version)
            others = [n for n in model.versions if n != version]
            if model.traffic.get(version, 0) > 0 and others:
                raise conflict(f"{name}@{version} takes {model.share(version):.0%} of the traffic; move it to "
                               "another version (PATCH traffic) before unloading", "version_has_traffic")
            if v.state is State.DRAINING:
                raise conflict(f"{name}@{version} is already draining", "version_draining")
            before = (dict(model.traffic), model.shadow, v.state)
            was_loading = v.state in (State.LOADING, State.WARMING)
            model.traffic.pop(version, None)
            if model.shadow is not None and model.shadow.version == version:
                model.shadow = None
            v.state = State.DRAINING
            try:
                await reg.audit(actor, "model.unload", f"{name}@{version}", {"state_before": str(before[2])})
            except Exception:
                model.traffic, model.shadow, v.state = before
                raise unavailable("the audit log is not writable; nothing was changed", "store_unavailable") from None
            if was_loading and v.load_task is not None:
                v.load_task.cancel()
            reg.spawn(self._drain_and_remove(model, v, drain_timeout_s))
        log.info("unloading %s@%s (%s)", name, version, actor)
        return v.to_json(0.0) | {"name": name}

    async def _drain_and_remove(self, model: Model, v: ModelVersion, timeout_s: float) -> None:
        await v.drain(timeout_s)
        v.fleet.fail_all(EngineUnavailableError(  # what the drain timeout left
            "the model version was unloaded; the request was cut short"))
        await v.stop()
        if model.versions.get(v.version) is v:
            del model.versions[v.version]
            model.shadow_stats.pop(v.version, None)
        reg = self.registry
        if not model.versions and reg.models.get(model.name) is model and len(reg.models) > 1:
            del reg.models[model.name]
            for alias, target in list(reg._names.items()):
                if target == model.name:
                    del reg._names[alias]
        log.info("unloaded %s", v.spec.ref)


def _shown(value: str) -> str:
    return repr(value) if len(value) <= 80 and value.isprintable() else "(invalid)"


_PARAMS = (("model name", "name"), ("version", "version"), ("model path", "path"), ("path", "path"),
           ("fail_fraction", "fail_fraction"))


def _param_of(message: str) -> str | None:
    """The field a spec error names, for the error's `param`."""
    for prefix, param in _PARAMS:
        if message.startswith(prefix):
            return param
    head = message.split(":", 1)[0].split(" ", 1)[0].split(".", 1)[0]  # "speculative_config.method must ..."
    return head if head in ENGINE_OPTION_NAMES else None


def _bounds(c: AutoscaleConfig) -> dict[str, int]:
    return {"min_replicas": c.min_replicas, "max_replicas": c.max_replicas}


def _autoscale_json(c: AutoscaleConfig | None) -> dict[str, Any] | None:
    return None if c is None else {**_bounds(c), "policy": c.policy, "activation_timeout_s": c.activation_timeout_s}
