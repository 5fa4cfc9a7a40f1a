"""`DirectRoutes`: the hot inference routes, called straight from the guard middleware.

`POST /v1/completions` and `POST /v1/chat/completions` take nothing but the
`Request` and return a `Response`, so Starlette's exception and routing layers
and FastAPI's request handler (dependency solving, exit stacks, telemetry
hooks) do no work for them; together they cost more CPU per request than the
route itself. Here the same endpoint runs with the same scope keys the router
sets (`route`, `endpoint`, `path_params`, `router`), its `Request` holds the body
the guard has read already (as `request.body()` caches it), and an exception
goes to the app's own exception handlers exactly as Starlette's
`ExceptionMiddleware` would send it (a handled exception once the answer has
started is a RuntimeError, as there). Everything else goes through the full stack.
"""
from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope

if TYPE_CHECKING:
    from lockgate.server.exchange import Exchange

HOT_PATHS = ("/v1/completions", "/v1/chat/completions")
Handler = Callable[[Request, Exception], Awaitable[Response] | Response]


class DirectRoutes:
    def __init__(self, app: FastAPI, routes: Iterable[Any], paths: Iterable[str] = HOT_PATHS) -> None:
        self.app = app
        wanted = set(paths)
        self.routes: dict[str, APIRoute] = {}
        for r in routes:
            # Only plain `endpoint(request) -> Response` routes qualify: nothing for FastAPI to solve.
            if (isinstance(r, APIRoute) and r.path in wanted and r.methods == {"POST"} and not r.dependencies
                    and _takes_only_request(r.endpoint)):
                self.routes[r.path] = r

    def match(self, scope: Scope) -> APIRoute | None:
        if scope["method"] != "POST" or scope.get("root_path"):
            return None  # a root path: the router strips it; leave that to it
        return self.routes.get(scope["path"])

    async def __call__(self, route: APIRoute, scope: Scope, receive: Receive, ex: Exchange, body: bytes | None) -> None:
        scope.setdefault("router", self.app.router)
        scope["endpoint"] = route.endpoint
        scope["path_params"] = {}
        scope["route"] = route
        send = ex.send
        request = Request(scope, receive, send)
        if body is not None:  # read by the guard already: `request.body()` returns it, as Starlette caches it
            request._body = body
        try:
            response = await route.endpoint(request)
            await response(scope, receive, send)
        except Exception as exc:
            handler = self._handler(exc)
            if handler is None:
                raise
            if ex.started:
                raise RuntimeError("Caught handled exception, but response already started.") from exc
            if inspect.iscoroutinefunction(handler):
                response = await handler(request, exc)
            else:
                response = await run_in_threadpool(handler, request, exc)
            await response(scope, receive, send)

    def _handler(self, exc: Exception) -> Handler | None:
        """As Starlette's ExceptionMiddleware: a status handler for an HTTPException, else the handler of
        the nearest class in the exception's MRO (500 and Exception belong to ServerErrorMiddleware)."""
        handlers = self.app.exception_handlers
        if isinstance(exc, HTTPException):
            found = handlers.get(exc.status_code)
            if found is not None and exc.status_code != 500:
                return found
        for cls in type(exc).__mro__:
            if cls is not Exception and cls in handlers:
                return handlers[cls]
        return None


def _takes_only_request(endpoint: Callable[..., Any]) -> bool:
    params = list(inspect.signature(endpoint).parameters.values())
    return (inspect.iscoroutinefunction(endpoint) and len(params) == 1
            and params[0].annotation in (Request, "Request"))
