"""`StructuredDecoding`: an engine core's structured outputs (compile, per-request matchers, masks).

Per step, `step_masks` fills one llguidance bitmask row (1 bit per token, int32 words)
for each constrained request that samples in the step, in parallel on llguidance's
own threads; the sampler applies them to those rows' logits only (`core/sampler.py`).
Unconstrained requests add nothing. Numpy only: a fake core never imports torch.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import llguidance
import numpy as np
from llguidance import LLExecutor
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask_par

from lockgate.engine.core.request import Request
from lockgate.engine.step_stats import HistogramCounts
from lockgate.engine.structured.cache import DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES, GrammarCache
from lockgate.engine.structured.compiler import (
    DEFAULT_COMPILE_TIMEOUT_S,
    DEFAULT_MAX_QUEUED_PER_TENANT,
    GrammarCompiler,
)
from lockgate.engine.structured.matcher import RequestGrammar
from lockgate.engine.structured.stats import MASK_SECONDS_BUCKETS, StructuredStats
from lockgate.engine.structured.tokenizer import build_ll_tokenizer
from lockgate.engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

BACKEND = f"llguidance {llguidance.__version__}"


@dataclass(slots=True)
class StepMasks:
    """The bitmasks of one step: row `rows[request_id]` of `bitmask` ([R, ceil(V/32)] int32, bit t of
    a row set: token t allowed); `complete[r]`: that row's grammar allows only EOS."""

    rows: dict[str, int]
    bitmask: np.ndarray
    complete: list[bool]

    def allowed(self, request_id: str, vocab_size: int) -> np.ndarray:
        """The allowed token ids of one row (the fake runner's draw)."""
        row = self.bitmask[self.rows[request_id]]
        bits = np.unpackbits(row.view(np.uint8), bitorder="little")[:vocab_size]
        return np.flatnonzero(bits)


class StructuredDecoding:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: list[int], *,
                 max_entries: int = DEFAULT_MAX_ENTRIES, max_bytes: int = DEFAULT_MAX_BYTES,
                 compile_timeout_s: float = DEFAULT_COMPILE_TIMEOUT_S,
                 max_queued_compiles_per_tenant: int = DEFAULT_MAX_QUEUED_PER_TENANT) -> None:
        self.vocab_size = vocab_size
        self.eos_token_ids = set(eos_token_ids)
        self.cache = GrammarCache(max_entries, max_bytes)
        self.compiler = GrammarCompiler(lambda: build_ll_tokenizer(tokenizer, vocab_size, eos_token_ids),
                                        self.cache, timeout_s=compile_timeout_s,
                                        max_queued_per_tenant=max_queued_compiles_per_tenant)
        self.used = False  # a constrained request came: stats are shipped from then on
        self.pending: dict[str, Request] = {}  # requests whose grammar is compiling
        self.mask_seconds = HistogramCounts.empty(MASK_SECONDS_BUCKETS)
        self._executor: LLExecutor | None = None
        log.info("structured outputs: %s (JSON schema, regex, choice, Lark/GBNF grammars), compiled on a "
                 "worker thread, cache of %d grammars / %d MiB", BACKEND, max_entries, max_bytes >> 20)

    def add(self, req: Request) -> None:
        """Start `req`'s grammar (a cache hit is ready at once)."""
        spec = req.params.structured
        assert spec is not None
        self.used = True
        req.grammar = RequestGrammar(self.compiler.submit(spec, req.tenant), self.eos_token_ids)
        if not req.grammar.ready:
            self.pending[req.request_id] = req

    def take_failed(self) -> list[tuple[Request, str]]:
        """Requests whose compile failed since the last call (and forgets the finished compiles)."""
        if not self.pending:
            return []
        self.compiler.expire()  # compiles over the time limit fail here, with their requests
        failed = []
        for rid, req in list(self.pending.items()):
            g = req.grammar
            if g is None or g.job.done:
                del self.pending[rid]
                if g is not None and g.error is not None:
                    failed.append((req, g.error))
        return failed

    def discard(self, request_id: str) -> None:
        self.pending.pop(request_id, None)

    def wait(self, timeout_s: float) -> None:
        """An idle core with only compiling requests: sleep until a compile ends (or the timeout)."""
        if self.pending:
            self.compiler.wait(timeout_s)

    def stats(self) -> StructuredStats | None:
        """The counters for `EngineStats` (None until the first constrained request: nothing to ship)."""
        if not self.used:
            return None
        c = self.compiler
        return StructuredStats(
            compiles_ok=c.num_compiled, compiles_error=c.num_failed, compiles_timeout=c.num_timed_out,
            compiles_rejected=c.num_rejected, compile_seconds=c.compile_seconds, cache_hits=self.cache.hits,
            cache_misses=self.cache.misses, mask_seconds=self.mask_seconds)

    def step_masks(self, reqs: list[Request]) -> StepMasks | None:
        """Bitmasks for the constrained requests among `reqs` (those that sample this step)."""
        rows: dict[str, int] = {}
        matchers = []
        for req in reqs:
            g = req.grammar
            if g is not None and g.ready and req.request_id not in rows:
                assert g.matcher is not None
                matchers.append((g.matcher, len(rows)))
                rows[req.request_id] = len(rows)
        if not rows:
            return None
        t0 = time.perf_counter()
        tok = self.compiler.tokenizer
        assert tok is not None  # a ready grammar was compiled with it
        bitmask = allocate_token_bitmask(len(rows), tok.vocab_size)
        if self._executor is None:
            self._executor = LLExecutor()
        fill_next_token_bitmask_par(self._executor, matchers, bitmask)
        complete = [m.is_stopped() for m, _ in matchers]
        self.mask_seconds.observe(time.perf_counter() - t0, MASK_SECONDS_BUCKETS)
        return StepMasks(rows, bitmask, complete)

    def close(self) -> None:
        self.compiler.close()
