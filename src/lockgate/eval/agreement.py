"""Greedy token agreement between two answers: the figures shared by `lockgate eval`,
the online quality gate and shadow comparison (lifecycle imports them from here)."""
from __future__ import annotations

from collections.abc import Sequence

FIRST_TOKENS = 32  # the greedy prefix compared for an exact match


def token_agreement(a: Sequence[int], b: Sequence[int]) -> float:
    """Fraction of positions where two greedy answers hold the same token (over the longer one;
    two empty answers agree)."""
    n = max(len(a), len(b))
    if n == 0:
        return 1.0
    return sum(x == y for x, y in zip(a, b)) / n


def first_tokens_match(a: Sequence[int], b: Sequence[int], k: int = FIRST_TOKENS) -> bool:
    """Whether the first `k` tokens of two greedy answers are identical."""
    return list(a[:k]) == list(b[:k])
