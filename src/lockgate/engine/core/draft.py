"""A draft model in the core: its own runner and small paged KV cache, a shadow request per
target request, kept in step with the target.

Each step it proposes for the requests the plan chose: the shadow catches up on the target's
tokens it has not computed (the whole prompt the first time, then the token the target drew
after the last proposals), then k greedy draft steps, all chosen requests batched in each.
After the target's verify step the shadow keeps the prefix the target accepted: the rest of its
KV is dropped and its blocks past it freed. A shadow that cannot get blocks is dropped (its
request decodes without proposals); a finished or aborted request drops its shadow.
"""
from __future__ import annotations

import dataclasses
import logging
import time

from lockgate.engine.config import EngineConfig
from lockgate.engine.core.kv_cache import KVCacheManager
from lockgate.engine.core.request import Request
from lockgate.engine.core.runner import ModelRunner
from lockgate.engine.core.scheduler import ScheduledBatch
from lockgate.engine.loader import LoadedCheckpoint, load_checkpoint
from lockgate.engine.messages import EngineCoreRequest
from lockgate.engine.sampling_params import SamplingParams
from lockgate.engine.spec.config import SpeculativeConfig
from lockgate.engine.spec.draft_check import check_same_tokenizer, describe

log = logging.getLogger(__name__)

_GREEDY = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)


class DraftProposer:
    def __init__(self, config: SpeculativeConfig, engine_config: EngineConfig, target: LoadedCheckpoint,
                 target_runner: ModelRunner) -> None:
        self.config = config
        ckpt = load_checkpoint(config.draft_path)
        check_same_tokenizer(target.tokenizer, ckpt.tokenizer, describe(engine_config.model), describe(config.draft_path))
        if ckpt.config.vocab_size > target.config.vocab_size:
            raise ValueError(f"speculative_config: the draft model's vocabulary ({ckpt.config.vocab_size}) is larger "
                             f"than the target's ({target.config.vocab_size})")
        draft_cfg = dataclasses.replace(
            engine_config, model=config.draft_path, quantization=config.draft_quantization,
            num_kv_blocks=config.draft_num_kv_blocks or target_runner.num_blocks, speculative_config=None,
            batch_invariant=False, enable_prefix_caching=False, num_threads=target_runner.threads)
        max_len = target_runner.model.rope.cos.shape[0]
        self.runner = ModelRunner(draft_cfg, ckpt, max_len)
        self.kv = KVCacheManager(self.runner.num_blocks, draft_cfg.block_size, False)
        self.shadows: dict[str, Request] = {}
        # Seconds one proposal costs (a one-row draft step), for the plan: measured, not guessed.
        self.token_cost = self.runner.measure_rows([1])[1]
        log.info("draft model %s: %s; %d KV blocks; %.2f ms a draft token", describe(config.draft_path),
                 self.runner.describe(ckpt.stored_precision), self.runner.num_blocks, 1e3 * self.token_cost)

    def _shadow(self, req: Request) -> Request:
        sh = self.shadows.get(req.request_id)
        if sh is None:
            core = EngineCoreRequest(req.request_id, [], _GREEDY, time.monotonic())
            sh = self.shadows[req.request_id] = Request(core, [], 1)
        # The shadow's tokens are the target's known tokens (its prompt list holds them all).
        sh.prompt_token_ids = req.prompt_token_ids + req.output_token_ids
        return sh

    def propose(self, chosen: list[tuple[Request, int]]) -> dict[str, list[int]]:
        """Up to k greedy draft tokens per (request, k)."""
        out: dict[str, list[int]] = {}
        live: list[tuple[Request, Request, int]] = []
        for req, k in chosen:
            sh = self._shadow(req)
            live.append((req, sh, k))
            out[req.request_id] = []
        for step in range(max(k for _, _, k in live)):
            batch = ScheduledBatch()
            for req, sh, k in live:
                if step >= k or req.request_id not in self.shadows:
                    continue
                n = sh.num_tokens - sh.num_computed_tokens
                if n < 1 or not self.kv.allocate(sh, n):
                    self.discard(req.request_id)  # no room (or nothing to do): no proposals this time
                    out.pop(req.request_id, None)
                    continue
                batch.add(sh, n)
            if not batch.requests:
                break
            sampled = self.runner.execute(batch)
            for sh, n in zip(batch.requests, batch.num_tokens):
                sh.num_computed_tokens += n
            for sh, tokens, _ in sampled:
                assert tokens
                sh.prompt_token_ids.append(tokens[0])
                out[sh.request_id].append(tokens[0])
        return {rid: toks for rid, toks in out.items() if toks}

    def accepted(self, req: Request, accepted: int) -> None:
        """After the target's verify step (before its new tokens are appended): the shadow keeps the
        target's tokens and the accepted proposals; KV past them is stale."""
        sh = self.shadows.get(req.request_id)
        if sh is None:
            return
        valid = req.num_tokens + accepted
        del sh.prompt_token_ids[valid:]
        if sh.num_computed_tokens > valid:
            sh.num_computed_tokens = valid
            self.kv.trim(sh, valid + 1)

    def discard(self, request_id: str) -> None:
        sh = self.shadows.pop(request_id, None)
        if sh is not None:
            self.kv.free(sh)
