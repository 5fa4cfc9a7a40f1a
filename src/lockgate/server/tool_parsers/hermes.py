"""`hermes`: Hermes 2/3, Qwen2.5 and Qwen3 write each call as
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, any number of them, content
possibly before, between or after.

A call is given out whole (its first delta, then its arguments in one fragment) once its JSON
object is complete and valid: the model's format carries no guarantee, so nothing of a call is
sent before it is known to be one. A block that is not a valid call comes back as content,
markers included. A missing `</tool_call>` at the end of the text is forgiven, and so is text between a call's
object and its `</tool_call>` (it is content; the tag is dropped).
"""
from __future__ import annotations

from collections.abc import Collection

from lockgate.server.tool_parsers.call_object import CallObject
from lockgate.server.tool_parsers.json_text import WS
from lockgate.server.tool_parsers.stream_base import ParserBase, StreamBase, held_prefix

START = "<tool_call>"
END = "</tool_call>"

_OUTSIDE, _BODY, _CLOSE, _SKIP, _TRAIL = range(5)


class HermesStream(StreamBase):
    def __init__(self, tool_names: Collection[str] | None) -> None:
        super().__init__(tool_names)
        self._state = _OUTSIDE
        self._buf = ""  # text not yet decided
        self._raw: list[str] = []  # the current block's text, given back as content if it is no call
        self._call: CallObject | None = None

    def _step(self, delta: str) -> None:
        self._buf += delta
        while self._buf:
            buf = self._buf
            state = self._state
            if state == _OUTSIDE:
                i = buf.find(START)
                if i < 0:
                    keep = held_prefix(buf, START)
                    self._text(buf[:len(buf) - keep])
                    self._buf = buf[len(buf) - keep:]
                    return
                self._text(buf[:i])
                self._raw = [START]
                self._buf = buf[i + len(START):]
                self._call = CallObject(self.tool_names)
                self._state = _BODY
            elif state == _BODY:
                call = self._call
                assert call is not None
                pos = call.feed(buf)
                self._raw.append(buf[:pos])
                self._buf = buf[pos:]
                if call.error is not None:
                    self._not_a_call()
                elif call.done:
                    assert call.name is not None
                    self._begin_call(call.name)
                    self._arguments(call.take_arguments())
                    self._raw = []
                    self._state = _CLOSE
            elif state == _CLOSE:
                rest = buf.lstrip(WS)
                if not rest:
                    self._buf = ""
                elif rest.startswith(END):
                    self._buf = rest[len(END):]
                    self._state = _OUTSIDE
                elif END.startswith(rest):
                    self._buf = rest
                    return
                else:  # text between a call and its closing tag: content (the tag is dropped)
                    self._buf = rest
                    self._state = _TRAIL
            else:  # _SKIP: a block that is no call, given back as content up to its closing tag
                i = buf.find(END)
                if i < 0:
                    keep = held_prefix(buf, END)
                    self._text(buf[:len(buf) - keep])
                    self._buf = buf[len(buf) - keep:]
                    return
                self._text(buf[:i + len(END)] if state == _SKIP else buf[:i])
                self._buf = buf[i + len(END):]
                self._state = _OUTSIDE

    def _not_a_call(self) -> None:
        self._text("".join(self._raw))
        self._raw = []
        self._call = None
        self._state = _SKIP

    def _end(self) -> None:
        if self._state == _BODY:
            self._text("".join(self._raw) + self._buf)
        elif self._state != _CLOSE:  # in _CLOSE, a partial closing tag after a call is dropped
            self._text(self._buf)
        self._buf = ""
        self._raw = []


class HermesParser(ParserBase):
    name = "hermes"
    stream_class = HermesStream
