"""Priority classes: names in rank order (rank 0 is served first), SLO targets and queue caps.

A tenant's record names its class; a request may ask for its tenant's class or
a lower one (`x-lockgate-priority` header or body `priority`), never a higher
one. The engine orders by rank (`EngineCoreRequest.priority`); admission sheds
by the class's TTFT target; `--class-config FILE` (YAML or JSON) replaces the
defaults below.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_MAX_CLASSES = 16


@dataclass(frozen=True, slots=True)
class PriorityClass:
    name: str
    rank: int  # 0 is the most important; also the engine priority value
    ttft_s: float  # TTFT target (p95): admission sheds a request that cannot meet it
    tpot_s: float  # time per output token target (p95): goodput and SLO reports
    max_queued: int  # waiting requests of this class; more get 429 queue_full
    objective: float = 0.99  # fraction of requests that must meet both targets

    def met(self, ttft_s: float | None, tpot_s: float | None) -> bool:
        """Did one finished request meet this class's targets?"""
        return ttft_s is not None and ttft_s <= self.ttft_s and (tpot_s is None or tpot_s <= self.tpot_s)


DEFAULT_CLASSES: tuple[PriorityClass, ...] = (
    PriorityClass("interactive", 0, ttft_s=0.5, tpot_s=0.1, max_queued=64),
    PriorityClass("standard", 1, ttft_s=2.0, tpot_s=0.2, max_queued=256),
    PriorityClass("batch", 2, ttft_s=30.0, tpot_s=1.0, max_queued=1024, objective=0.9),
)
DEFAULT_CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in DEFAULT_CLASSES)


class ClassTable:
    """The server's classes, looked up by name or by engine priority value."""

    def __init__(self, classes: Sequence[PriorityClass] = DEFAULT_CLASSES, default: str = "standard") -> None:
        if not classes:
            raise ValueError("at least one priority class is needed")
        if len(classes) > _MAX_CLASSES:
            raise ValueError(f"at most {_MAX_CLASSES} priority classes, got {len(classes)}")
        self.classes = tuple(classes)
        self.by_name = {c.name: c for c in self.classes}
        if len(self.by_name) != len(self.classes):
            raise ValueError("priority class names must be unique")
        if [c.rank for c in self.classes] != list(range(len(self.classes))):
            raise ValueError("priority class ranks must be 0, 1, 2, ... in order")
        if default not in self.by_name:
            raise ValueError(f"default class {default!r} is not one of {self.names}")
        self.default = self.by_name[default]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.classes)

    def get(self, name: str) -> PriorityClass | None:
        return self.by_name.get(name)

    def of_priority(self, priority: int) -> PriorityClass:
        """The class an engine priority value falls in (values past either end clamp)."""
        return self.classes[min(max(priority, 0), len(self.classes) - 1)]

    @classmethod
    def load(cls, path: str | Path) -> ClassTable:
        """Read `{"default": NAME, "classes": [{"name", "ttft_p95_s", "tpot_p95_s", "max_queued",
        "objective"?}, ...]}` (YAML or JSON), classes in rank order."""
        p = Path(path)
        try:
            text = p.read_text()
        except OSError as exc:
            raise ValueError(f"cannot read class config {p}: {exc.strerror}") from None
        try:
            if p.suffix in (".yaml", ".yml"):
                import yaml  # only when a YAML file is given

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as exc:  # noqa: BLE001 - any parse error is a config error
            raise ValueError(f"class config {p} does not parse: {exc}") from None
        return cls.from_dict(data, str(p))

    @classmethod
    def from_dict(cls, data: Any, where: str = "class config") -> ClassTable:
        if not isinstance(data, dict) or not isinstance(data.get("classes"), list):
            raise ValueError(f"{where}: expected a mapping with a 'classes' list")
        unknown = set(data) - {"default", "classes"}
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
        classes = [_parse_class(item, rank, where) for rank, item in enumerate(data["classes"])]
        default = data.get("default", "standard" if any(c.name == "standard" for c in classes) else None)
        if default is None:
            default = classes[len(classes) // 2].name if classes else ""
        if not isinstance(default, str):
            raise ValueError(f"{where}: 'default' must be a class name")
        return cls(classes, default)


def _parse_class(item: Any, rank: int, where: str) -> PriorityClass:
    if not isinstance(item, dict):
        raise ValueError(f"{where}: class {rank} must be a mapping")
    allowed = {"name", "ttft_p95_s", "tpot_p95_s", "max_queued", "objective"}
    unknown = set(item) - allowed
    if unknown:
        raise ValueError(f"{where}: class {rank}: unknown keys {sorted(unknown)}")
    name = item.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"{where}: class {rank}: 'name' must match {_NAME.pattern}")

    def num(key: str, lo: float, hi: float, default: float | None = None) -> float:
        v = item.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo < v <= hi:
            raise ValueError(f"{where}: class {name!r}: {key!r} must be a number in ({lo}, {hi}], got {v!r}")
        return float(v)

    max_queued = item.get("max_queued", 256)
    if isinstance(max_queued, bool) or not isinstance(max_queued, int) or not 1 <= max_queued <= 1_000_000:
        raise ValueError(f"{where}: class {name!r}: 'max_queued' must be an integer in [1, 1000000]")
    return PriorityClass(name, rank, ttft_s=num("ttft_p95_s", 0, 86400), tpot_s=num("tpot_p95_s", 0, 3600),
                         max_queued=max_queued, objective=num("objective", 0, 1, 0.99))
