"""Log-likelihood of a continuation after a context, from the engine's prompt logprobs.

One engine request per (context, continuation): the two token lists joined, scored with
`SamplingParams(prompt_logprobs=1, max_tokens=0)` (prefill only, nothing generated). The
continuation's log-likelihood is the sum of its tokens' prompt logprobs; it is greedy when
each of its tokens is the most likely one at its position.

Splitting the text into context and continuation tokens follows what an OpenAI-API client
such as lm-evaluation-harness does with the same tokenizer, so both score the same tokens:
trailing whitespace of the context moves to the front of the continuation, the context is
tokenized alone, the joined text whole, and the continuation is the whole text's tokens past
as many as the context has (a tokenizer that merges across the boundary gives a continuation
that starts with the merged token; the context keeps its own).
"""
from __future__ import annotations

from dataclasses import dataclass

from lockgate import LLM, SamplingParams
from lockgate.engine.tokenizer import Tokenizer


@dataclass(slots=True)
class Scored:
    loglikelihood: float
    greedy: bool  # every continuation token was the most likely one
    tokens: int  # continuation tokens


def encode_pair(tok: Tokenizer, context: str, continuation: str,
                add_special_tokens: bool = False) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) for scoring `continuation` after `context` (non-empty)."""
    if not context:
        raise ValueError("the context must not be empty")
    stripped = context.rstrip()
    if len(stripped) < len(context):
        continuation = context[len(stripped):] + continuation
        context = stripped
    whole = tok.encode(context + continuation, add_special_tokens=add_special_tokens)
    ctx = tok.encode(context, add_special_tokens=add_special_tokens)
    return ctx, whole[len(ctx):]


def score(llm: LLM, pairs: list[tuple[list[int], list[int]]]) -> list[Scored]:
    """Log-likelihood of each continuation after its context (token ids), in one batch."""
    for ctx, cont in pairs:
        if not ctx or not cont:
            raise ValueError("a scored pair needs at least one context token and one continuation token")
    params = SamplingParams(temperature=0.0, max_tokens=0, prompt_logprobs=1)
    outs = llm.generate([ctx + cont for ctx, cont in pairs], params)
    scored = []
    for (ctx, cont), out in zip(pairs, outs):
        lps = out.prompt_logprobs
        ids = ctx + cont
        if lps is None or len(lps) != len(ids):
            raise RuntimeError(f"the engine returned {None if lps is None else len(lps)} prompt logprobs "
                               f"for {len(ids)} prompt tokens")
        total, greedy = 0.0, True
        for pos in range(len(ctx), len(ids)):
            entry = lps[pos]
            if entry is None or ids[pos] not in entry:
                raise RuntimeError(f"no prompt logprob for token {ids[pos]} at position {pos}")
            mine = entry[ids[pos]].logprob
            total += mine
            greedy = greedy and mine >= max(lp.logprob for lp in entry.values())
        scored.append(Scored(total, greedy, len(cont)))
    return scored
