"""Tenants of a multi-tenant mix: a name, an API key, a share of the requests, a priority class.

From `--tenant name:key:weight[:class]` (repeatable) or `--tenants file.json`
holding a list of {"name", "key"?, "weight"?, "class"?} (or {"tenants": [...]}).
An empty key means the run's --api-key. The class is sent as the header
`x-lockgate-priority: <class>`; servers that do not know it ignore it.
"""
from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass
from pathlib import Path

PRIORITY_HEADER = "x-lockgate-priority"
_TOKEN = re.compile(r"^[A-Za-z0-9_.\-]+$")


class TenantError(ValueError):
    """A malformed tenant spec or file."""


@dataclass(slots=True, frozen=True)
class Tenant:
    name: str
    key: str              # "" -> the run's --api-key
    weight: float         # share of the requests, relative to the others'
    priority_class: str   # "" -> no priority header


DEFAULT = Tenant("default", "", 1.0, "")


def _make(name: str, key: str, weight: object, cls: str, where: str) -> Tenant:
    if not name or not _TOKEN.match(name):
        raise TenantError(f"{where}: tenant name {name!r} must be letters, digits, '_', '-' or '.'")
    try:
        w = float(weight)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TenantError(f"{where}: weight {weight!r} is not a number") from None
    if not (w > 0 and math.isfinite(w)):
        raise TenantError(f"{where}: weight must be > 0")
    if cls and not _TOKEN.match(cls):
        raise TenantError(f"{where}: priority class {cls!r} must be letters, digits, '_', '-' or '.'")
    if any(c in key for c in "\r\n"):
        raise TenantError(f"{where}: the key holds a line break")
    return Tenant(name, key, w, cls)


def parse_tenant(spec: str) -> Tenant:
    """`name:key:weight[:class]`."""
    parts = spec.split(":")
    if len(parts) not in (3, 4):
        raise TenantError(f"--tenant {spec!r}: expected name:key:weight[:class] (key may be empty)")
    return _make(parts[0], parts[1], parts[2], parts[3] if len(parts) == 4 else "", f"--tenant {parts[0]!r}")


def load_tenants(path: str) -> list[Tenant]:
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise TenantError(f"--tenants: no such file: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TenantError(f"--tenants {path}: not a readable JSON file ({e})") from None
    if isinstance(data, dict):
        data = data.get("tenants")
    if not isinstance(data, list) or not data:
        raise TenantError(f"--tenants {path}: expected a non-empty list of tenants (or {{\"tenants\": [...]}})")
    out = []
    for i, t in enumerate(data):
        where = f"--tenants {path} [{i}]"
        if not isinstance(t, dict):
            raise TenantError(f"{where}: expected an object")
        unknown = set(t) - {"name", "key", "weight", "class"}
        if unknown:
            raise TenantError(f"{where}: unknown fields {sorted(unknown)}")
        key, cls = t.get("key", ""), t.get("class", "")
        if not isinstance(key, str) or not isinstance(cls, str) or not isinstance(t.get("name", ""), str):
            raise TenantError(f"{where}: name, key and class must be strings")
        out.append(_make(t.get("name", ""), key, t.get("weight", 1.0), cls, where))
    return out


def check_unique(tenants: list[Tenant]) -> None:
    names = [t.name for t in tenants]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise TenantError(f"tenant names must be unique: {sorted(dup)}")


def pick(tenants: list[Tenant], rng: random.Random) -> Tenant:
    """One tenant, with probability proportional to its weight."""
    if len(tenants) == 1:
        return tenants[0]
    return rng.choices(tenants, weights=[t.weight for t in tenants])[0]
