"""`lockgate eval-router`: a router model against one model on the same questions, offline:
quality (accuracy on the bundled question set) and cost (tokens per model, priced) side by side.

Each question goes to the model the router's rules choose for it (gateway/model_router.py, the
same `choose` as the server's, with the default model's tokenizer for token counts); each model
then answers its share greedily with the offline `LLM`, one model in memory at a time.
"""
from __future__ import annotations

import gc
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lockgate import LLM, SamplingParams
from lockgate.eval import scoring
from lockgate.eval.data import Question
from lockgate.eval.scoring import ANSWER_TOKENS
from lockgate.gateway.model_router import ModelRouter
from lockgate.gateway.prompt_features import PromptFeatures, PromptText


@dataclass(frozen=True, slots=True)
class Served:
    """A served name as the server would load it: its version's ref, checkpoint and engine options."""

    ref: str  # NAME@VERSION: two names of one version share one load
    path: str
    engine: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Side:
    """One side's answers: per question, the model that answered, the reply and its tokens."""

    models: list[str]
    replies: list[str]
    tokens: list[int]
    rules: list[str] | None = None
    seconds: float = 0.0

    def figures(self, questions: list[Question], prices: dict[str, float]) -> dict[str, Any]:
        acc = scoring.accuracy(questions, self.replies)
        by_model: Counter[str] = Counter()
        for m, n in zip(self.models, self.tokens):
            by_model[m] += n
        priced = all(m in prices for m in by_model)
        cost = sum(prices[m] * n / 1e6 for m, n in by_model.items()) if priced else None
        out = {**acc, "routed": dict(Counter(self.models)), "tokens": dict(by_model),
               "total_tokens": sum(by_model.values()), "cost_usd": None if cost is None else round(cost, 9),
               "seconds": round(self.seconds, 2)}
        if self.rules is not None:
            out["rules"] = dict(Counter(self.rules))
        return out


def _load(s: Served, num_threads: int | None) -> LLM:
    opts = dict(s.engine)
    if num_threads is not None:
        opts["num_threads"] = num_threads
    return LLM(None if s.path == "default" else s.path, **opts)


def answer(llms: Callable[[str], LLM], names: list[str], questions: list[Question], served: dict[str, Served]
           ) -> tuple[list[str], list[int]]:
    """Each question answered by its model (`names[i]`), grouped so each model loads once."""
    replies, tokens = [""] * len(questions), [0] * len(questions)
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(served[name].ref, []).append(i)
    greedy = SamplingParams(temperature=0.0, max_tokens=ANSWER_TOKENS)
    for ref, idx in groups.items():
        llm = llms(ref)
        outs = llm.chat([[{"role": "user", "content": questions[i].question}] for i in idx], greedy)
        for i, o in zip(idx, outs):
            replies[i] = o.outputs[0].text
            tokens[i] = len(o.prompt_token_ids) + len(o.outputs[0].token_ids)
    return replies, tokens


def run(router: ModelRouter, against: str, served: dict[str, Served], questions: list[Question],
        prices: dict[str, float], num_threads: int | None = None) -> dict[str, Any]:
    """The report: the router's and the single model's figures, and how they compare."""
    by_ref = {s.ref: s for s in served.values()}
    cache: dict[str, LLM] = {}

    def llms(ref: str) -> LLM:  # the last one stays loaded (the router's default, then reused)
        if ref not in cache:
            cache.clear()
            gc.collect()  # one model in memory at a time
            cache[ref] = _load(by_ref[ref], num_threads)
        return cache[ref]

    t0 = time.monotonic()
    first = router.default or router.rules[0].model
    tok = llms(served[first].ref).tokenizer
    choices = []
    for q in questions:
        c = router.choose(PromptFeatures(PromptText([q.question], q.question),
                                          encode=lambda t: tok.encode(t, add_special_tokens=False)))
        if c is None:
            raise ValueError(f"router {router.name!r} has no rule for question {q.question[:60]!r} and no default")
        choices.append(c)
    names = [c.model for c in choices]
    replies, tokens = answer(llms, names, questions, served)
    mine = Side([served[n].ref for n in names], replies, tokens, [c.rule for c in choices], time.monotonic() - t0)
    t1 = time.monotonic()
    replies, tokens = answer(llms, [against] * len(questions), questions, served)
    theirs = Side([served[against].ref] * len(questions), replies, tokens, seconds=time.monotonic() - t1)
    cache.clear()
    gc.collect()
    ref_prices = {served[n].ref: p for n, p in prices.items() if n in served}
    a, b = mine.figures(questions, ref_prices), theirs.figures(questions, ref_prices)
    return {"router": {"name": router.name, **a}, "against": {"model": against, **b},
            "accuracy_delta": round(a["accuracy"] - b["accuracy"], 6),
            "token_ratio": round(a["total_tokens"] / b["total_tokens"], 6) if b["total_tokens"] else None,
            "cost_ratio": (round(a["cost_usd"] / b["cost_usd"], 6)
                           if a["cost_usd"] is not None and b["cost_usd"] else None)}
