"""Which model version serves an inference request, and what the request then sees.

`route` runs in the generation routes right after the body is parsed: the `model`
field names a model (404 when unknown, or when the tenant may not use it: the same
answer), the version is pinned (`NAME@VERSION`) or picked from the traffic split,
sticky on the request's `user` field or else its tenant; the request holds the
version until it ends (an unload drains it), the ledger and the
`x-lockgate-model-version` response header name it.
"""
from __future__ import annotations

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lockgate.server.context import ServerContext
from lockgate.server.gating import Gate

MODEL_VERSION_HEADER = "x-lockgate-model-version"
VERSION_SCOPE_KEY = "lockgate.model_version"


def route(request: Request, ctx: ServerContext, gate: Gate, requested: str | None,
          user: str | None) -> tuple[ServerContext, str]:
    """(the context bound to the chosen version, the model's served name)."""
    models = ctx.models
    model, pinned = models.resolve(requested)
    gate.check_model(requested, model.name)
    tenant = gate.principal.tenant_id if gate.principal is not None else None
    version = models.pick(model, pinned, user or tenant)
    gate.lease.hold(version.enter())
    request.scope[VERSION_SCOPE_KEY] = version.version
    if gate.meter is not None:
        gate.meter.model_version = version.version
    return models.bind(ctx, version), model.name


class ModelVersionHeader:
    """Adds `x-lockgate-model-version` to the answer of a request `route` placed."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_version(message: Message) -> None:
            version = scope.get(VERSION_SCOPE_KEY)
            if message["type"] == "http.response.start" and version is not None:
                message = {**message, "headers": [*message.get("headers", []),
                                                   (MODEL_VERSION_HEADER.encode(), version.encode("ascii"))]}
            await send(message)

        await self.app(scope, receive, send_with_version)


def model_cards(ctx: ServerContext) -> list[dict[str, object]]:
    """`/v1/models`: one card per served name (a model and its aliases), with its ready versions."""
    cards = []
    for model in ctx.models.models.values():
        stable = model.versions.get(model.stable() or "") or next(iter(model.versions.values()), None)
        ready = [v for v, ver in model.versions.items() if ver.state.value == "ready"]
        for name in (model.name, *model.aliases):
            cards.append({"id": name, "object": "model", "created": ctx.created, "owned_by": "lockgate",
                          "root": (stable.engine_config.model if stable else None) or model.name, "parent": None,
                          "max_model_len": stable.client.max_model_len if stable else 0, "versions": ready})
    return cards
