"""Continuous-batching scheduler.

Every step decides `{request: num_tokens}` under a token budget
(`max_num_batched_tokens`), `max_num_seqs` and a per-step prefill cap
(`max_prefill_tokens`), in two phases:

1. Decodes: every running request whose prompt is done gets its one token, most
   important first. When KV blocks run out, the least important running request
   is preempted by recompute (its blocks are freed, it goes back to the front of
   its queue); a step that had to do this admits nothing new.
2. Prefills: running partial prefills and waiting requests, merged in importance
   order (a waiting request goes first only with a strictly better effective
   priority), each chunk limited by the remaining token budget and the remaining
   prefill cap, so a long prompt never starves the decodes. A waiting request whose
   grammar is still compiling (structured outputs) is passed over until it is ready.

Policies (`EngineConfig.scheduling_policy`, queues in `waiting.py`):
- fcfs: arrival order; no fair share, no priority preemption.
- priority: lower effective priority value first (aging lowers it with the time
  waited), fair share between tenants at the same priority (virtual token
  counters), and a waiting request that finds no slot or no blocks preempts the
  running request with the strictly worst effective priority (newest first).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from lockgate.engine.config import EngineConfig
from lockgate.engine.core.kv_cache import KVCacheManager
from lockgate.engine.core.request import Request, RequestStatus
from lockgate.engine.core.waiting import FcfsQueue, PriorityQueue, TenantCounters, effective_priority


@dataclass(slots=True)
class ScheduledBatch:
    requests: list[Request] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # tokens to compute, per request
    start: list[int] = field(default_factory=list)  # first position computed, per request
    preempted: list[Request] = field(default_factory=list)

    @property
    def total_tokens(self) -> int:
        return sum(self.num_tokens)

    def __len__(self) -> int:
        return len(self.requests)

    def add(self, req: Request, n: int) -> None:
        self.requests.append(req)
        self.start.append(req.num_computed_tokens)
        self.num_tokens.append(n)

    def drop(self, req: Request) -> int:
        """Take req out again (preempted later in the same step); returns its token count."""
        i = next(i for i, r in enumerate(self.requests) if r is req)
        del self.requests[i], self.start[i]
        return self.num_tokens.pop(i)


@dataclass(slots=True)
class _Step:
    """What is left of one step's budgets while it is being built."""

    now: float
    batch: ScheduledBatch
    budget: int  # tokens (max_num_batched_tokens)
    prefill_left: int  # prefill tokens (max_prefill_tokens)
    prefill: dict[int, int] = field(default_factory=dict)  # id(request) -> its prefill tokens
    scheduled: set[int] = field(default_factory=set)  # id(request) of every request in the batch
    memory_preempted: bool = False

    def take(self, req: Request, n: int, prefill: bool) -> None:
        self.batch.add(req, n)
        self.scheduled.add(id(req))
        self.budget -= n
        if prefill:
            self.prefill_left -= n
            self.prefill[id(req)] = n

    def give_back(self, req: Request) -> None:
        """req leaves the batch (preempted by a more important request): its tokens come back."""
        self.budget += self.batch.drop(req)
        self.scheduled.discard(id(req))
        self.prefill_left += self.prefill.pop(id(req), 0)


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCacheManager,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.kv = kv
        self.clock = clock  # aging and entry times; tests and the simulator pass a fake one
        self.priority_policy = config.scheduling_policy == "priority"
        self.aging_s = float(config.priority_aging_s)
        self.counters = TenantCounters()  # fair share; kept under the priority policy only
        self.waiting: FcfsQueue | PriorityQueue = (
            PriorityQueue(self.aging_s, self.counters) if self.priority_policy else FcfsQueue())
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self._seq = 0

    # ---- queue management --------------------------------------------------
    def add(self, req: Request) -> None:
        self.requests[req.request_id] = req
        req.enqueue_time = self.clock()
        req.seq = self._seq
        self._seq += 1
        if self.priority_policy:
            self.counters.activate(req.tenant)
        req.status = RequestStatus.WAITING
        self.waiting.push(req)

    def finish(self, req: Request) -> None:
        """Remove a request wherever it is and free its blocks (finish or abort)."""
        if req.status == RequestStatus.FINISHED:
            return
        if req.status == RequestStatus.RUNNING:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self.kv.free(req)
        req.status = RequestStatus.FINISHED
        del self.requests[req.request_id]
        if self.priority_policy:
            self.counters.deactivate(req.tenant)

    @property
    def num_waiting_tokens(self) -> int:
        return sum(r.num_tokens - r.num_computed_tokens for r in self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- importance ------------------------------------------------------------
    def effective_priority(self, req: Request, now: float) -> int:
        return effective_priority(req, now, self.aging_s) if self.priority_policy else req.priority

    def _key(self, req: Request, now: float) -> tuple[int, float, int]:
        """Lower is more important: effective priority, then arrival (the newest is the least)."""
        return (self.effective_priority(req, now), req.arrival_time, req.seq)

    def _preempt(self, victim: Request, batch: ScheduledBatch) -> None:
        victim.spec_token_ids = []  # its proposals go with its KV
        self.running.remove(victim)
        self.kv.free(victim)
        victim.num_preemptions += 1
        self.num_preemptions += 1
        batch.preempted.append(victim)
        victim.status = RequestStatus.WAITING
        self.waiting.push_front(victim)  # keeps its entry time: its aging goes on

    # ---- the step ------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        now = self.clock()
        st = _Step(now, ScheduledBatch(), self.config.max_num_batched_tokens, self.config.max_prefill_tokens)
        self.running.sort(key=lambda r: self._key(r, now))
        self._schedule_decodes(st)

        # 2. Prefills: running partial prefills and waiting requests, merged by importance.
        pending = [r for r in self.running if id(r) not in st.scheduled]  # still most important first
        admit = not st.memory_preempted  # memory is tight: let the running ones finish first
        skipped: list[Request] = []
        while st.budget > 0 and st.prefill_left > 0:
            while pending and pending[0].status != RequestStatus.RUNNING:
                pending.pop(0)  # preempted meanwhile
            run = pending[0] if pending else None
            wait = self.waiting.peek(now) if admit else None
            if wait is not None and (wait.grammar_pending or (
                    wait.share_prefix_with is not None and self._sibling_prefilling(wait))):
                # Its grammar is still compiling (on the compile worker: this step never waits for it),
                # or it waits for the sibling's prompt blocks to be cached, then shares them.
                self.waiting.pop(wait)
                skipped.append(wait)
                continue
            if run is None and wait is None:
                break
            # On a tie the running one goes first: its blocks are already paid for.
            if run is not None and (wait is None or not self.priority_policy
                                    or self.effective_priority(wait, now) >= self.effective_priority(run, now)):
                pending.pop(0)
                self._prefill_running(run, st, pending)
                if st.memory_preempted:
                    admit = False
            elif not self._admit(wait, st):
                admit = False  # the head cannot start: nobody behind it jumps the queue
        for req in reversed(skipped):  # back where they were, in the same order
            self.waiting.push_front(req)
        return st.batch

    def _schedule_decodes(self, st: _Step) -> None:
        """1. Every running decode gets its token, most important first. `running` is sorted, so the
        least important request (the victim when blocks run out) is this one or one behind it."""
        for req in list(self.running):
            if st.budget <= 0:
                break
            if req.status != RequestStatus.RUNNING or not req.is_decode:
                continue
            if req.spec_token_ids:
                # Proposals ride along as extra rows while the budget and free blocks allow; they
                # never preempt anyone (dropping them costs nothing but speed).
                k = min(len(req.spec_token_ids), st.budget - 1)
                while k > 0 and not self.kv.allocate(req, 1 + k):
                    k -= 1
                del req.spec_token_ids[max(k, 0):]
                if k > 0:
                    st.take(req, 1 + k, prefill=False)
                    continue
            while not self.kv.allocate(req, 1):
                victim = self.running[-1]
                self._preempt(victim, st.batch)
                st.memory_preempted = True
                if victim is req:
                    break
            if req.status == RequestStatus.RUNNING:
                st.take(req, 1, prefill=False)

    def _prefill_running(self, req: Request, st: _Step, behind: list[Request]) -> None:
        """The next chunk of a running request's prefill (or of its recompute after preemption)."""
        remaining = req.num_tokens - req.num_computed_tokens
        if self.config.enable_chunked_prefill:
            n = min(remaining, st.budget, st.prefill_left)
        elif remaining > st.budget:
            return
        else:
            n = remaining
        while not self.kv.allocate(req, n):
            # Never a request already in this step (a decode keeps its token): the least
            # important prefill behind this one, or this one itself.
            alive = [r for r in behind if r.status == RequestStatus.RUNNING]
            victim = alive[-1] if alive else req
            self._preempt(victim, st.batch)
            st.memory_preempted = True
            if victim is req:
                return
        st.take(req, n, prefill=True)

    def _admit(self, req: Request, st: _Step) -> bool:
        """Start a waiting request (its first chunk); False when it cannot start this step."""
        bs = self.kv.block_size
        while True:
            if len(self.running) >= self.config.max_num_seqs:
                if self._preempt_for(req, st):
                    continue
                return False
            hits = self.kv.lookup_prefix(req)
            if hits and req.prompt_logprobs is not None and not req.prompt_logprobs_done:
                # Prompt logprobs need the logits of every prompt position: a cached block
                # serves only positions whose logprobs are already known (after a preemption);
                # the first time, none. Its blocks are still cached for others as it computes.
                hits = hits[: req.num_prompt_logprobs // self.kv.block_size]
            if hits and req.params.embed:  # pooling needs every position's hidden state, as above
                hits = hits[: req.num_pooled // self.kv.block_size]
            n_full = req.num_tokens - req.num_computed_tokens - len(hits) * bs
            if self.config.enable_chunked_prefill:
                n = min(n_full, st.budget, st.prefill_left)
            elif n_full > st.budget or (n_full > st.prefill_left and st.prefill):
                return False  # a prompt is never split; the prefill cap only keeps others out
            else:
                n = n_full
            if self.kv.allocate(req, n, hits):
                break
            if not self._preempt_for(req, st):
                return False
        if req.num_preemptions == 0:  # count and charge each prompt once, not on every recompute
            req.num_cached_tokens = len(hits) * bs
            self.kv.record_lookup(req.num_prompt_tokens, req.num_cached_tokens)
            if self.priority_policy:
                self.counters.charge_prompt(req, req.num_prompt_tokens - req.num_cached_tokens)
        self.waiting.pop(req)
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        st.take(req, n, prefill=True)
        return True

    def _preempt_for(self, req: Request, st: _Step) -> bool:
        """Priority policy: make room for `req` by preempting the running request of the strictly
        worst effective priority (the newest among equals). False when there is none."""
        if not self.priority_policy:
            return False
        mine = self.effective_priority(req, st.now)
        worst: Request | None = None
        worst_key: tuple[int, float, int] | None = None
        for r in self.running:
            k = self._key(r, st.now)
            if k[0] > mine and (worst_key is None or k > worst_key):
                worst, worst_key = r, k
        if worst is None:
            return False
        if id(worst) in st.scheduled:
            st.give_back(worst)
        self._preempt(worst, st.batch)
        return True

    def _sibling_prefilling(self, req: Request) -> bool:
        sib = self.requests.get(req.share_prefix_with or "")
        if sib is None or sib.status == RequestStatus.FINISHED:
            return False
        return sib.num_computed_tokens < sib.num_prompt_tokens - 1 or sib.status != RequestStatus.RUNNING

    def after_step(self, batch: ScheduledBatch) -> None:
        """Advance computed counts, publish newly full blocks to the prefix cache, and charge
        each sampled token to its tenant (fair share)."""
        for req, n in zip(batch.requests, batch.num_tokens):
            if req.spec_token_ids:
                # Rows of rejected proposals are not computed: their KV is stale, and the blocks
                # that hold nothing else go back to the pool (never into the prefix cache).
                accepted = req.spec_accepted
                req.num_computed_tokens += n - (len(req.spec_token_ids) - accepted)
                self.kv.trim(req, req.num_computed_tokens + 1)
                self.kv.cache_computed_blocks(req)  # token_ids() reads the accepted proposals
                if self.priority_policy:
                    self.counters.charge_output(req, 1 + accepted)
                continue
            req.num_computed_tokens += n
            self.kv.cache_computed_blocks(req)
            if self.priority_policy and req.num_computed_tokens == req.num_tokens:
                self.counters.charge_output(req)
