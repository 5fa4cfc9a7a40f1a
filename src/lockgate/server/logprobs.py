"""Logprobs in OpenAI's two shapes: legacy completions and chat completions."""
from __future__ import annotations

import math
from typing import Any

from lockgate.engine.outputs import Logprob

# JSON has no -inf; OpenAI reports impossible tokens as -9999.0.
_FLOOR = -9999.0


def _lp(value: float) -> float:
    return value if math.isfinite(value) and value > _FLOOR else _FLOOR


def _token(lp: Logprob | None, token_id: int) -> str:
    return lp.decoded_token if lp is not None and lp.decoded_token is not None else f"<token_{token_id}>"


def completion_logprobs(token_ids: list[int], entries: list[dict[int, Logprob]], text_offset: int,
                        ) -> tuple[dict[str, Any], int]:
    """Legacy `{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`; returns it and the
    offset after the last token (to continue from in the next streamed chunk)."""
    tokens: list[str] = []
    token_lps: list[float] = []
    tops: list[dict[str, float]] = []
    offsets: list[int] = []
    for tid, entry in zip(token_ids, entries):
        sampled = entry.get(tid)
        text = _token(sampled, tid)
        tokens.append(text)
        token_lps.append(_lp(sampled.logprob) if sampled is not None else _FLOOR)
        tops.append({_token(lp, i): _lp(lp.logprob) for i, lp in entry.items()})
        offsets.append(text_offset)
        text_offset += len(text)
    return ({"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets},
            text_offset)


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
