"""A chat request's tools: `tools`, `tool_choice` and `parallel_tool_calls` checked, the grammar
that enforces `required` and a named function, and the tools as the chat template sees them.

- `required` / a named function: the answer is constrained to a JSON array of calls
  `[{"name": ..., "arguments": {...}}]` (at least one; exactly one for a named function or with
  `parallel_tool_calls: false`), each call's arguments to its function's parameters schema;
  the answer is then parsed into `tool_calls` (tool_output.py).
- `auto`: the model chooses; its text is parsed by the server's tool-call parser.
- `none`: the tools are still shown to the template (as OpenAI does), nothing is parsed.

A template that renders tools (it reads the `tools` variable, or the model has a `tool_use`
template) gets them as transformers passes them; one that does not gets them in a system message
(`fallback_messages`), so the model still sees them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from lockgate.errors import bad_request
from lockgate.server.protocol import ChatCompletionRequest, NamedToolChoice
from lockgate.server.structured import Constraint, _build, schema_text

# A function without `parameters` takes none: its arguments are the empty object.
_NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}


@dataclass(slots=True)
class ToolSetup:
    """What a request asked of its tools."""

    tools: list[dict[str, Any]]  # OpenAI's shape, for the chat template
    choice: str  # "none" | "auto" | "required" | "named"
    named: str | None = None  # the function a named tool_choice forces
    parallel: bool = True
    constraint: Constraint | None = None  # required / named: the calls' grammar
    parameters: dict[str, str] = field(default_factory=dict)  # name -> its parameters schema as JSON text
    # Each function's parameters as a constraint of its own, so that a schema the grammar engine
    # refuses is a 400 naming that tool, whatever the tool_choice (structured.check_compiles).
    checks: list[Constraint] = field(default_factory=list)

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "named")


def tool_setup(req: ChatCompletionRequest) -> ToolSetup | None:
    """The request's tools checked (400s naming the field), or None without tools."""
    choice = req.tool_choice
    if not req.tools:
        if isinstance(choice, NamedToolChoice) or choice == "required":
            raise bad_request("tool_choice requires tools", param="tool_choice")
        return None
    names: set[str] = set()
    parameters: dict[str, str] = {}
    checks: list[Constraint] = []
    for i, tool in enumerate(req.tools):
        fn = tool.function
        if fn.name in names:
            raise bad_request(f"tools: the function name {fn.name!r} is given twice", param=f"tools.{i}.function.name")
        names.add(fn.name)
        if fn.parameters is not None:
            param = f"tools.{i}.function.parameters"
            parameters[fn.name] = schema_text(fn.parameters, param)
            checks.append(_build(param, json=parameters[fn.name]))
    tools = [t.model_dump(by_alias=True, exclude_none=True, include={"type", "function"}) for t in req.tools]
    parallel = req.parallel_tool_calls is not False
    if choice is None or choice == "auto":
        return ToolSetup(tools, "auto", parallel=parallel, parameters=parameters, checks=checks)
    if choice == "none":
        return ToolSetup(tools, "none", parallel=parallel, parameters=parameters, checks=checks)
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            shown = choice.function.name[:64]
            raise bad_request(f"tool_choice names the function {shown!r}, which is not in tools",
                              param="tool_choice.function.name")
        schema = calls_schema({choice.function.name: parameters.get(choice.function.name)}, max_items=1)
        return ToolSetup(tools, "named", choice.function.name, parallel, _build("tools", json=schema), parameters,
                         checks)
    schema = calls_schema({n: parameters.get(n) for n in names_in_order(req)}, None if parallel else 1)
    return ToolSetup(tools, "required", None, parallel, _build("tools", json=schema), parameters, checks)


def names_in_order(req: ChatCompletionRequest) -> list[str]:
    return [t.function.name for t in req.tools or ()]


def calls_schema(functions: dict[str, str | None], max_items: int | None) -> str:
    """The JSON schema of a non-empty array of calls `{"name", "arguments"}`, one alternative per
    function (its name a constant, its arguments its parameters schema), as JSON text."""
    alternatives = []
    for name, params in functions.items():
        arguments = json.loads(params) if params is not None else _NO_PARAMETERS
        alternatives.append({"type": "object",
                             "properties": {"name": {"const": name}, "arguments": arguments},
                             "required": ["name", "arguments"], "additionalProperties": False})
    items = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
    schema: dict[str, Any] = {"type": "array", "items": items, "minItems": 1}
    if max_items is not None:
        schema["maxItems"] = max_items
    return json.dumps(schema, separators=(",", ":"))


# ---- the tools as the model sees them ------------------------------------------------------------

def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Assistant tool calls with their `arguments` as a JSON object where they are one: the common
    templates (Llama 3.1, Hermes, Qwen2.5) write them with `tojson`, which would quote a string
    again (vLLM does the same); arguments that are not a JSON object stay the client's string."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if calls:
            m = {**m, "tool_calls": [_call_for_template(c) for c in calls]}
        out.append(m)
    return out


def _call_for_template(call: dict[str, Any]) -> dict[str, Any]:
    fn = call["function"]
    try:
        args = json.loads(fn["arguments"])
    except ValueError:
        args = None
    if not isinstance(args, dict):
        return call
    return {**call, "function": {**fn, "arguments": args}}


def _call_text(call: dict[str, Any]) -> str:
    fn = call["function"]
    try:
        args = json.loads(fn["arguments"])
    except ValueError:
        args = fn["arguments"]
    return "<tool_call>\n" + json.dumps({"name": fn["name"], "arguments": args}) + "\n</tool_call>"


def calls_as_content(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For a template that does not render tool calls: earlier assistant calls written into their
    message's content (`<tool_call>` blocks), so the model still sees them."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if calls:
            body = "\n".join(_call_text(c) for c in calls)
            m = {k: v for k, v in m.items() if k != "tool_calls"}
            m["content"] = f"{m['content']}\n{body}" if m.get("content") else body
        out.append(m)
    return out


def fallback_messages(messages: list[dict[str, Any]], setup: ToolSetup) -> list[dict[str, Any]]:
    """For a template that does not render tools: the tools and how to call them in a system
    message (merged into the first one if there is one); earlier calls as `calls_as_content`."""
    lines = ["You can call these functions (JSON signatures, one per line):"]
    lines += [json.dumps(t["function"], ensure_ascii=False) for t in setup.tools]
    if setup.forced:
        lines.append('Answer with a JSON array of calls: [{"name": "<function name>", "arguments": {...}}].')
    else:
        lines.append("To call a function, answer with one block per call:\n<tool_call>\n"
                     '{"name": "<function name>", "arguments": {...}}\n</tool_call>\n'
                     "Otherwise answer normally.")
    text = "\n".join(lines)
    out = calls_as_content(messages)
    if out and out[0]["role"] == "system":
        return [{**out[0], "content": f"{out[0]['content']}\n\n{text}"}, *out[1:]]
    return [{"role": "system", "content": text}, *out]
