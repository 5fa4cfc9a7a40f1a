"""The served models as HTTP shows them: the `x-lockgate-model-version` response header
(the version the request pipeline routed the request to, pipeline.py) and `/v1/models` cards.
"""
from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lockgate.server.state import VERSION_SCOPE_KEY, AppState

MODEL_VERSION_HEADER = "x-lockgate-model-version"


class ModelVersionHeader:
    """Adds `x-lockgate-model-version` to the answer of a request the pipeline routed."""

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


def model_cards(app: AppState) -> list[dict[str, object]]:
    """`/v1/models`: one card per served name (a model and its aliases), with its ready versions."""
    cards = []
    for model in app.models.models.values():
        stable = model.versions.get(model.stable() or "") or next(iter(model.versions.values()), None)
        ready = [v for v, ver in model.versions.items() if ver.state.value == "ready"]
        for name in (model.name, *model.aliases):
            cards.append({"id": name, "object": "model", "created": app.created, "owned_by": "lockgate",
                          "root": (stable.engine_config.model if stable else None) or model.name, "parent": None,
                          "max_model_len": stable.client.max_model_len if stable else 0, "versions": ready})
    return cards
