"""Tool-call parsers (`--tool-call-parser`): a model's own tool-call format into OpenAI `tool_calls`,
whole (`parse`) or streamed (`stream().feed/finish`). Pure Python: no engine, no server state."""
from lockgate.server.tool_parsers.auto import default_parser_for
from lockgate.server.tool_parsers.base import (
    ContentDelta,
    Delta,
    ParsedOutput,
    StreamParser,
    ToolCall,
    ToolCallDelta,
    ToolParser,
    collect,
    new_call_id,
)
from lockgate.server.tool_parsers.registry import (
    AUTO,
    PARSER_NAMES,
    UnknownToolParser,
    get_tool_parser,
    make_tool_parser,
    resolve_parser_name,
)

__all__ = [
    "AUTO", "PARSER_NAMES", "ContentDelta", "Delta", "ParsedOutput", "StreamParser", "ToolCall",
    "ToolCallDelta", "ToolParser", "UnknownToolParser", "collect", "default_parser_for", "get_tool_parser",
    "make_tool_parser", "new_call_id", "resolve_parser_name",
]
