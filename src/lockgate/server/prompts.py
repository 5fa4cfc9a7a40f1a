"""Prompts against a request's target: chat templates rendered, texts bounded and tokenized.

A text longer than the context could ever hold is refused before it is tokenized
(`max_model_len` x the longest vocabulary entry in characters, a sound bound:
it never refuses a prompt that could fit). Long texts and large conversations
are tokenized and rendered on a bounded thread pool, off the event loop: the
tokenizer's batch calls release the GIL (engine/tokenizer.py), so one worker
per core tokenizes in parallel and a burst of long prompts queues here instead
of taking every thread of asyncio's default pool.
"""
from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from lockgate.errors import bad_request
from lockgate.lifecycle.target import Target

T = TypeVar("T")

_INLINE_TOKENIZE_CHARS = 4096  # longer texts are tokenized in a worker thread
INLINE_RENDER_CHARS = 65536  # longer conversations are rendered in a worker thread
_TOKENIZE_POOL = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="tokenize")

# Template variables the server itself passes: a client may not override them.
RESERVED_TEMPLATE_KEYS = frozenset({
    "messages", "add_generation_prompt", "tools", "continue_final_message", "documents",
    "bos_token", "eos_token", "pad_token", "unk_token", "raise_exception", "strftime_now", "self",
})


async def run_blocking(fn: Callable[..., T], *args: Any) -> T:
    """Tokenizer work off the event loop, on the tokenizing threads."""
    return await asyncio.get_running_loop().run_in_executor(_TOKENIZE_POOL, fn, *args)


def check_context(target: Target, num_prompt_tokens: int, max_tokens: int | None, param: str) -> None:
    """400 context_length_exceeded when the prompt and the completion cannot both fit (no
    `max_tokens`: room for one token at least; `max_tokens: 0` scores the prompt alone)."""
    limit = target.max_model_len
    completion = 1 if max_tokens is None else max_tokens
    wanted = num_prompt_tokens + completion
    if wanted > limit:
        what = "messages" if param == "messages" else "prompt"
        raise bad_request(
            f"This model's maximum context length is {limit} tokens. However, you requested "
            f"{wanted} tokens ({num_prompt_tokens} in the {what}, {completion} in the completion). "
            f"Please reduce the length of the {what} or completion.",
            param=param, code="context_length_exceeded")


def max_prompt_chars(target: Target) -> int | None:
    """The longest text that could fit the context: max_model_len tokens of the longest text one
    token stands for. None for a tokenizer that can drop or fuse text, which has no such bound."""
    per_token = target.tokenizer.max_token_chars
    return None if per_token is None else target.max_model_len * per_token


async def check_prompt_chars(target: Target, text: str, param: str) -> None:
    """400 context_length_exceeded for a text too long to fit, before it is tokenized."""
    limit = max_prompt_chars(target)
    if limit is None or len(text) <= limit:
        return
    num_chars = await run_blocking(target.tokenizer.countable_chars, text)  # tens of ms at 4 MB
    if num_chars > limit:
        what = "messages" if param.startswith("messages") else "prompt"
        raise bad_request(
            f"This model's maximum context length is {target.max_model_len} tokens, which hold at "
            f"most {limit} characters of text. However, the {what} has {num_chars} characters. "
            f"Please reduce the length of the {what}.",
            param=param, code="context_length_exceeded")


async def encode(target: Target, text: str, add_special_tokens: bool, param: str = "prompt") -> list[int]:
    """Token ids of a prompt; a text too long for the context is refused before tokenizing."""
    tok = target.tokenizer
    await check_prompt_chars(target, text, param)
    if len(text) <= _INLINE_TOKENIZE_CHARS:
        return tok.encode(text, add_special_tokens=add_special_tokens)
    return await run_blocking(tok.encode, text, add_special_tokens)


def render_chat(target: Target, messages: list[dict[str, Any]], add_generation_prompt: bool,
                continue_final: bool, kwargs: dict[str, Any] | None) -> str:
    """The chat template's text; a template error (bad role order, ...) is a 400."""
    if continue_final and messages[-1]["role"] != "assistant":
        raise bad_request("continue_final_message needs the last message to be from the assistant",
                          param="continue_final_message")
    reserved = sorted(RESERVED_TEMPLATE_KEYS.intersection(kwargs or ()))
    if reserved:
        raise bad_request(f"chat_template_kwargs must not set {', '.join(reserved)} (the server sets them)",
                          param="chat_template_kwargs", code="invalid_value")
    try:
        text = target.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt and not continue_final, **(kwargs or {}))
    except (ValueError, TypeError) as exc:
        raise bad_request(str(exc), param="messages", code="invalid_messages") from None
    if continue_final:  # cut the end-of-turn markup after the final message's content
        last = messages[-1]["content"]
        cut = text.rfind(last)
        if last and cut >= 0:
            text = text[: cut + len(last)]
    return text


async def render_chat_async(target: Target, messages: list[dict[str, Any]], add_generation_prompt: bool,
                            continue_final: bool, kwargs: dict[str, Any] | None) -> str:
    """`render_chat` off the event loop when the messages are many or long (the rendered text is
    then bounded by `encode` before it is tokenized)."""
    args = (target, messages, add_generation_prompt, continue_final, kwargs)
    size = sum(len(m["content"]) for m in messages)
    if len(messages) < 64 and size <= INLINE_RENDER_CHARS:
        return render_chat(*args)
    return await asyncio.to_thread(render_chat, *args)
