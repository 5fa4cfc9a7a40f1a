"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}`.

The error type every layer raises (gateway, lifecycle, server), so it sits below
all of them; the HTTP exception handlers that render it are in `server/errors.py`.
"""
from __future__ import annotations

from typing import Any

import msgspec
from starlette.responses import Response

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    500: "server_error",
    503: "service_unavailable_error",
}
# Every error carries a machine-readable code; these are the defaults when a raise site names none.
_CODE_BY_STATUS = {
    400: "invalid_value",
    401: "invalid_api_key",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "invalid_value",
    429: "rate_limit_exceeded",
    431: "headers_too_large",
    500: "internal_error",
    503: "service_unavailable",
}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class APIError(Exception):
    """Raise anywhere in a route: the handler renders it in the OpenAI error format."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, type_: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code or _CODE_BY_STATUS.get(status, "error")
        self.headers = headers or {}
        self.type = type_ or _TYPE_BY_STATUS.get(status, "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> Response:
        return json_response(self.body(), self.status, self.headers)


def json_response(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    # msgspec: several times faster than the stdlib for our response bodies.
    return Response(msgspec.json.encode(content), status_code=status, headers=headers,
                    media_type="application/json")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str) -> APIError:
    return APIError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


def unavailable(message: str, code: str, retry_after_s: int | None = None) -> APIError:
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s else None
    return APIError(503, message, code=code, headers=headers)


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "literal"}


def _split_loc(loc: tuple[Any, ...]) -> tuple[str | None, list[str]]:
    """("prompt", "list[int]", 0) -> ("prompt.0", ["list[int]"]): pydantic puts union
    member names in the location; they are not part of the field path."""
    parts: list[str] = []
    tags: list[str] = []
    for p in loc:
        if p == "body":
            continue
        if isinstance(p, str) and ("[" in p or p.lower() in _TYPE_TAGS or "-" in p):
            tags.append(p)
            continue
        parts.append(str(p))
    return (".".join(parts) or None), tags


def validation_error(exc_errors: list[dict[str, Any]]) -> APIError:
    """Pydantic errors -> one 400 naming the first offending field (what OpenAI does)."""
    if not exc_errors:
        return bad_request("invalid request")
    first = exc_errors[0]
    if first.get("type") == "json_invalid":
        return bad_request(f"the request body is not valid JSON: {first.get('msg', '')}".rstrip(": "),
                           code="invalid_json")
    param, tags = _split_loc(tuple(first.get("loc", ())))
    msg = first.get("msg", "invalid value")
    if tags:  # a value matching none of a union's types: name them all
        alts = []
        for e in exc_errors:
            p, t = _split_loc(tuple(e.get("loc", ())))
            if p == param and t and t[0] not in alts:
                alts.append(t[0])
        msg = f"invalid type; expected one of: {', '.join(alts)}"
    where = f"{param}: " if param else ""
    return bad_request(f"{where}{msg}", param=param, code="invalid_value")


def field_error(exc_errors: list[dict[str, Any]]) -> APIError:
    """Pydantic errors -> one 400 naming the first bad field by its full path (admin bodies:
    unknown fields refused, our own validators' messages read as they are)."""
    if not exc_errors or exc_errors[0].get("type") == "json_invalid" or not exc_errors[0].get("loc"):
        return validation_error(exc_errors)
    first = exc_errors[0]
    param = ".".join(str(p) for p in first["loc"])
    msg = "unknown field" if first.get("type") == "extra_forbidden" else first.get("msg", "invalid value")
    msg = msg.removeprefix("Value error, ")
    return bad_request(f"{param}: {msg}", param=param, code="invalid_value")


def internal_error(exc: BaseException) -> APIError:
    return APIError(500, f"internal server error: {type(exc).__name__}", code="internal_error")
