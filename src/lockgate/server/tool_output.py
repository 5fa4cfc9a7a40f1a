"""A chat answer's tool calls: each choice's text parsed into OpenAI `tool_calls`, whole or streamed.

- `required` / a named function: the answer was constrained to a JSON array of calls and is parsed
  with the `json_array` parser. Cut by `max_tokens`, it is `finish_reason: "length"` with the partial
  text as content (streamed: the call deltas already sent stay sent; `length` says they are cut).
- `auto`: the text is parsed with the server's tool-call parser (`--tool-call-parser`); calls found
  give `tool_calls` and `finish_reason: "tool_calls"`; text that does not parse stays content;
  with `parallel_tool_calls: false` only the first call is kept.
- `none`, no tools, or no parser: the text is content, as without tools.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lockgate.server.tool_parsers import (
    ContentDelta,
    ToolCall,
    ToolParser,
    make_tool_parser,
    resolve_parser_name,
)
from lockgate.server.serving_completions import finish_reason
from lockgate.server.tools import ToolSetup

NEVER = "none"  # --tool-call-parser none: `auto` never parses


def parser_name(configured: str | None, chat_template: str | None, fallback: bool) -> str | None:
    """The parser for `tool_choice: auto`: the configured one, else the template's (auto); with the
    system-message fallback (its instruction is the `<tool_call>` format) `hermes`."""
    if configured == NEVER:
        return None
    name = resolve_parser_name(configured, chat_template)
    if name is None and fallback:
        return "hermes"
    return name


@dataclass(slots=True)
class ToolAnswers:
    """How every choice of one request is read: `parser` None means the text is plain content."""

    setup: ToolSetup | None
    parser: str | None

    @classmethod
    def of(cls, setup: ToolSetup | None, auto_parser: str | None) -> ToolAnswers:
        if setup is None or setup.choice == "none":
            return cls(setup, None)
        return cls(setup, "json_array" if setup.forced else auto_parser)

    def _make(self) -> ToolParser:
        assert self.setup is not None and self.parser is not None
        return make_tool_parser(self.parser, [t["function"]["name"] for t in self.setup.tools])

    def message(self, text: str, reason: str | None) -> tuple[dict[str, Any], str | None]:
        """A whole choice's message and its finish reason."""
        msg: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
        if self.parser is None or (reason == "length" and self.setup is not None and self.setup.forced):
            return msg, finish_reason(reason)
        parsed = self._make().parse(text)
        if not parsed.tool_calls:
            return msg, finish_reason(reason)
        calls = parsed.tool_calls if self._parallel else parsed.tool_calls[:1]
        msg["content"] = parsed.content
        msg["tool_calls"] = [call_json(c) for c in calls]
        return msg, _with_calls(reason)

    @property
    def _parallel(self) -> bool:
        return self.setup is None or self.setup.parallel

    def stream(self) -> ChoiceStream:
        return ChoiceStream(self._make() if self.parser is not None else None, 1 << 30 if self._parallel else 1)


def call_json(call: ToolCall) -> dict[str, Any]:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def _with_calls(reason: str | None) -> str | None:
    return "tool_calls" if reason is not None and reason != "length" else finish_reason(reason)


class ChoiceStream:
    """One streamed choice: text deltas in, OpenAI delta fields out (`content`, `tool_calls`)."""

    __slots__ = ("_parser", "_calls", "_max_calls")

    def __init__(self, parser: ToolParser | None, max_calls: int) -> None:
        self._parser = parser.stream() if parser is not None else None
        self._calls = 0
        self._max_calls = max_calls  # parallel_tool_calls false: the first call only

    def feed(self, text: str) -> dict[str, Any]:
        if self._parser is None:
            return {"content": text} if text else {}
        return self._fields(self._parser.feed(text)) if text else {}

    def finish(self, reason: str | None) -> tuple[dict[str, Any], str | None]:
        """What the parser held back, and the choice's finish reason."""
        if self._parser is None:
            return {}, finish_reason(reason)
        fields = self._fields(self._parser.finish())
        return fields, _with_calls(reason) if self._calls else finish_reason(reason)

    def _fields(self, deltas: list[Any]) -> dict[str, Any]:
        content = "".join(d.text for d in deltas if isinstance(d, ContentDelta))
        calls = []
        for d in deltas:
            if isinstance(d, ContentDelta) or d.index >= self._max_calls:
                continue
            if d.id is not None:
                self._calls += 1
                calls.append({"index": d.index, "id": d.id, "type": "function",
                              "function": {"name": d.name, "arguments": d.arguments}})
            else:
                calls.append({"index": d.index, "function": {"arguments": d.arguments}})
        fields: dict[str, Any] = {}
        if content:
            fields["content"] = content
        if calls:
            fields["tool_calls"] = calls
        return fields
