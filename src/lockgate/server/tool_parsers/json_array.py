"""`json_array`: the calls as one JSON array, `[{"name": ..., "arguments": {...}}, ...]`: the shape
a grammar forces for `tool_choice: "required"` or a named function (one element when
`parallel_tool_calls` is false).

Streamed the way OpenAI streams calls: a call's first delta as soon as its name is read (and is one
of the request's tools), then its arguments in canonical form as they arrive (`json_text.py`), so a
client sees the arguments grow token by token. This relies on the grammar: text that stops being a
call after its name went out (only possible without the grammar, or when `max_tokens` cuts the
answer) leaves that call as sent and the rest of the text as content. `parse` is stricter: unless
the whole text is an array of valid calls, it is all content. Text that is not an array, and an
array with no call, is content.
"""
from __future__ import annotations

from collections.abc import Collection

from lockgate.server.tool_parsers.base import ParsedOutput, collect
from lockgate.server.tool_parsers.call_object import CallObject
from lockgate.server.tool_parsers.json_text import WS
from lockgate.server.tool_parsers.stream_base import ParserBase, StreamBase

_LEAD, _FIRST, _ELEMENT, _AFTER, _NEXT, _TAIL, _PLAIN = range(7)


class JsonArrayStream(StreamBase):
    def __init__(self, tool_names: Collection[str] | None) -> None:
        super().__init__(tool_names)
        self._state = _LEAD
        self._buf = ""
        self._raw: list[str] = []  # text read since the last complete call
        self._call: CallObject | None = None
        self._begun = False  # the current element's first delta went out
        self.clean = False  # the text so far is an array of valid calls, closed

    def _skip_ws(self) -> bool:
        rest = self._buf.lstrip(WS)
        if len(rest) != len(self._buf):
            self._raw.append(self._buf[:len(self._buf) - len(rest)])
            self._buf = rest
        return bool(rest)

    def _consume(self, n: int) -> None:
        self._raw.append(self._buf[:n])
        self._buf = self._buf[n:]

    def _step(self, delta: str) -> None:
        self._buf += delta
        while self._buf:
            state = self._state
            if state == _PLAIN:
                self._text(self._buf)
                self._buf = ""
                continue
            if state == _ELEMENT:
                self._element()
                continue
            if not self._skip_ws():
                return
            c = self._buf[0]
            if state == _LEAD and c == "[":
                self._consume(1)
                self._state = _FIRST
            elif state in (_FIRST, _NEXT) and c == "{":
                self._call = CallObject(self.tool_names)
                self._begun = False
                self._state = _ELEMENT
            elif state == _AFTER and c == ",":
                self._consume(1)
                self._state = _NEXT
            elif (state == _FIRST or state == _AFTER) and c == "]":
                self._consume(1)
                self._state = _TAIL
                self.clean = self.calls > 0
                if not self.clean:
                    self._stop()
            elif state == _TAIL:  # text after the array: content
                self.clean = False
                self._raw = []
                self._state = _PLAIN
            else:
                self._stop()

    def _element(self) -> None:
        call = self._call
        assert call is not None
        pos = call.feed(self._buf)
        self._consume(pos)
        if call.error is not None:
            self._stop()
            return
        if not self._begun and call.name is not None:
            self._begin_call(call.name)
            self._begun = True
        if self._begun:
            self._arguments(call.take_arguments())
        if call.done:
            self._raw = []
            self._call = None
            self._begun = False
            self._state = _AFTER

    def _stop(self) -> None:
        """The text stopped being an array of calls: what is not part of a call sent is content."""
        self.clean = False
        if self._begun:  # a call already sent stays as sent; only what follows is content
            self._raw = []
        self._text("".join(self._raw))
        self._raw = []
        self._call = None
        self._begun = False
        self._state = _PLAIN

    def _end(self) -> None:
        if self._state == _TAIL:
            self._raw = []  # whitespace after the array
            return
        self.clean = False
        if not self._begun:
            self._text("".join(self._raw) + self._buf)
        self._raw = []
        self._buf = ""


class JsonArrayParser(ParserBase):
    name = "json_array"
    stream_class = JsonArrayStream

    def parse(self, text: str) -> ParsedOutput:
        s = JsonArrayStream(self.tool_names)
        deltas = s.feed(text) + s.finish()
        if not s.clean:
            return ParsedOutput(content=text or None, tool_calls=[])
        return collect(deltas)
