"""The exception handlers that turn every failure into an OpenAI-shaped error (never a bare
500 page). The error type itself is `lockgate.errors` (below the gateway and the server)."""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from lockgate.gateway.shared import store_unavailable
from lockgate.store.store_error import StoreUnavailable
from lockgate.server.state import LEASE_SCOPE_KEY
from lockgate.errors import (  # noqa: F401 - re-exported for the server's modules
    APIError,
    bad_request,
    error_body,
    internal_error,
    json_response,
    model_not_found,
    unavailable,
    validation_error,
)


def _render(request: Request, err: APIError) -> Response:
    state = getattr(request.app.state, "lockgate", None)  # the AppState (state.py)
    if state is not None:
        state.metrics.error(err.status, err.code)
    lease = request.scope.get(LEASE_SCOPE_KEY)
    if lease is not None:
        lease.code = err.code  # the request's record tells capacity refusals from client errors
    return err.response()


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> Response:
        return _render(request, exc)

    @app.exception_handler(StoreUnavailable)
    async def _store_down(request: Request, exc: StoreUnavailable) -> Response:
        return _render(request, store_unavailable(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        return _render(request, validation_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        return _render(request, APIError(exc.status_code, message, headers=dict(exc.headers or {})))
    # Anything else is caught once, logged once and answered as a 500 by the guard
    # middleware (`middleware.py`): a handler here would be logged again by Starlette.
