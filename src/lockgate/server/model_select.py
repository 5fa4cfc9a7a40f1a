"""The served models as HTTP shows them: the `x-lockgate-model-version` and `x-lockgate-replica`
response headers (the version and replica the request pipeline routed the request to,
pipeline.py), `x-lockgate-ignored-fields` (the body's unknown fields, protocol.py) and `/v1/models` cards.
"""
from __future__ import annotations

from typing import Any

from starlette.types import Scope

from lockgate.server.state import IGNORED_FIELDS_SCOPE_KEY, MODEL_SCOPE_KEY, REPLICA_SCOPE_KEY, VERSION_SCOPE_KEY, AppState

MODEL_HEADER = "x-lockgate-model"  # the served model (a router's choice, or the model a fallback ended on)
MODEL_VERSION_HEADER = "x-lockgate-model-version"
REPLICA_HEADER = "x-lockgate-replica"
IGNORED_FIELDS_HEADER = "x-lockgate-ignored-fields"


_MODEL_KEY = MODEL_HEADER.encode()
_VERSION_KEY = MODEL_VERSION_HEADER.encode()
_REPLICA_KEY = REPLICA_HEADER.encode()
_IGNORED_KEY = IGNORED_FIELDS_HEADER.encode()


def add_route_headers(scope: Scope, headers: list[tuple[bytes, bytes]]) -> None:
    """Appends `x-lockgate-model-version` (and `x-lockgate-replica`, once submitted) to the answer of a
    request the pipeline routed, and `x-lockgate-ignored-fields` to one whose body had unknown fields
    (called by the guard middleware's `Exchange` on the status line)."""
    version = scope.get(VERSION_SCOPE_KEY)
    if version is not None:
        model = scope.get(MODEL_SCOPE_KEY)
        if model:  # an operator's served name: ASCII is not guaranteed, so escape what is not
            headers.append((_MODEL_KEY, model.encode("ascii", "backslashreplace")))
        headers.append((_VERSION_KEY, version.encode("ascii")))
        replica = scope.get(REPLICA_SCOPE_KEY)
        name = replica() if replica is not None else None
        if name:
            headers.append((_REPLICA_KEY, name.encode("ascii")))
    ignored = scope.get(IGNORED_FIELDS_SCOPE_KEY)
    if ignored:  # sanitized ASCII (protocol.ignored_header)
        headers.append((_IGNORED_KEY, ignored.encode("ascii")))


def quantization(version: Any) -> str | None:
    """The weight precision a model version's engines run ("int4", "int8" or "none", as their cores
    said when ready); None while none of its replicas is up."""
    if version is None:
        return None
    return next((r.client.quantization for r in version.fleet.replicas.values() if r.client.quantization), None)


def model_cards(app: AppState) -> list[dict[str, object]]:
    """`/v1/models`: one card per served name (a model and its aliases), with its ready versions."""
    cards = []
    for model in app.models.models.values():
        stable = model.versions.get(model.stable() or "") or next(iter(model.versions.values()), None)
        ready = [v for v, ver in model.versions.items() if ver.state.value == "ready"]
        for name in (model.name, *model.aliases):
            cards.append({"id": name, "object": "model", "created": app.created, "owned_by": "lockgate",
                          "root": (stable.engine_config.model if stable else None) or model.name, "parent": None,
                          "max_model_len": stable.fleet.max_model_len if stable else 0, "versions": ready,
                          "quantization": quantization(stable)})
    longest = {str(c["id"]): int(c["max_model_len"]) for c in cards}  # type: ignore[call-overload]
    for router in app.models.routers.routers.values():  # router models: a policy that picks a model
        models = sorted(router.models)
        cards.append({"id": router.name, "object": "model", "created": app.created, "owned_by": "lockgate",
                      "root": router.name, "parent": None, "router": True, "models": models, "quantization": None,
                      "max_model_len": max((longest.get(m.partition("@")[0], 0) for m in models), default=0)})
    return cards
