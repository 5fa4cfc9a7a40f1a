"""Figures that compare two models' answers, and a model against known answers."""
from __future__ import annotations

import math
from collections.abc import Sequence

from lockgate.eval.agreement import FIRST_TOKENS, first_tokens_match, token_agreement
from lockgate.eval.data import Question

ANSWER_TOKENS = 24  # tokens of a reply to a question: the accepted answer comes first in a short reply


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def agreement(a: list[list[int]], b: list[list[int]]) -> dict[str, float | int]:
    """Greedy answers of two models to the same prompts: mean fraction of positions with the same
    token, mean common-prefix fraction, answers whose first 32 tokens match, answers identical."""
    if len(a) != len(b) or not a:
        raise ValueError("agreement needs two equally long, non-empty lists of answers")
    pos = [token_agreement(x, y) for x, y in zip(a, b)]
    prefix = [common_prefix(x, y) / max(len(x), len(y), 1) for x, y in zip(a, b)]
    return {"prompts": len(a), "token_agreement": sum(pos) / len(pos), "prefix_agreement": sum(prefix) / len(prefix),
            f"first_{FIRST_TOKENS}_match_rate": sum(first_tokens_match(x, y) for x, y in zip(a, b)) / len(a),
            "identical": sum(x == y for x, y in zip(a, b))}


def accuracy(questions: list[Question], replies: list[str]) -> dict[str, float | int]:
    correct = sum(q.correct(r) for q, r in zip(questions, replies))
    return {"questions": len(questions), "correct": correct, "accuracy": correct / len(questions) if questions else 0.0}


def perplexity(token_logprobs: list[float]) -> float:
    """exp of the mean negative log-likelihood per predicted token."""
    if not token_logprobs:
        raise ValueError("perplexity needs at least one predicted token")
    return math.exp(-sum(token_logprobs) / len(token_logprobs))
