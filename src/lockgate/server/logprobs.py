"""Logprobs in OpenAI's two shapes (legacy completions, chat completions) and vLLM's
`prompt_logprobs`.

The engine's entries (`dict[token id, Logprob]`) hold the token itself and its top-N
alternatives; an entry asked for with a smaller N than the engine computed (an echo and a
`prompt_logprobs` of different sizes) is cut to its own N here (`_top`).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from lockgate.engine.outputs import Logprob

# JSON has no -inf; OpenAI reports impossible tokens as -9999.0.
_FLOOR = -9999.0

TokenText = Callable[[int], str]  # a token id's text, for a token with no entry (the prompt's first)


def _lp(value: float) -> float:
    return value if math.isfinite(value) and value > _FLOOR else _FLOOR


def _token(lp: Logprob | None, token_id: int, token_text: TokenText | None = None) -> str:
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    return token_text(token_id) if token_text is not None else f"<token_{token_id}>"


def _top(entry: dict[int, Logprob], token_id: int, top_n: int | None) -> dict[int, Logprob]:
    """The token's own logprob and its `top_n` most likely alternatives (None: all the entry has)."""
    if top_n is None or len(entry) <= top_n:
        return entry
    ranked = dict(sorted(entry.items(), key=lambda kv: kv[1].logprob, reverse=True)[:top_n])
    if token_id in entry:
        ranked.setdefault(token_id, entry[token_id])
    return ranked


def completion_logprobs(token_ids: Sequence[int], entries: Sequence[dict[int, Logprob] | None], text_offset: int,
                        top_n: int | None = None, token_text: TokenText | None = None,
                        ) -> tuple[dict[str, Any], int]:
    """Legacy `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`; returns it and the
    offset after the last token (to continue from: the generated tokens after an echoed prompt,
    the next streamed chunk). A None entry (the prompt's first token) has null logprobs."""
    tokens: list[str] = []
    token_lps: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for tid, entry in zip(token_ids, entries):
        if entry is None:
            text = _token(None, tid, token_text)
            token_lps.append(None)
            tops.append(None)
        else:
            sampled = entry.get(tid)
            text = _token(sampled, tid, token_text)
            token_lps.append(_lp(sampled.logprob) if sampled is not None else _FLOOR)
            tops.append({_token(lp, i, token_text): _lp(lp.logprob) for i, lp in _top(entry, tid, top_n).items()})
        tokens.append(text)
        offsets.append(text_offset)
        text_offset += len(text)
    return ({"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets},
            text_offset)


def join_completion_logprobs(first: dict[str, Any], then: dict[str, Any]) -> dict[str, Any]:
    """Two legacy logprobs objects as one (the echoed prompt's, then the generated tokens')."""
    return {key: first[key] + then[key] for key in first}


def prompt_logprobs(prompt_ids: Sequence[int], entries: Sequence[dict[int, Logprob] | None], top_n: int,
                    ) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's `prompt_logprobs`: per prompt position null (the first) or `{token id: {"logprob",
    "rank", "decoded_token"}}` holding the prompt's token and its `top_n` alternatives."""
    out: list[dict[str, dict[str, Any]] | None] = []
    for tid, entry in zip(prompt_ids, entries):
        if entry is None:
            out.append(None)
            continue
        out.append({str(i): {"logprob": _lp(lp.logprob), "rank": lp.rank, "decoded_token": lp.decoded_token}
                    for i, lp in _top(entry, tid, top_n).items()})
    return out


def _chat_entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": _lp(logprob), "bytes": list(token.encode("utf-8"))}


def chat_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]], top_n: int) -> dict[str, Any]:
    """`{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}], "refusal": None}`."""
    content = []
    for tid, entry in zip(token_ids, entries):
        sampled = entry.get(tid)
        item = _chat_entry(_token(sampled, tid), sampled.logprob if sampled is not None else _FLOOR)
        ranked = sorted(entry.items(), key=lambda kv: kv[1].logprob, reverse=True)[:top_n]
        item["top_logprobs"] = [_chat_entry(_token(lp, i), lp.logprob) for i, lp in ranked]
        content.append(item)
    return {"content": content, "refusal": None}
