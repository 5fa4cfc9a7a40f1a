"""`Placement`: the resources one replica of a version asks for where replicas are Ray actors
(`serve --ray`): CPUs, GPUs and custom resources (a GPU memory class such as `gpu_80gb`).

Local replicas ignore it (their threads are shared out by `cores.share_threads`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

MAX_RESOURCES = 16
_Amount = Annotated[float, Field(ge=0, le=1_000_000, allow_inf_nan=False)]
_ResourceName = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")]


@dataclass(slots=True)
class Placement:
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "resources": dict(self.resources)}


class PlacementBody(BaseModel):
    """`placement` of a version in a models config or `POST /admin/models`."""

    model_config = ConfigDict(extra="forbid", strict=True)
    num_cpus: _Amount = 1.0
    num_gpus: _Amount = 0.0
    resources: Annotated[dict[_ResourceName, _Amount], Field(max_length=MAX_RESOURCES)] = Field(default_factory=dict)

    def placement(self) -> Placement:
        if {"CPU", "GPU"} & set(self.resources):
            raise ValueError("placement.resources: give CPU and GPU as num_cpus and num_gpus")
        return Placement(self.num_cpus, self.num_gpus, dict(self.resources))
