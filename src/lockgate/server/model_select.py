"""The served models as HTTP shows them: the `x-lockgate-model-version` and `x-lockgate-replica`
response headers (the version and replica the request pipeline routed the request to,
pipeline.py) and `/v1/models` cards.
"""
from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lockgate.server.state import REPLICA_SCOPE_KEY, VERSION_SCOPE_KEY, AppState

MODEL_VERSION_HEADER = "x-lockgate-model-version"
REPLICA_HEADER = "x-lockgate-replica"


class ModelVersionHeader:
    """Adds `x-lockgate-model-version` (and `x-lockgate-replica`, once submitted) to the answer of a
    request the pipeline routed."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_version(message: Message) -> None:
            version = scope.get(VERSION_SCOPE_KEY)
            if message["type"] == "http.response.start" and version is not None:
                headers = [*message.get("headers", []), (MODEL_VERSION_HEADER.encode(), version.encode("ascii"))]
                replica = scope.get(REPLICA_SCOPE_KEY)
                name = replica() if replica is not None else None
                if name:
                    headers.append((REPLICA_HEADER.encode(), name.encode("ascii")))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_version)


def model_cards(app: AppState) -> list[dict[str, object]]:
    """`/v1/models`: one card per served name (a model and its aliases), with its ready versions."""
    cards = []
    for model in app.models.models.values():
        stable = model.versions.get(model.stable() or "") or next(iter(model.versions.values()), None)
        ready = [v for v, ver in model.versions.items() if ver.state.value == "ready"]
        for name in (model.name, *model.aliases):
            cards.append({"id": name, "object": "model", "created": app.created, "owned_by": "lockgate",
                          "root": (stable.engine_config.model if stable else None) or model.name, "parent": None,
                          "max_model_len": stable.fleet.max_model_len if stable else 0, "versions": ready})
    return cards
