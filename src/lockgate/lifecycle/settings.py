"""A model's release settings: traffic split, shadow, rollback rules; and their strict bodies.

The same bodies serve `PATCH /admin/models/{name}` and the models of a `--config`
file, so both refuse the same things: unknown fields, wrong types, negative or
huge numbers, weights that do not sum to 100.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Discriminator, Field, StringConstraints, Tag, model_validator

from lockgate.lifecycle.autoscale_types import AutoscaleConfig, PolicyName

_STRICT = ConfigDict(extra="forbid", strict=True)
MAX_VERSIONS = 8  # per model: bounds /metrics labels and what an admin can start
MAX_REPLICAS = 32  # engine processes per version on one server (bounds the replica labels too)
MAX_ENGINES = 64  # engine processes on one server, every version's replicas together
MAX_MODELS = 16
Weight = Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)]
Fraction = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
VersionName = Annotated[str, StringConstraints(min_length=1, max_length=64)]


@dataclass(slots=True)
class ShadowConfig:
    version: str
    fraction: float
    max_concurrency: int = 4  # shadow requests in flight at once; more are dropped (and counted)

    def to_json(self) -> dict[str, Any]:
        return {"version": self.version, "fraction": self.fraction, "max_concurrency": self.max_concurrency}


@dataclass(slots=True)
class RollbackRules:
    """When a canary (a version with traffic, not the one with the most) is set to 0 at once."""

    enabled: bool = True
    max_error_rate: float | None = 0.02  # over the window, once it holds min_requests
    min_requests: int = 50
    max_ttft_p95_ratio: float | None = 1.5  # canary TTFT p95 over stable's (both with min_requests) ...
    min_ttft_delta_s: float = 0.05  # ... and at least this much slower: no flapping on millisecond noise
    min_shadow_agreement: float | None = 0.9  # greedy token agreement of the shadow version
    min_shadow_samples: int = 20
    window: int = 200  # the last this many requests of each version are judged

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__slots__}  # type: ignore[attr-defined]


class ShadowBody(BaseModel):
    model_config = _STRICT
    version: VersionName
    fraction: Fraction
    max_concurrency: Annotated[int, Field(ge=1, le=256)] = 4


class RollbackBody(BaseModel):
    model_config = _STRICT
    enabled: bool = True
    max_error_rate: Fraction | None = 0.02
    min_requests: Annotated[int, Field(ge=1, le=100_000)] = 50
    max_ttft_p95_ratio: Annotated[float, Field(ge=1, le=1000, allow_inf_nan=False)] | None = 1.5
    min_ttft_delta_s: Annotated[float, Field(ge=0, le=3600, allow_inf_nan=False)] = 0.05
    min_shadow_agreement: Fraction | None = 0.9
    min_shadow_samples: Annotated[int, Field(ge=1, le=100_000)] = 20
    window: Annotated[int, Field(ge=1, le=100_000)] = 200

    def rules(self) -> RollbackRules:
        return RollbackRules(**self.model_dump())


class ReplicaBounds(BaseModel):
    """`PATCH` `replicas: {VERSION: {min_replicas, max_replicas}}`: an autoscaler's bounds."""

    model_config = _STRICT
    min_replicas: Annotated[int, Field(ge=0, le=MAX_REPLICAS)]
    max_replicas: Annotated[int, Field(ge=1, le=MAX_REPLICAS)]

    @model_validator(mode="after")
    def _order(self) -> ReplicaBounds:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        return self


def _count_or_bounds(value: Any) -> str:
    return "bounds" if isinstance(value, (dict, ReplicaBounds)) else "count"


# A version's replicas in a PATCH: a number, or an autoscaler's bounds (errors name the form given).
ReplicaCount = Annotated[Annotated[Annotated[int, Field(ge=1, le=MAX_REPLICAS)], Tag("count")]
                         | Annotated[ReplicaBounds, Tag("bounds")], Discriminator(_count_or_bounds)]


class AutoscaleBody(BaseModel):
    """`autoscale` of a version (models config, `POST /admin/models`): its bounds and policy."""

    model_config = _STRICT
    min_replicas: Annotated[int, Field(ge=0, le=MAX_REPLICAS)] = 1
    max_replicas: Annotated[int, Field(ge=1, le=MAX_REPLICAS)] = 1
    policy: PolicyName = "lockgate"
    interval_s: Annotated[float, Field(ge=0.1, le=600, allow_inf_nan=False)] = 2.0
    stable_window_s: Annotated[float, Field(ge=1, le=3600, allow_inf_nan=False)] = 60.0
    panic_window_s: Annotated[float, Field(ge=0.5, le=600, allow_inf_nan=False)] = 6.0
    scale_down_cooldown_s: Annotated[float, Field(ge=0, le=86400, allow_inf_nan=False)] = 30.0
    activation_timeout_s: Annotated[float, Field(ge=0.1, le=3600, allow_inf_nan=False)] = 60.0
    target_in_flight: Annotated[float, Field(ge=1, le=100_000, allow_inf_nan=False)] = 16.0

    @model_validator(mode="after")
    def _bounds(self) -> AutoscaleBody:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        if self.panic_window_s > self.stable_window_s:
            raise ValueError("panic_window_s must not be longer than stable_window_s")
        return self

    def config(self) -> AutoscaleConfig:
        return AutoscaleConfig(**self.model_dump())


class ModelPatch(BaseModel):
    """`PATCH /admin/models/{name}`: only the fields given change; `shadow: null` stops shadowing."""

    model_config = _STRICT
    traffic: Annotated[dict[VersionName, Weight], Field(min_length=1, max_length=MAX_VERSIONS)] | None = None
    shadow: ShadowBody | None = None
    rollback: RollbackBody | None = None
    # version -> engine replicas: more load in the background, fewer drain first. An autoscaled version
    # takes bounds instead ({"min_replicas", "max_replicas"}; a number N pins both to N); bounds given to
    # a version without an autoscaler give it one.
    replicas: Annotated[dict[VersionName, ReplicaCount], Field(min_length=1, max_length=MAX_VERSIONS)] | None = None


def check_traffic(traffic: dict[str, float], versions: set[str]) -> dict[str, float]:
    """Weights naming known versions and summing to 100 (to 1e-6); ValueError otherwise."""
    unknown = sorted(set(traffic) - versions)
    if unknown:
        raise ValueError(f"traffic names unknown version {unknown[0][:64]!r}; versions: {', '.join(sorted(versions))}")
    total = sum(traffic.values())
    if abs(total - 100.0) > 1e-6:
        raise ValueError(f"traffic weights must sum to 100, got {total:g}")
    return dict(traffic)
