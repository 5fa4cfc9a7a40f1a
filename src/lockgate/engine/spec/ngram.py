"""N-gram prompt lookup (vLLM's "ngram", llama.cpp's lookup decoding): the request's own tokens
(prompt and output) predict its continuation. The longest suffix n-gram (prompt_lookup_max down
to prompt_lookup_min tokens) that occurred earlier proposes the tokens that followed its most
recent earlier occurrence. No model runs: a miss costs one vectorised scan, nothing else."""
from __future__ import annotations

import numpy as np


class TokenBuffer:
    """A request's tokens as a growing int32 array (appends are amortised O(1), no copy per step)."""

    __slots__ = ("data", "size")

    def __init__(self) -> None:
        self.data = np.empty(64, dtype=np.int32)
        self.size = 0

    def sync(self, prompt: list[int], output: list[int]) -> np.ndarray:
        """The buffer extended to prompt + output (which only ever grows) and returned as a view."""
        total = len(prompt) + len(output)
        if total < self.size:  # never happens for one request; restart rather than lie
            self.size = 0
        if total > self.data.shape[0]:
            grown = np.empty(max(total, 2 * self.data.shape[0]), dtype=np.int32)
            grown[: self.size] = self.data[: self.size]
            self.data = grown
        p = len(prompt)
        if self.size < p:
            self.data[self.size:p] = prompt[self.size:]
            self.size = p
        if self.size < total:
            self.data[self.size:total] = output[self.size - p:]
            self.size = total
        return self.data[:total]


def propose_ngram(tokens: np.ndarray, min_n: int, max_n: int, k: int) -> list[int]:
    """Up to k tokens that followed the most recent earlier occurrence of the longest suffix
    n-gram of `tokens` (n from max_n down to min_n); [] when none occurred."""
    L = tokens.shape[0]
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        suffix = tokens[L - n:]
        # Candidate starts i in [0, L - n - 1]: the n-gram at i, with at least one token after it
        # (i + n <= L - 1), the suffix's own position excluded.
        last = L - n
        match = tokens[0:last] == suffix[0]
        for j in range(1, n):
            if not match.any():
                break
            match &= tokens[j:last + j] == suffix[j]
        hits = np.flatnonzero(match)
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start:start + k].tolist()
    return []
