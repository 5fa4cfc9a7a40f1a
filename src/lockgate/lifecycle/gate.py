"""The online quality gate: a new version must pass it before it takes traffic (when asked to).

Run through the engines already loaded (no model is loaded twice): greedy answers of
the new version and of the reference (the model's stable version, or the one named)
to the bundled prompts, and their accuracy on the bundled questions, at the lowest
priority so serving traffic goes first. Perplexity needs the model's logits, which the
engine's wire protocol does not carry: it is `lockgate eval`'s (offline) alone.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

from lockgate.lifecycle.fleet import Fleet
from lockgate.engine.sampling_params import SamplingParams
from lockgate.eval import data, scoring
from lockgate.eval.scoring import ANSWER_TOKENS
from lockgate.eval.thresholds import Thresholds, judge
from lockgate.lifecycle.spec import GateSpec

GATE_TENANT = "lockgate-gate"
GATE_PROMPTS = 8  # of the bundled set: enough to see disagreement, cheap next to live traffic


async def _greedy(client: Fleet, prompts: list[list[int]], max_tokens: int, priority: int,
                  tag: str) -> list[tuple[list[int], str]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)

    async def one(i: int, ids: list[int]) -> tuple[list[int], str]:
        stream = client.add_request(f"gate-{tag}-{i}-{time.monotonic_ns()}", ids, params, priority=priority,
                                    tenant=GATE_TENANT)
        last = None
        try:
            async for out in stream:
                last = out
        finally:
            stream.abort()
        if last is None or not last.outputs:
            raise RuntimeError("the engine ended a gate request without output")
        return list(last.outputs[0].token_ids), last.outputs[0].text

    return list(await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompts))))


def _encode(client: Fleet, prompts: list[data.Prompt]) -> list[list[int]]:
    assert client.tokenizer is not None
    return data.encode_prompts(client.tokenizer, prompts)


async def run_gate(candidate: Fleet, reference: Fleet | None, reference_name: str | None,
                   spec: GateSpec, priority: int) -> dict[str, Any]:
    """The gate's report: `passed`, `failures`, the figures of both sides."""
    started = time.monotonic()
    prompts = data.load_prompts()[:GATE_PROMPTS]
    questions = data.load_questions()
    chats = [data.Prompt(messages=[{"role": "user", "content": q.question}]) for q in questions]

    async def side(client: Fleet, tag: str) -> tuple[list[list[int]], dict[str, Any]]:
        answers = await _greedy(client, _encode(client, prompts), spec.max_tokens, priority, tag)
        replies = await _greedy(client, _encode(client, chats), ANSWER_TOKENS, priority, tag + "-q")
        return [a for a, _ in answers], scoring.accuracy(questions, [r for _, r in replies])

    ids, mine = await side(candidate, "candidate")
    theirs, agree = None, None
    if reference is not None:
        ref_ids, theirs = await side(reference, "reference")
        agree = scoring.agreement(ids, ref_ids)
    t = Thresholds(min_agreement=spec.min_agreement, max_accuracy_drop=spec.max_accuracy_drop,
                   min_accuracy=spec.min_accuracy)
    verdict = judge(t, mine["accuracy"], None, theirs["accuracy"] if theirs else None, None,
                    agree["token_agreement"] if agree else None)
    return {"against": reference_name, "results": mine, "against_results": theirs, "agreement": agree,
            "thresholds": t.to_json(), **verdict, "seconds": round(time.monotonic() - started, 2)}
