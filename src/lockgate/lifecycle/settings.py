"""A model's release settings: traffic split, shadow, rollback rules; and their strict bodies.

The same bodies serve `PATCH /admin/models/{name}` and the models of a `--config`
file, so both refuse the same things: unknown fields, wrong types, negative or
huge numbers, weights that do not sum to 100.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

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


class ModelPatch(BaseModel):
    """`PATCH /admin/models/{name}`: only the fields given change; `shadow: null` stops shadowing."""

    model_config = _STRICT
    traffic: Annotated[dict[VersionName, Weight], Field(min_length=1, max_length=MAX_VERSIONS)] | None = None
    shadow: ShadowBody | None = None
    rollback: RollbackBody | None = None
    # version -> engine replicas: more load in the background, fewer drain first
    replicas: Annotated[dict[VersionName, Annotated[int, Field(ge=1, le=MAX_REPLICAS)]],
                        Field(min_length=1, max_length=MAX_VERSIONS)] | None = None


def check_traffic(traffic: dict[str, float], versions: set[str]) -> dict[str, float]:
    """Weights naming known versions and summing to 100 (to 1e-6); ValueError otherwise."""
    unknown = sorted(set(traffic) - versions)
    if unknown:
        raise ValueError(f"traffic names unknown version {unknown[0][:64]!r}; versions: {', '.join(sorted(versions))}")
    total = sum(traffic.values())
    if abs(total - 100.0) > 1e-6:
        raise ValueError(f"traffic weights must sum to 100, got {total:g}")
    return dict(traffic)
