"""Frontend input processing: tokenize, validate against the model's limits, fan out n.

Also turns `bad_words` into `bad_words_token_ids` (each word with and without a
leading space, as vLLM does), checks every token id a request names
(logit_bias, allowed_token_ids, stop_token_ids) against the vocabulary, and
checks that a structured-outputs grammar compiles (`structured/grammar.py`).

Runs where requests arrive (the API process, or the offline `LLM`), so bad input
is refused before it reaches the engine core.
"""
from __future__ import annotations

import dataclasses
import time

from lockgate.engine.config import ModelConfig
from lockgate.engine.messages import EngineCoreRequest, check_tenant
from lockgate.engine.sampling_params import SamplingParams
from lockgate.engine.structured.grammar import validate as validate_structured
from lockgate.engine.tokenizer import Tokenizer


def child_request_ids(request_id: str, n: int) -> list[str]:
    """The core sees n > 1 as n plain requests; n == 1 keeps the caller's id."""
    return [request_id] if n == 1 else [f"{request_id}#{i}" for i in range(n)]


class InputProcessor:
    def __init__(self, tokenizer: Tokenizer, model_config: ModelConfig, max_model_len: int,
                 max_logprobs: int = 20) -> None:
        self.tokenizer = tokenizer
        self.model_config = model_config
        self.max_model_len = max_model_len
        self.max_logprobs = max_logprobs
        self.vocab_size = model_config.vocab_size

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)):
            ids = list(prompt)
            if any(not isinstance(t, int) or isinstance(t, bool) for t in ids):
                raise ValueError("prompt token ids must be integers")
            bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise ValueError(f"prompt token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        else:
            raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("prompt must not be empty")
        return ids

    def check(self, prompt_ids: list[int], params: SamplingParams) -> SamplingParams:
        """Validate params against this model; returns params with max_tokens filled in and
        bad_words tokenized."""
        n = len(prompt_ids)
        room = self.max_model_len - n
        if room < 0 or (room == 0 and params.max_tokens != 0):  # max_tokens=0 only scores the prompt
            raise ValueError(
                f"prompt has {n} tokens, which leaves no room to generate within max_model_len "
                f"({self.max_model_len})")
        if params.max_tokens is None:
            params = dataclasses.replace(params, max_tokens=room)
        elif params.max_tokens > room:
            raise ValueError(
                f"this model's maximum context length is {self.max_model_len} tokens, but "
                f"{n + params.max_tokens} were requested ({n} in the prompt, {params.max_tokens} "
                f"for max_tokens); reduce the prompt or max_tokens")
        if params.min_tokens > params.max_tokens:
            raise ValueError(f"min_tokens ({params.min_tokens}) must be <= max_tokens ({params.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(params, name)
            if k is not None and k > self.max_logprobs:
                raise ValueError(f"{name} must be <= {self.max_logprobs}, got {k}")
        bad = next((t for t in params.stop_token_ids or () if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"stop_token_ids contains {bad}, outside the vocabulary [0, {self.vocab_size})")
        for name, ids in (("logit_bias", params.logit_bias), ("allowed_token_ids", params.allowed_token_ids)):
            bad = next((t for t in ids or () if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise ValueError(f"{name}: token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        if params.structured is not None:
            # A schema, regex or grammar that would not compile is refused here (the core compiles it
            # later, off its step). Cached per grammar; callers on an event loop may run
            # `validate_structured` on a worker thread first, which makes this call free.
            validate_structured(params.structured)
        if params.bad_words:
            params = dataclasses.replace(params, bad_words_token_ids=self.bad_words_token_ids(params.bad_words))
        bad = next((t for ids in params.bad_words_token_ids or () for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"bad_words: token id {bad} is outside the vocabulary [0, {self.vocab_size})")
        return params

    def bad_words_token_ids(self, words: list[str]) -> list[list[int]]:
        """Token ids of each bad word as it would appear first in a text and after a space
        (vLLM's rule: the spaced form only when it is a different first token of the same
        length)."""
        out: list[list[int]] = []
        for word in words:
            bare = word.lstrip()
            if not bare:
                continue  # only whitespace: nothing to ban
            plain = self.tokenizer.encode(bare, add_special_tokens=False)
            if plain:
                out.append(plain)
            spaced = self.tokenizer.encode(" " + bare, add_special_tokens=False)
            if spaced and (not plain or (spaced[0] != plain[0] and len(spaced) == len(plain))):
                out.append(spaced)
        return out

    def process(self, request_id: str, prompt: str | list[int], params: SamplingParams, *,
                priority: int = 0, cache_salt: str | None = None,
                arrival_time: float | None = None, tenant: str = "",
                tenant_weight: float = 1.0) -> list[EngineCoreRequest]:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        check_tenant(tenant, tenant_weight)
        ids = self.tokenize(prompt)
        params = self.check(ids, params)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        children = child_request_ids(request_id, params.n)
        reqs = []
        for i, cid in enumerate(children):
            # Prompt logprobs belong to the prompt: the first child computes them, the others
            # read the prompt from the prefix cache as usual.
            p = params if params.n == 1 else dataclasses.replace(
                params, n=1, seed=None if params.seed is None else params.seed + i,
                prompt_logprobs=params.prompt_logprobs if i == 0 else None)
            reqs.append(EngineCoreRequest(
                request_id=cid, prompt_token_ids=ids, params=p, arrival_time=arrival,
                priority=priority, cache_salt=cache_salt,
                share_prefix_with=children[0] if i > 0 else None,
                tenant=tenant, tenant_weight=float(tenant_weight)))
        return reqs

