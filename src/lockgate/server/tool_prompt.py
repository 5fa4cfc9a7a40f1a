"""The chat prompt of a request with tools: rendered with `tools=` by a template that reads them,
or with the tools in a system message (`tools.fallback_messages`) by one that does not.

`prompts.render_chat` renders the plain case; a template that reads `tools` is rendered here
with the same checks (the client's `chat_template_kwargs` may not set `tools`, a template error
is a 400, large conversations are rendered off the event loop).
"""
from __future__ import annotations

import asyncio
import json
from typing import Any

from lockgate.errors import bad_request
from lockgate.lifecycle.target import Target
from lockgate.server import prompts
from lockgate.server.tools import ToolSetup, calls_as_content, fallback_messages, template_messages

_INLINE_CHARS = prompts.INLINE_RENDER_CHARS


def _render(target: Target, messages: list[dict[str, Any]], add_generation_prompt: bool, continue_final: bool,
            kwargs: dict[str, Any] | None, tools: list[dict[str, Any]]) -> str:
    if continue_final and messages[-1]["role"] != "assistant":
        raise bad_request("continue_final_message needs the last message to be from the assistant",
                          param="continue_final_message")
    reserved = sorted(prompts.RESERVED_TEMPLATE_KEYS.intersection(kwargs or ()))
    if reserved:
        raise bad_request(f"chat_template_kwargs must not set {', '.join(reserved)} (the server sets them)",
                          param="chat_template_kwargs", code="invalid_value")
    try:
        text = target.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt and not continue_final, tools=tools,
            **(kwargs or {}))
    except (ValueError, TypeError) as exc:
        raise bad_request(str(exc)[:400], param="messages", code="invalid_messages") from None
    if continue_final:  # cut the end-of-turn markup after the final message's content
        last = messages[-1]["content"]
        cut = text.rfind(last) if isinstance(last, str) else -1
        if last and cut >= 0:
            text = text[: cut + len(last)]
    return text


async def render_tool_chat(target: Target, messages: list[dict[str, Any]], setup: ToolSetup | None,
                           add_generation_prompt: bool, continue_final: bool,
                           kwargs: dict[str, Any] | None) -> tuple[str, bool]:
    """The prompt's text, and whether the tools went in through the system-message fallback."""
    native = target.tokenizer.supports_tools
    if setup is None or not native:
        history = template_messages(messages) if native else calls_as_content(messages)
        fallback = setup is not None
        if fallback:
            history = fallback_messages(messages, setup)  # type: ignore[arg-type]
        text = await prompts.render_chat_async(target, history, add_generation_prompt, continue_final, kwargs)
        return text, fallback
    history = template_messages(messages)
    args = (target, history, add_generation_prompt, continue_final, kwargs, setup.tools)
    size = sum(len(m["content"]) for m in messages) + sum(len(json.dumps(t)) for t in setup.tools)
    if len(messages) < 64 and size <= _INLINE_CHARS:
        return _render(*args), False
    return await asyncio.to_thread(_render, *args), False
