"""Reading GGUF metadata values: from a plain dict of values (`gguf_header`), or `GGUFReader.fields`."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from gguf import GGUFValueType
from gguf.gguf_reader import ReaderField


def meta(fields: Mapping[str, Any], key: str, default: Any = None) -> Any:
    field = fields.get(key)
    if field is None:
        return default
    if not isinstance(field, ReaderField):
        return field
    try:
        return field.contents()
    except UnicodeDecodeError:
        # A vocabulary with a token that is not valid UTF-8: decode leniently rather than fail.
        if field.types[0] == GGUFValueType.ARRAY:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        return bytes(field.parts[-1]).decode("utf-8", errors="replace")
