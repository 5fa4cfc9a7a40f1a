"""`llama3_json`: Llama 3.1/3.2/3.3 answer a call with the whole output as JSON,
`{"name": ..., "parameters": {...}}` (or `"arguments"`), optionally after `<|python_tag|>`, several
separated by `;`.

An output is read as calls only if it starts (after whitespace) with `<|python_tag|>` or `{`;
anything else is content, given out as it arrives. Each call is given out whole once its object is
complete and valid. If the first object is no call, the whole text is content; text after valid
calls that is not another call is content too.
"""
from __future__ import annotations

from collections.abc import Collection

from lockgate.server.tool_parsers.call_object import CallObject
from lockgate.server.tool_parsers.json_text import WS
from lockgate.server.tool_parsers.stream_base import ParserBase, StreamBase

PYTHON_TAG = "<|python_tag|>"

_LEAD, _OPEN, _OBJECT, _SEPARATOR, _NEXT, _PLAIN = range(6)


class Llama3JsonStream(StreamBase):
    def __init__(self, tool_names: Collection[str] | None) -> None:
        super().__init__(tool_names)
        self._state = _LEAD
        self._buf = ""
        self._raw: list[str] = []  # text read since the last call, given back as content if it is none
        self._call: CallObject | None = None

    def _skip_ws(self) -> bool:
        """Moves leading whitespace from the buffer to the raw text; True if something else follows."""
        rest = self._buf.lstrip(WS)
        if len(rest) != len(self._buf):
            self._raw.append(self._buf[:len(self._buf) - len(rest)])
            self._buf = rest
        return bool(rest)

    def _step(self, delta: str) -> None:
        self._buf += delta
        while self._buf:
            state = self._state
            if state == _PLAIN:
                self._text(self._buf)
                self._buf = ""
            elif state in (_LEAD, _OPEN, _NEXT):
                if not self._skip_ws():
                    return
                buf = self._buf
                if buf[0] == "{":
                    self._call = CallObject(self.tool_names)
                    self._state = _OBJECT
                elif state == _LEAD and buf.startswith(PYTHON_TAG):
                    self._raw.append(PYTHON_TAG)
                    self._buf = buf[len(PYTHON_TAG):]
                    self._state = _OPEN
                elif state == _LEAD and PYTHON_TAG.startswith(buf):
                    return  # maybe the tag: held
                else:
                    self._no_call()
            elif state == _OBJECT:
                call = self._call
                assert call is not None
                pos = call.feed(self._buf)
                self._raw.append(self._buf[:pos])
                self._buf = self._buf[pos:]
                if call.error is not None:
                    self._no_call()
                elif call.done:
                    assert call.name is not None
                    self._begin_call(call.name)
                    self._arguments(call.take_arguments())
                    self._raw = []
                    self._call = None
                    self._state = _SEPARATOR
            else:  # _SEPARATOR
                if not self._skip_ws():
                    return
                if self._buf[0] == ";":
                    self._raw = [";"]
                    self._buf = self._buf[1:]
                    self._state = _NEXT
                else:
                    self._raw = []
                    self._state = _PLAIN

    def _no_call(self) -> None:
        """What was read since the last call is content, and so is everything after it."""
        self._text("".join(self._raw))
        self._raw = []
        self._call = None
        self._state = _PLAIN

    def _end(self) -> None:
        if self._state != _SEPARATOR:
            self._text("".join(self._raw) + self._buf)
        self._raw = []
        self._buf = ""


class Llama3JsonParser(ParserBase):
    name = "llama3_json"
    stream_class = Llama3JsonStream
