"""What the three stream parsers share: the deltas they give out, content through `ContentText`,
calls numbered from 0, and `parse` as the stream over the whole text (so both always agree)."""
from __future__ import annotations

from collections.abc import Collection

from lockgate.server.tool_parsers.base import (
    ContentDelta,
    Delta,
    ParsedOutput,
    ToolCallDelta,
    collect,
    new_call_id,
)
from lockgate.server.tool_parsers.content import ContentText


def held_prefix(text: str, marker: str) -> int:
    """How many characters at the end of `text` could begin `marker` (held until decided)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class StreamBase:
    def __init__(self, tool_names: Collection[str] | None) -> None:
        self.tool_names = tool_names
        self.calls = 0  # calls begun (their first delta given out)
        self.finished = False
        self._content = ContentText()
        self._out: list[Delta] = []

    def _text(self, text: str) -> None:
        out = self._content.add(text)
        if out:
            self._out.append(ContentDelta(out))

    def _begin_call(self, name: str) -> None:
        self._content.call()
        self._out.append(ToolCallDelta(index=self.calls, id=new_call_id(), name=name, arguments=""))
        self.calls += 1

    def _arguments(self, fragment: str) -> None:
        if fragment:
            self._out.append(ToolCallDelta(index=self.calls - 1, id=None, name=None, arguments=fragment))

    def _drain(self) -> list[Delta]:
        """The deltas given out since the last call: adjacent content merged, and adjacent fragments
        of one call's arguments (a call's first delta stays apart, with `arguments=""`)."""
        out: list[Delta] = []
        for d in self._out:
            last = out[-1] if out else None
            if isinstance(d, ContentDelta) and isinstance(last, ContentDelta):
                out[-1] = ContentDelta(last.text + d.text)
            elif (isinstance(d, ToolCallDelta) and d.id is None and isinstance(last, ToolCallDelta)
                  and last.id is None and last.index == d.index):
                out[-1] = ToolCallDelta(index=d.index, id=None, name=None, arguments=last.arguments + d.arguments)
            else:
                out.append(d)
        self._out.clear()
        return out

    def feed(self, delta: str) -> list[Delta]:
        if self.finished:
            raise RuntimeError("feed after finish")
        if delta:
            self._step(delta)
        return self._drain()

    def finish(self) -> list[Delta]:
        if not self.finished:
            self.finished = True
            self._end()
            tail = self._content.finish()
            if tail:
                self._out.append(ContentDelta(tail))
        return self._drain()

    def _step(self, delta: str) -> None:
        raise NotImplementedError

    def _end(self) -> None:
        raise NotImplementedError


class ParserBase:
    """A parser: `parse(text)` is `stream()` run over the whole text."""

    name = ""
    stream_class: type[StreamBase] = StreamBase

    def __init__(self, tool_names: Collection[str] | None = None) -> None:
        self.tool_names = frozenset(tool_names) if tool_names is not None else None

    def stream(self) -> StreamBase:
        return self.stream_class(self.tool_names)

    def parse(self, text: str) -> ParsedOutput:
        s = self.stream()
        return collect(s.feed(text) + s.finish())
