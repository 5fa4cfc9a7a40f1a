"""Speculative decoding in the core: before each step, proposals for the decodes that should
carry them; after it, what was accepted.

Which decodes carry proposals, and how many, is the cost plan (engine/spec/cost.py) over the
step cost curve measured at start-up and each request's own acceptance: a request whose
proposals keep failing is paused (a backoff that doubles while it stays low), a batch large
enough to be compute-bound gets none, and `disable_by_batch_size` turns the step off outright.
Constrained requests (structured outputs) decode without proposals: their grammar would have
to check each proposal first (see docs/SPECULATIVE.md).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lockgate.engine.core.request import Request, RequestStatus
from lockgate.engine.spec.config import SpeculativeConfig
from lockgate.engine.spec.cost import StepCostCurve, break_even_batch, plan
from lockgate.engine.spec.ngram import TokenBuffer, propose_ngram
from lockgate.engine.spec.stats import SpecStats

if TYPE_CHECKING:
    from lockgate.engine.core.draft import DraftProposer

log = logging.getLogger(__name__)

DECAY = 0.8  # the weight of a request's earlier verify steps against its latest one
PRIOR_WEIGHT = 2.0  # pseudo-observations of the engine-wide acceptance a request starts from
FIRST_BACKOFF, MAX_BACKOFF = 4, 64  # steps a low-acceptance request waits before it proposes again


@dataclass(slots=True)
class _State:
    """One request's speculation: its tokens (n-gram lookup), accepted/rejected weights, backoff."""

    tokens: TokenBuffer = field(default_factory=TokenBuffer)
    accepted: float = 0.0
    rejected: float = 0.0
    skip: int = 0
    backoff: int = FIRST_BACKOFF


class Speculator:
    def __init__(self, config: SpeculativeConfig, curve: StepCostCurve,
                 draft: DraftProposer | None = None) -> None:
        self.config = config
        self.curve = curve
        self.draft = draft
        self.stats = SpecStats()
        self.states: dict[str, _State] = {}
        self.glob_accepted = self.glob_rejected = 1.0  # engine-wide, alpha 0.5 before anything is known
        self._proposed: list[tuple[Request, int]] = []
        if config.policy == "always":
            self.off_at = config.disable_by_batch_size
            log.info("speculative decoding: %s, up to %d tokens a step, policy 'always' (no cost plan)%s",
                     config.method, config.num_speculative_tokens,
                     f", off from {config.disable_by_batch_size} decodes" if config.disable_by_batch_size else "")
            return
        self.off_at = config.disable_by_batch_size or break_even_batch(curve, 0.8, config.num_speculative_tokens)
        log.info("speculative decoding: %s, up to %d tokens a step; verify-step cost %s; speculation stops at "
                 "%s decodes a step for 80%%-accepted proposals (%s)", config.method, config.num_speculative_tokens,
                 ", ".join(f"{k + 1} rows {curve.relative(k + 1):.2f}x"
                           for k in range(config.num_speculative_tokens + 1) if k in (0, 1, 3, 7, 15)),
                 self.off_at, "configured" if config.disable_by_batch_size else "measured")

    def alpha(self, st: _State) -> float:
        g = self.glob_accepted / (self.glob_accepted + self.glob_rejected)
        return (st.accepted + PRIOR_WEIGHT * g) / (st.accepted + st.rejected + PRIOR_WEIGHT)

    # ---- before the step ------------------------------------------------------------
    def propose(self, running: list[Request], prefill_rows: int) -> None:
        """Set `spec_token_ids` on the running decodes that should verify proposals this step."""
        decodes = [r for r in running if r.status == RequestStatus.RUNNING and r.is_decode]
        if len(self.states) > 2 * len(running) + 64:
            alive = {r.request_id for r in running}
            self.states = {k: v for k, v in self.states.items() if k in alive}
        if not decodes:
            return
        K = self.config.num_speculative_tokens
        if self.config.disable_by_batch_size and len(decodes) >= self.config.disable_by_batch_size:
            self.stats.num_steps_off += 1
            return
        cands: list[tuple[Request, _State, int]] = []
        for r in decodes:
            room = min(K, r.max_tokens - r.num_output_tokens - 1)
            if room < 1 or r.grammar is not None or r.params.embed:
                continue
            st = self.states.get(r.request_id)
            if st is None:
                st = self.states[r.request_id] = _State()
            if st.skip:
                st.skip -= 1
                continue
            cands.append((r, st, room))
        if not cands:
            return
        base = len(decodes) + prefill_rows
        always = self.config.policy == "always"
        if not always:
            # A big batch: not even one proposal of the best-accepted request would pay, so none is
            # looked up (the scans would cost time for nothing).
            best = max(self.alpha(st) for _, st, _ in cands)
            extra = self.draft.token_cost if self.draft is not None else 0.0
            if not plan(self.curve, base, len(decodes), [(best, 1)], extra_cost=extra)[0]:
                self.stats.num_steps_off += 1
                return
        if self.draft is None:
            proposals = [self._ngram(r, st, room) for r, st, room in cands]
            offers = [(self.alpha(st), len(p)) for (_, st, _), p in zip(cands, proposals)]
            counts = [n for _, n in offers] if always else plan(self.curve, base, len(decodes), offers)
        else:
            offers = [(self.alpha(st), room) for _, st, room in cands]
            counts = [n for _, n in offers] if always else plan(
                self.curve, base, len(decodes), offers, extra_cost=self.draft.token_cost)
            chosen = [(r, c) for (r, _, _), c in zip(cands, counts) if c]
            drafted = self.draft.propose(chosen) if chosen else {}
            proposals = [drafted.get(r.request_id, []) for r, _, _ in cands]
        if not any(counts) and any(n for _, n in offers):
            self.stats.num_steps_off += 1  # there were proposals; the plan said they would not pay
        for (r, _, _), p, c in zip(cands, proposals, counts):
            if c and p:
                r.spec_token_ids = p[:c]

    def _ngram(self, r: Request, st: _State, room: int) -> list[int]:
        c = self.config
        tokens = st.tokens.sync(r.prompt_token_ids, r.output_token_ids)
        return propose_ngram(tokens, c.prompt_lookup_min, c.prompt_lookup_max, room)

    def scheduled(self, reqs: list[Request]) -> None:
        """The step's requests as scheduled: those still carrying proposals are verified in it."""
        self._proposed = [(r, len(r.spec_token_ids)) for r in reqs if r.spec_token_ids]

    # ---- after the step ---------------------------------------------------------------
    def after_step(self, running: list[Request]) -> None:
        """Count what the step accepted (the runner set `spec_accepted`), adapt each request, and
        clear every proposal (a decode the scheduler left out this step keeps none)."""
        for r, k in self._proposed:
            a = r.spec_accepted
            r.spec_token_ids, r.spec_accepted = [], 0
            self.stats.record(k, a)
            r.num_draft_tokens += k
            r.num_accepted_tokens += a
            if self.draft is not None:
                self.draft.accepted(r, a)
            st = self.states.get(r.request_id)
            if st is None:
                continue
            missed = 1.0 if a < k else 0.0
            st.accepted = DECAY * st.accepted + a
            st.rejected = DECAY * st.rejected + missed
            self.glob_accepted = 0.99 * self.glob_accepted + a
            self.glob_rejected = 0.99 * self.glob_rejected + missed
            if self.alpha(st) < self.config.min_acceptance:
                st.skip, st.backoff = st.backoff, min(MAX_BACKOFF, 2 * st.backoff)
            else:
                st.backoff = FIRST_BACKOFF
        self._proposed = []
        for r in running:
            if r.spec_token_ids:
                r.spec_token_ids = []

    def discard(self, request_id: str) -> None:
        self.states.pop(request_id, None)
        if self.draft is not None:
            self.draft.discard(request_id)


def build_speculator(config: SpeculativeConfig, runner, ckpt, engine_config) -> Speculator:
    """The core's speculator: the step cost curve measured on this machine now, and the draft
    model (same tokenizer as the target, refused otherwise) for method draft_model."""
    from lockgate.engine.spec.cost import CALIBRATION_ROWS

    if config.policy == "always":  # the plan is not consulted: nothing to measure
        curve = StepCostCurve([1], [1.0])
    else:
        most = min(engine_config.max_num_batched_tokens,
                   engine_config.max_num_seqs * (1 + config.num_speculative_tokens))
        rows = [r for r in CALIBRATION_ROWS if r <= max(most, 2)]
        curve = StepCostCurve.from_points(runner.measure_rows(rows))
    draft = None
    if config.method == "draft_model":
        from lockgate.engine.core.draft import DraftProposer

        draft = DraftProposer(config, engine_config, ckpt, runner)
    return Speculator(config, curve, draft)
