"""Request bodies into pydantic models, with OpenAI-shaped errors: the one body parser.

The server's routes (raw HTTP bytes), the admin service and the model admin
(bytes or an already parsed mapping) all validate through `parse_body`. Below
the gateway and the server: it imports only `lockgate.errors`.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from lockgate.errors import APIError, bad_request, validation_error

M = TypeVar("M", bound=BaseModel)
ErrorMapper = Callable[[list[dict[str, Any]]], APIError]


def parse_body(model: type[M], body: Mapping[str, Any] | bytes | bytearray | str | None, *,
               errors: ErrorMapper = validation_error) -> M:
    """Validate a body into `model`: bytes or str as JSON (strictly, by the model's config), a
    mapping as parsed JSON, None as `{}`. Any problem is an `APIError` 400: the first pydantic error
    rendered by `errors` (`lockgate.errors.validation_error`, OpenAI's shape, or `field_error`, the
    admin bodies' full field paths); anything but a JSON object is refused."""
    try:
        if isinstance(body, (bytes, bytearray, str)):
            return model.model_validate_json(body)
        if body is None:
            body = {}
        if not isinstance(body, Mapping):
            raise bad_request("the request body must be a JSON object")
        return model.model_validate(dict(body))
    except ValidationError as e:
        raise errors(list(e.errors(include_url=False))) from None
