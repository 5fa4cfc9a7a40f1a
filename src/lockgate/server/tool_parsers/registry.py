"""Tool-call parsers by name (`--tool-call-parser NAME`, or `auto`: chosen from the chat template)."""
from __future__ import annotations

from collections.abc import Collection

from lockgate.server.tool_parsers.auto import default_parser_for
from lockgate.server.tool_parsers.base import ToolParser
from lockgate.server.tool_parsers.hermes import HermesParser
from lockgate.server.tool_parsers.json_array import JsonArrayParser
from lockgate.server.tool_parsers.llama3_json import Llama3JsonParser

AUTO = "auto"
_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesParser,
    "llama3_json": Llama3JsonParser,
    "json_array": JsonArrayParser,
}
PARSER_NAMES: tuple[str, ...] = tuple(sorted(_PARSERS))


class UnknownToolParser(ValueError):
    def __init__(self, name: object) -> None:
        super().__init__(f"unknown tool-call parser {name!r}: expected one of "
                         f"{', '.join(PARSER_NAMES)} or {AUTO}")


def get_tool_parser(name: str) -> type[ToolParser]:
    parser = _PARSERS.get(name) if isinstance(name, str) else None
    if parser is None:
        raise UnknownToolParser(name)
    return parser


def make_tool_parser(name: str, tool_names: Collection[str] | None = None) -> ToolParser:
    return get_tool_parser(name)(tool_names)


def resolve_parser_name(name: str | None, chat_template: str | None = None,
                        model_type: str | None = None) -> str | None:
    """The parser a model serves with: a given name checked, `auto` (or None) guessed from the
    template (None when nothing fits: `tool_choice: auto` then has no parser)."""
    if name is None or name == AUTO:
        return default_parser_for(chat_template, model_type)
    get_tool_parser(name)
    return name
