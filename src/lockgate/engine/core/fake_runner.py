"""FakeRunner: a stand-in for `ModelRunner` that runs no model (`load_format="fake"`).

For measuring everything around the model: the gateway's own cost (issue 7's
`benchmarks/gateway_overhead.py`) and servers of known capacity for load-testing
tests (issue 9). Only the checkpoint's config and tokenizer are read (the
loader's weights are lazy and never called), so tokenization, chat templates and
length limits are the real ones; the scheduler, KV block accounting, prefix
cache and output processing all run as with a model, so admission, queueing,
preemption and streaming behave the same.

Each step:
- sleeps once (0: not at all) for `fake_step_delay_s + fake_token_delay_s *
  tokens computed in the step` (prefill and decode tokens alike). The fixed part
  is per step, not per request: a step that decodes one token for each of 50
  requests costs one delay, like a real batched decode, so with no per-token
  part a server's decode rate is `max_num_seqs / delay` tokens/s at most and one
  request's TPOT is the delay. A request of N output tokens takes N steps (the
  step that finishes its prompt samples the first token; prompts over the
  per-step prefill cap take more), so a server's capacity is about
  `max_num_seqs / (N * delay)` req/s. The per-token part makes long prompts and
  big batches cost what they would on a real accelerator (a realistic cost
  model for SLO and admission tests);
- answers each request that samples with a token derived from its last token,
  the position and its seed (deterministic across runs and processes), drawn
  from a pool of plain-text tokens that never holds an EOS or special token, so
  requests run to `max_tokens` unless a stop string or stop token id hits. The
  `n` children of a request share prompt and seed, so they get the same text.
  A constrained request (structured outputs) draws from its grammar's bitmask
  instead: EOS as soon as the grammar allows it, else an allowed token picked
  the same deterministic way, so its output is always grammar-valid (complete
  when the grammar ends soon, as a choice does; else cut at `max_tokens`);
- gives logprobs when asked: the sampled token is the top-1, with a
  deterministic probability in [0.5, 0.9); alternatives follow with geometric
  shares of the rest (valid, decreasing log-probabilities). Prompt logprobs
  likewise, per prompt position as its chunk runs: the prompt token is ranked
  first, with alternatives from the pool; a request with max_tokens=0 finishes
  when its prompt is done, with nothing sampled;
- gives a pooling request (embeddings) a deterministic pseudo-embedding of the
  model's hidden size: each token id stands for a fixed pseudo-random vector
  (a hash of the id and the dimension), the prompt's is their mean, L2-normalized
  (a bag of tokens: texts sharing tokens are close, the same text always equal).

No KV tensors are allocated; the block count is sized as the real runner sizes
it (from `num_kv_blocks`, or `kv_cache_memory_gb` at the element size of the KV
cache's type: `kv_cache_dtype` "auto" is 2 bytes, 4 under an explicit
dtype="float32"), so admission sees a pool of the usual size.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from lockgate.engine.config import EngineConfig, ModelConfig
from lockgate.engine.core.request import Request
from lockgate.engine.core.scheduler import ScheduledBatch
from lockgate.engine.loader import LoadedCheckpoint
from lockgate.engine.messages import TokenLogprob
from lockgate.engine.tokenizer import Tokenizer

if TYPE_CHECKING:
    from lockgate.engine.structured.decoding import StepMasks

log = logging.getLogger(__name__)

_ELEM_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}
_MASK64 = (1 << 64) - 1


def _mix(*values: int) -> int:
    """A small deterministic 64-bit hash (splitmix64 steps); Python's hash() is salted per process for str."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (v & _MASK64)) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h


def token_pool(tokenizer: Tokenizer, vocab_size: int, eos_token_ids: list[int]) -> list[int]:
    """Token ids that decode to plain text: ASCII letters with at most a leading space, not special.

    Falls back to every non-special id when a vocabulary has fewer than 64 such tokens."""
    limit = min(vocab_size, len(tokenizer))
    eos = set(eos_token_ids)
    ids = [i for i in range(limit) if i not in eos and not tokenizer.is_special(i)]
    plain = []
    for i in ids:
        text = tokenizer.decode([i], skip_special_tokens=False)
        word = text[1:] if text.startswith(" ") else text
        if 2 <= len(word) <= 8 and word.isascii() and word.isalpha():
            plain.append(i)
    pool = plain if len(plain) >= 64 else ids
    if not pool:
        raise ValueError("load_format='fake': the tokenizer has no usable non-special tokens")
    return pool


def token_vectors(ids: list[int], dim: int) -> np.ndarray:
    """[len(ids), dim] float64 in [-1, 1): a fixed pseudo-random vector per token id (splitmix64 of
    the id and the dimension, vectorized)."""
    x = np.asarray(ids, dtype=np.uint64)[:, None] * np.uint64(0x9E3779B97F4A7C15)
    x = x ^ np.arange(dim, dtype=np.uint64)[None, :]
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) * (2.0 / 2**53) - 1.0


def kv_elem_bytes(config: EngineConfig) -> int:
    """Bytes of one KV value, as the real runner's resolve_kv_dtype picks the type."""
    if config.kv_cache_dtype == "auto" and config.dtype == "float32":
        return 4
    return _ELEM_BYTES[config.kv_cache_dtype]


def kv_block_bytes(cfg: ModelConfig, block_size: int, elem_bytes: int) -> int:
    return cfg.num_hidden_layers * 2 * block_size * cfg.num_key_value_heads * cfg.head_dim * elem_bytes


class FakeRunner:
    """The part of `ModelRunner`'s interface `EngineCore` uses: `num_blocks`, `eos_token_ids`,
    `dtype`, `device` and `execute(batch)`."""

    def __init__(self, config: EngineConfig, ckpt: LoadedCheckpoint, max_model_len: int,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.config = config
        self.model_config = ckpt.config
        self.max_model_len = max_model_len
        self.device = "cpu"  # a name, not a torch.device: this runner never imports torch
        self.dtype = "fake"
        self.block_size = config.block_size
        self.vocab_size = ckpt.config.vocab_size
        self.eos_token_ids = list(ckpt.tokenizer.eos_token_ids or ckpt.config.eos_token_ids)
        block_bytes = kv_block_bytes(ckpt.config, self.block_size, kv_elem_bytes(config))
        self.num_blocks = config.num_kv_blocks or max(1, int(config.kv_cache_memory_gb * 2**30) // block_bytes)
        self.pool = token_pool(ckpt.tokenizer, self.vocab_size, self.eos_token_ids)
        self.step_delay_s = float(config.fake_step_delay_s)
        self.token_delay_s = float(config.fake_token_delay_s)
        self.sleep = sleep  # tests swap in a fake clock
        self.num_steps = 0  # steps executed (each slept once)
        self.total_delay_s = 0.0
        log.info("fake runner: no model weights, %d plain tokens in the pool, %.4f s per step + %.6f s per token; "
                 "KV blocks sized at %d bytes a value (kv_cache_dtype %s)", len(self.pool), self.step_delay_s,
                 self.token_delay_s, kv_elem_bytes(config), config.kv_cache_dtype)

    def next_token(self, req: Request) -> tuple[int, int]:
        """(token id, its index in the pool) for the position after the last known token."""
        pos = req.num_tokens
        last = req.output_token_ids[-1] if req.output_token_ids else req.prompt_token_ids[-1]
        seed = req.params.seed if req.params.seed is not None else 0
        k = _mix(last, pos, seed) % len(self.pool)
        return self.pool[k], k

    def logprob(self, req: Request, k: int, token: int) -> TokenLogprob:
        u = (_mix(token, req.num_tokens, 0xF00D) % 1000) / 1000.0
        p0 = 0.5 + 0.4 * u
        lp0 = math.log(p0)
        want = min(req.params.logprobs or 0, len(self.pool))  # as the sampler: top-k, sampled token first
        top = [(self.pool[(k + j) % len(self.pool)], lp0 if j == 0 else math.log((1.0 - p0) * 0.5**j))
               for j in range(want)]
        return TokenLogprob(logprob=lp0, top=top)

    def prompt_logprobs(self, req: Request, lo: int, hi: int) -> None:
        want = min(req.params.prompt_logprobs or 0, len(self.pool) + 1)
        entries = req.prompt_logprobs
        assert entries is not None
        for p in range(lo, hi):
            token = req.prompt_token_ids[p + 1]
            u = (_mix(token, p + 1, 0xBEEF) % 1000) / 1000.0
            p0 = 0.5 + 0.4 * u
            k = _mix(token, p) % len(self.pool)
            top = [(token, math.log(p0))] + [(self.pool[(k + j) % len(self.pool)], math.log((1.0 - p0) * 0.5**j))
                                             for j in range(1, want)]
            entries.append(TokenLogprob(logprob=math.log(p0), top=top[:want], rank=1))
        req.num_prompt_logprobs = hi

    def pool_prompt(self, req: Request, lo: int, hi: int) -> None:
        """Prompt positions [lo, hi) of a pooling request into its sum; the embedding once complete."""
        part = token_vectors(req.prompt_token_ids[lo:hi], self.model_config.hidden_size).sum(axis=0)
        req.pooled = part if req.pooled is None else req.pooled + part
        req.num_pooled = hi
        if hi == req.num_prompt_tokens:
            vec = req.pooled / hi
            vec /= max(float(np.linalg.norm(vec)), 1e-12)
            req.embedding = vec.astype("<f4").tobytes()
            req.pooled = None

    def step_delay(self, batch: ScheduledBatch) -> float:
        """Seconds this step sleeps: the fixed part plus the per-token part."""
        return self.step_delay_s + self.token_delay_s * batch.total_tokens

    def constrained_token(self, req: Request, masks: StepMasks) -> tuple[int, int]:
        """(token id, pool index or 0) for a constrained request: EOS when allowed, else an allowed token."""
        allowed = masks.allowed(req.request_id, self.vocab_size)
        eos = [t for t in self.eos_token_ids if t < self.vocab_size and (allowed == t).any()]
        if eos:
            return eos[0], 0
        if not len(allowed):
            return 0, 0  # nothing allowed (other settings excluded it all): the grammar rejects it
        last = req.output_token_ids[-1] if req.output_token_ids else req.prompt_token_ids[-1]
        seed = req.params.seed if req.params.seed is not None else 0
        token = int(allowed[_mix(last, req.num_tokens, seed) % len(allowed)])
        return token, 0

    def execute(self, batch: ScheduledBatch, masks: StepMasks | None = None
                ) -> list[tuple[Request, list[int] | None, list[TokenLogprob | None] | None]]:
        self.num_steps += 1
        delay = self.step_delay(batch)
        if delay > 0:
            self.sleep(delay)
            self.total_delay_s += delay
        out: list[tuple[Request, list[int] | None, list[TokenLogprob | None] | None]] = []
        for i, req in enumerate(batch.requests):
            end = batch.start[i] + batch.num_tokens[i]
            if req.prompt_logprobs is not None:
                lo, hi = req.prompt_logprob_span(batch.start[i], end)
                if lo < hi:
                    self.prompt_logprobs(req, lo, hi)
            if req.params.embed:
                lo, hi = req.pool_span(batch.start[i], end)
                if lo < hi:
                    self.pool_prompt(req, lo, hi)
            if end != req.num_tokens:
                continue  # a prefill chunk short of the end samples nothing
            if not req.max_tokens:
                out.append((req, None, None))  # max_tokens=0: prompt done, nothing sampled
                continue
            if masks is not None and req.request_id in masks.rows:
                token, k = self.constrained_token(req, masks)
            else:
                token, k = self.next_token(req)
            lp = self.logprob(req, k, token) if req.params.logprobs is not None else None
            out.append((req, [token], [lp]))
        return out
