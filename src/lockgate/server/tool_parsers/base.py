"""The tool-call parsers' public shapes: what a parser gives back, whole or streamed.

A parser reads the text a model wrote in its own tool-call format and splits it into
content and OpenAI `tool_calls`. Streamed, it gives `Delta`s in OpenAI's streaming shape:
a call's first delta carries its index, id, name and `arguments=""`; later ones carry the
index and an arguments fragment. A call's fragments concatenated are exactly its final
`arguments` string, the same string `parse` gives for the whole text.
"""
from __future__ import annotations

import secrets
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Protocol


def new_call_id() -> str:
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True, slots=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object's text (json_text.py: json.dumps' separators, ensure_ascii=False)
    id: str = field(default_factory=new_call_id)


@dataclass(slots=True)
class ParsedOutput:
    content: str | None  # None when there is no content (empty, or whitespace around calls only)
    tool_calls: list[ToolCall]


@dataclass(frozen=True, slots=True)
class ContentDelta:
    text: str


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    index: int  # the call's position among this choice's calls, from 0
    id: str | None  # set on a call's first delta only
    name: str | None  # set on a call's first delta only
    arguments: str  # "" on the first delta, then fragments


Delta = ContentDelta | ToolCallDelta


class StreamParser(Protocol):
    """One choice's text, fed as it is generated."""

    def feed(self, delta: str) -> list[Delta]: ...

    def finish(self) -> list[Delta]: ...


class ToolParser(Protocol):
    """One model family's tool-call format. `tool_names`: the request's functions (None: any name)."""

    name: str

    def __init__(self, tool_names: Collection[str] | None = None) -> None: ...

    def parse(self, text: str) -> ParsedOutput: ...

    def stream(self) -> StreamParser: ...


def collect(deltas: list[Delta]) -> ParsedOutput:
    """Reassembles streamed deltas as a client does: content joined, each call's fragments joined."""
    content: list[str] = []
    calls: dict[int, list[str]] = {}
    heads: dict[int, tuple[str, str]] = {}
    for d in deltas:
        if isinstance(d, ContentDelta):
            content.append(d.text)
            continue
        if d.id is not None:
            heads[d.index] = (d.id, d.name or "")
            calls[d.index] = []
        calls[d.index].append(d.arguments)
    text = "".join(content)
    tool_calls = [ToolCall(id=heads[i][0], name=heads[i][1], arguments="".join(calls[i])) for i in sorted(calls)]
    return ParsedOutput(content=text or None, tool_calls=tool_calls)
