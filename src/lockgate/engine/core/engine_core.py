"""EngineCore: the synchronous heart of the engine (scheduler + KV cache + runner).

It only deals in token ids: requests come in already tokenized and validated,
each `step()` returns the new token ids per request. Detokenization and stop
strings live in the frontend (`frontend/output_processor.py`), off this hot loop.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from lockgate.engine.config import EngineConfig, checkpoint_load_format
from lockgate.engine.core.fake_runner import FakeRunner
from lockgate.engine.core.kv_cache import KVCacheManager
from lockgate.engine.core.request import Request, RequestStatus
from lockgate.engine.core.scheduler import Scheduler
from lockgate.engine.core.speculator import Speculator, build_speculator
from lockgate.engine.loader import LoadedCheckpoint, load_checkpoint
from lockgate.engine.messages import EngineCoreOutput, EngineCoreRequest, EngineStats, check_tenant
from lockgate.engine.sampling_params import SamplingParams
from lockgate.engine.step_stats import ITERATION_TOKENS_BUCKETS, STEP_SECONDS_BUCKETS, HistogramCounts
from lockgate.engine.structured.decoding import StructuredDecoding

if TYPE_CHECKING:  # the real runner (and torch) load only when a model runs: fake cores stay torch-free
    from lockgate.engine.core.runner import ModelRunner

log = logging.getLogger(__name__)

# Without an explicit max_model_len, very long-context models are capped so the
# rope tables and a single request's KV stay reasonable on small machines.
DEFAULT_MAX_MODEL_LEN_CAP = 32768
# An idle core whose only requests wait for their grammars sleeps this long at most per step.
GRAMMAR_IDLE_WAIT_S = 0.005


def resolve_max_model_len(config: EngineConfig, model_max: int) -> int:
    if config.max_model_len is not None:
        if config.max_model_len > model_max:
            raise ValueError(f"max_model_len {config.max_model_len} exceeds the model's limit {model_max}")
        return config.max_model_len
    return min(model_max, DEFAULT_MAX_MODEL_LEN_CAP)


def check_vocab_ids(params: SamplingParams, vocab: int, max_logprobs: int) -> None:
    """Token ids in the sampling params against the model's vocabulary, and the logprob counts
    against the engine's bound: the frontend checks first, the core again (they cross a socket)."""
    for name, ids in (("logit_bias", params.logit_bias), ("allowed_token_ids", params.allowed_token_ids)):
        bad = next((t for t in ids or () if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"{name}: token id {bad} is outside the vocabulary [0, {vocab})")
    for word in params.bad_words_token_ids or ():
        bad = next((t for t in word if not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"bad_words: token id {bad} is outside the vocabulary [0, {vocab})")
    for name in ("logprobs", "prompt_logprobs"):
        k = getattr(params, name)
        if k is not None and k > max_logprobs:
            raise ValueError(f"{name} must be <= {max_logprobs}, got {k}")


class EngineCore:
    def __init__(self, config: EngineConfig, ckpt: LoadedCheckpoint | None = None, *,
                 record_kv_events: bool = False) -> None:
        """`record_kv_events`: the KV cache records its events (`kv.take_events()`) for the
        core process's publisher; off for the offline engine."""
        self.config = config
        fake = config.load_format == "fake"
        if not fake:
            import torch

            if config.num_threads:
                torch.set_num_threads(config.num_threads)
            torch.manual_seed(config.seed)
        # "fake" reads only the checkpoint's config and tokenizer (weights are lazy, never called).
        ckpt = ckpt or load_checkpoint(config.model, checkpoint_load_format(config.load_format))
        self.model_config = ckpt.config
        self.tokenizer = ckpt.tokenizer
        model_max = ckpt.config.max_position_embeddings
        if ckpt.config.sliding_window:  # full attention equals sliding-window attention only inside the window
            model_max = min(model_max, ckpt.config.sliding_window)
        max_len = resolve_max_model_len(config, model_max)
        self.runner: ModelRunner | FakeRunner
        if fake:
            self.runner = FakeRunner(config, ckpt, max_len)
        else:
            from lockgate.engine.core.runner import ModelRunner

            self.runner = ModelRunner(config, ckpt, max_len)
        # One request must fit in the pool on its own, or preemption could never make room.
        self.max_model_len = min(max_len, self.runner.num_blocks * config.block_size)
        if not config.enable_chunked_prefill and config.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"without chunked prefill, max_num_batched_tokens ({config.max_num_batched_tokens}) "
                f"must be >= max_model_len ({self.max_model_len})")
        self.kv = KVCacheManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching,
                                 record_events=record_kv_events)
        self.scheduler = Scheduler(config, self.kv)
        self.eos_token_ids = self.runner.eos_token_ids  # one source for stopping and min_tokens masking
        # Structured outputs: grammars compile on a worker thread; the llguidance tokenizer is built there
        # with the first constrained request (logits width = the model's vocabulary).
        self.structured = StructuredDecoding(
            self.tokenizer, self.model_config.vocab_size, self.eos_token_ids,
            compile_timeout_s=config.grammar_compile_timeout_s,
            max_queued_compiles_per_tenant=config.max_queued_compiles_per_tenant)
        # Requests the core dropped after accepting them (a grammar that failed to compile, a token the
        # grammar rejected): (request id, message), for the caller to fail them (`take_failed`).
        self._failed: list[tuple[str, str]] = []
        # Request timelines (monotonic): entry time until first scheduled, then (entry, scheduled)
        # until the first output carries them out. Both stay empty in steady decoding: no per-step cost.
        self._queued_at: dict[str, float] = {}
        self._started_at: dict[str, tuple[float, float]] = {}
        # Speculative decoding (engine/spec/): proposals before each step, verified in it.
        self.speculator: Speculator | None = None
        if config.speculative_config is not None:
            if fake:
                raise ValueError("speculative_config needs a model: load_format='fake' runs none")
            self.speculator = build_speculator(config.speculative_config, self.runner, ckpt, config)
        self.step_seconds = HistogramCounts.empty(STEP_SECONDS_BUCKETS)
        self.iteration_tokens = HistogramCounts.empty(ITERATION_TOKENS_BUCKETS)
        self.last_step_end = time.monotonic()  # when the latest step's tokens were sampled
        log.info("engine ready: %s, %d KV blocks of %d tokens, max_model_len %d, %s on %s",
                 ckpt.config.architecture, self.runner.num_blocks, config.block_size,
                 self.max_model_len, self.runner.dtype, self.runner.device)

    # ---- requests -------------------------------------------------------------
    def add_request(self, req: EngineCoreRequest) -> None:
        if req.request_id in self.scheduler.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        n = len(req.prompt_token_ids)
        if n == 0:
            raise ValueError("prompt must contain at least one token")
        vocab = self.model_config.vocab_size
        if min(req.prompt_token_ids) < 0 or max(req.prompt_token_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab}) (the vocabulary size)")
        check_tenant(req.tenant, req.tenant_weight)
        check_vocab_ids(req.params, vocab, self.config.max_logprobs)
        room = self.max_model_len - n
        max_tokens = req.params.max_tokens if req.params.max_tokens is not None else room
        if max_tokens > room:
            raise ValueError(
                f"prompt ({n} tokens) + max_tokens ({max_tokens}) exceeds max_model_len ({self.max_model_len})")
        request = Request(req, self.eos_token_ids, max_tokens)
        if req.params.structured is not None:
            self.structured.add(request)  # compiles on the worker; scheduled once ready
        self.scheduler.add(request)
        self._queued_at[req.request_id] = time.monotonic()

    def abort_requests(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._queued_at.pop(rid, None)
            self._started_at.pop(rid, None)
            self.structured.discard(rid)
            if self.speculator is not None:
                self.speculator.discard(rid)
            req = self.scheduler.requests.get(rid)
            if req is not None:
                self.scheduler.finish(req)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def take_failed(self) -> list[tuple[str, str]]:
        """(request id, message) of the requests dropped since the last call: their grammar did not
        compile, or rejected a sampled token. They produce no output; the caller fails them."""
        failed, self._failed = self._failed, []
        return failed

    def _fail(self, req: Request, message: str) -> None:
        self._queued_at.pop(req.request_id, None)
        self._started_at.pop(req.request_id, None)
        self.structured.discard(req.request_id)
        self.scheduler.finish(req)
        self._failed.append((req.request_id, message))

    # ---- the step ---------------------------------------------------------------
    def step(self) -> list[EngineCoreOutput]:
        t0 = time.monotonic()
        if self.structured.pending:
            for req, message in self.structured.take_failed():
                if req.status != RequestStatus.FINISHED:
                    self._fail(req, message)
        spec = self.speculator
        if spec is not None:
            spec.propose(self.scheduler.running, self._prefill_rows())
        batch = self.scheduler.schedule()
        if spec is not None:
            spec.scheduled(batch.requests)
        if not batch.requests:
            if self.structured.pending:  # only compiling requests left: no busy loop meanwhile
                self.structured.wait(GRAMMAR_IDLE_WAIT_S)
            return []
        if self._queued_at:  # requests scheduled for the first time: their queue wait ends now
            for req in batch.requests:
                queued = self._queued_at.pop(req.request_id, None)
                if queued is not None:
                    self._started_at[req.request_id] = (queued, t0)
        # Prompt tokens computed this step (chunks count as they run; prefix-cache hits are not computed).
        # A generator, not a loop: this runs every step over the whole batch (decodes add nothing).
        prompt_tokens = sum(min(start + n, len(req.prompt_token_ids)) - start
                            for req, start, n in zip(batch.requests, batch.start, batch.num_tokens)
                            if start < len(req.prompt_token_ids))
        # Bitmasks for the constrained requests that sample in this step (None: there are none).
        masks = self.structured.step_masks([
            req for req, start, n in zip(batch.requests, batch.start, batch.num_tokens)
            if req.grammar is not None and start + n == req.num_tokens and req.max_tokens])
        sampled = self.runner.execute(batch, masks)
        self.scheduler.after_step(batch)  # before the tokens are appended: it reads the accepted proposals
        if spec is not None:
            spec.after_step(self.scheduler.running)
        outputs: list[EngineCoreOutput] = []
        num_sampled = 0
        for req, tokens, lps in sampled:
            first = not req.output_token_ids
            if tokens is None:  # max_tokens=0: the prompt is computed (prompt logprobs, pooling), nothing sampled
                outputs.append(EngineCoreOutput(
                    request_id=req.request_id, new_token_ids=[], finish_reason="length",
                    num_cached_tokens=req.num_cached_tokens,
                    start_times=self._started_at.pop(req.request_id, None),
                    prompt_logprobs=req.take_prompt_logprobs(), embedding=req.embedding))
                self._finish(req)
                continue
            new: list[int] = []
            finish = stop_reason = None
            failed = False
            for token in tokens:  # one, or a verify step's accepted proposals and the token after them
                req.output_token_ids.append(token)
                new.append(token)
                finish, stop_reason = self._check_stop(req, token)
                if req.grammar is not None:
                    try:
                        if req.grammar.accept(token) == "stop" and finish != "stop":
                            finish, stop_reason = "stop", None  # EOS after a complete grammar (min_tokens yields)
                    except ValueError as exc:
                        self._fail(req, str(exc))
                        failed = True
                        break
                if finish is not None:
                    break
            if failed:
                continue
            num_sampled += len(new)
            assert lps is not None
            new_lps = lps[:len(new)] if lps[0] is not None else None
            outputs.append(EngineCoreOutput(
                request_id=req.request_id, new_token_ids=new,
                new_logprobs=new_lps,  # type: ignore[arg-type]
                finish_reason=finish, stop_reason=stop_reason,
                num_cached_tokens=req.num_cached_tokens if first else 0,
                start_times=self._started_at.pop(req.request_id, None) if first else None,
                prompt_logprobs=req.take_prompt_logprobs() if first else None,
                num_draft_tokens=req.num_draft_tokens, num_accepted_tokens=req.num_accepted_tokens))
            if finish is not None:
                self._finish(req)
        t1 = time.monotonic()
        self.last_step_end = t1
        self.step_seconds.observe(t1 - t0, STEP_SECONDS_BUCKETS)
        self.iteration_tokens.observe(prompt_tokens + num_sampled, ITERATION_TOKENS_BUCKETS)
        return outputs

    def _finish(self, req: Request) -> None:
        self.scheduler.finish(req)
        if self.speculator is not None:
            self.speculator.discard(req.request_id)

    def _prefill_rows(self) -> int:
        """About how many prompt tokens the coming step computes (the speculation plan's base)."""
        pending = sum(r.num_tokens - r.num_computed_tokens for r in self.scheduler.running if not r.is_decode)
        if self.scheduler.waiting:
            pending += self.config.max_prefill_tokens
        return min(pending, self.config.max_prefill_tokens)

    @staticmethod
    def _check_stop(req: Request, token: int) -> tuple[str | None, int | None]:
        n_out = req.num_output_tokens
        if n_out >= req.params.min_tokens:
            if token in req.eos_token_ids:
                return "stop", None
            if token in req.stop_token_ids:
                return "stop", token
        if n_out >= req.max_tokens:
            return "length", None
        return None, None

    def stats(self) -> EngineStats:
        s, kv = self.scheduler, self.kv
        return EngineStats(
            num_running=len(s.running), num_waiting=len(s.waiting), num_waiting_tokens=s.num_waiting_tokens,
            num_free_blocks=kv.num_free_blocks, num_total_blocks=kv.num_blocks, kv_cache_usage=kv.usage,
            prefix_cache_queries=kv.prefix_queries, prefix_cache_hits=kv.prefix_hits,
            num_preemptions=s.num_preemptions, step_seconds=self.step_seconds,
            iteration_tokens=self.iteration_tokens, structured=self.structured.stats(),
            spec=self.speculator.stats if self.speculator is not None else None)
