"""`CallObject`: one call written as JSON, `{"name": "...", "arguments": {...}}`, read from text fed
in pieces: the name as soon as its string closes, the arguments in canonical form
(`json_text.py`) as they arrive.

`"parameters"` is read as `"arguments"` (Llama 3.x writes it); arguments written as a JSON string
holding an object are read as that object; missing arguments are `{}`; other keys are checked as
JSON and ignored. Anything else (no name, a name not among the request's tools, arguments that are
not an object, a repeated name or arguments key, text that is not JSON) is an `error`.
"""
from __future__ import annotations

from collections.abc import Collection

from lockgate.server.tool_parsers.json_text import WS, JsonValue

ARGUMENT_KEYS = ("arguments", "parameters")
MAX_NAME_CHARS = 256

_START, _FIRST_KEY, _KEY, _KEY_TEXT, _COLON, _VALUE, _AFTER, _END = range(8)


def name_error(name: str, tool_names: Collection[str] | None) -> str | None:
    if not name:
        return "empty function name"
    if len(name) > MAX_NAME_CHARS:
        return "function name too long"
    if any("\ud800" <= c <= "\udfff" or c < " " for c in name):
        return "function name with a control character or a lone surrogate"
    if tool_names is not None and name not in tool_names:
        return f"function {name[:64]!r} is not among the request's tools"
    return None


class CallObject:
    def __init__(self, tool_names: Collection[str] | None) -> None:
        self.tool_names = tool_names
        self.name: str | None = None
        self.done = False
        self.error: str | None = None
        self._args: list[str] = []  # canonical arguments text not yet taken
        self._has_args = False
        self._state = _START
        self._reader: JsonValue | None = None
        self._key = ""

    def take_arguments(self) -> str:
        """The canonical arguments text read since the last call (all of it once `done`)."""
        out = "".join(self._args)
        self._args.clear()
        return out

    def _fail(self, why: str) -> None:
        self.error = why
        self._state = _END

    def feed(self, text: str, pos: int = 0) -> int:
        n = len(text)
        while pos < n and self._state != _END:
            state = self._state
            if state in (_KEY_TEXT, _VALUE):
                pos = self._read(text, pos)
                continue
            c = text[pos]
            if c in WS:
                pos += 1
                continue
            if state == _START:
                if c != "{":
                    self._fail("a call must be a JSON object")
                    break
                self._state = _FIRST_KEY
            elif state in (_FIRST_KEY, _KEY):
                if c == '"':
                    self._reader = JsonValue(decode=True)
                    self._state = _KEY_TEXT
                    continue  # the reader reads the opening quote
                if c == "}" and state == _FIRST_KEY:
                    self._close()
                else:
                    self._fail("expected a property name in double quotes")
                    break
            elif state == _COLON:
                if c != ":":
                    self._fail("expected ':' after a property name")
                    break
                if self._key in ARGUMENT_KEYS:
                    if self._has_args:
                        self._fail("arguments given twice")
                        break
                    self._has_args = True
                elif self._key == "name" and self.name is not None:
                    self._fail("name given twice")
                    break
                self._reader = JsonValue(decode=self._key == "name" or self._key in ARGUMENT_KEYS)
                self._state = _VALUE
            elif state == _AFTER:
                if c == ",":
                    self._state = _KEY
                elif c == "}":
                    self._close()
                else:
                    self._fail("expected ',' or '}'")
                    break
            pos += 1
        return pos

    def _read(self, text: str, pos: int) -> int:
        reader = self._reader
        assert reader is not None
        pos = reader.feed(text, pos)
        if reader.error is not None:
            self._fail(reader.error)
            return pos
        if self._state == _KEY_TEXT:
            if reader.done:
                self._key = reader.text()
                self._state = _COLON
            return pos
        key = self._key
        if key in ARGUMENT_KEYS:
            if reader.kind not in (None, "{", '"'):
                self._fail("arguments must be a JSON object")
                return pos
            if reader.kind == "{":
                self._args.append(reader.take())
            if reader.done and reader.kind == '"':
                self._string_arguments(reader.text())
        elif key == "name":
            if reader.kind is not None and reader.kind != '"':
                self._fail("the function name must be a string")
                return pos
            if reader.done:
                name = reader.text()
                why = name_error(name, self.tool_names)
                if why is not None:
                    self._fail(why)
                    return pos
                self.name = name
        else:
            reader.take()  # another key: checked as JSON, not kept
        if reader.done and self.error is None:
            self._state = _AFTER
        return pos

    def _string_arguments(self, text: str) -> None:
        inner = JsonValue()
        end = inner.feed(text)
        if inner.error is not None or not inner.done or inner.kind != "{" or text[end:].strip(" \t\n\r"):
            self._fail("arguments must be a JSON object")
            return
        self._args.append(inner.take())

    def _close(self) -> None:
        if self.name is None:
            self._fail("a call needs a name")
            return
        if not self._has_args:
            self._args.append("{}")
            self._has_args = True
        self.done = True
        self._state = _END
