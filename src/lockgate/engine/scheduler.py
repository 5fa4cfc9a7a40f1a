"""Continuous-batching scheduler.

Every step decides `{request: num_tokens}` under a token budget
(`max_num_batched_tokens`) and `max_num_seqs`: running requests first (decodes,
then the next chunk of unfinished prefills), then waiting requests in policy
order (FCFS, or priority then arrival). When KV blocks run out, the least
important running request (highest priority value, latest arrival) is
preempted by recompute: its blocks are freed and it goes back to the front of
the queue.
"""
from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from lockgate.engine.config import EngineConfig
from lockgate.engine.kv_cache import KVCacheManager
from lockgate.engine.request import Request, RequestStatus


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


class Scheduler:
    def __init__(self, config: EngineConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.priority_policy = config.scheduling_policy == "priority"
        self.waiting: deque[Request] | list[Request] = [] if self.priority_policy else deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    # ---- queue management --------------------------------------------------
    def add(self, req: Request) -> None:
        self.requests[req.request_id] = req
        self._enqueue(req, front=False)

    def _enqueue(self, req: Request, front: bool) -> None:
        req.status = RequestStatus.WAITING
        if self.priority_policy:
            keys = [r.sort_key() for r in self.waiting]
            self.waiting.insert(bisect.bisect_right(keys, req.sort_key()), req)
        elif front:
            self.waiting.appendleft(req)
        else:
            self.waiting.append(req)

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

    @property
    def num_waiting_tokens(self) -> int:
        return sum(r.num_tokens - r.num_computed_tokens for r in self.waiting)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    # ---- the step ------------------------------------------------------------
    def _victim(self) -> Request:
        return max(self.running, key=Request.sort_key)

    def _preempt(self, victim: Request, batch: ScheduledBatch) -> None:
        self.running.remove(victim)
        self.kv.free(victim)
        victim.num_preemptions += 1
        self.num_preemptions += 1
        batch.preempted.append(victim)
        self._enqueue(victim, front=True)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.config.max_num_batched_tokens
        chunked = self.config.enable_chunked_prefill

        # 1. Running requests, most important first so preemption takes from the back.
        self.running.sort(key=Request.sort_key)
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate(req, n):
                victim = self._victim()
                self._preempt(victim, batch)
                if victim is req:
                    break
            if req.status != RequestStatus.RUNNING:  # preempted itself: nothing left to take from
                continue
            batch.requests.append(req)
            batch.start.append(req.num_computed_tokens)
            batch.num_tokens.append(n)
            budget -= n
            i += 1

        # 2. Waiting requests, unless this step already had to preempt (memory is tight).
        skipped: list[Request] = []
        while self.waiting and budget > 0 and not batch.preempted:
            if len(self.running) >= self.config.max_num_seqs:
                break
            req = self.waiting[0]
            if req.share_prefix_with is not None and self._sibling_prefilling(req):
                # Wait for the sibling's prompt blocks to be cached, then share them.
                skipped.append(self._pop_waiting())
                continue
            hits = self.kv.lookup_prefix(req)
            n = req.num_tokens - req.num_computed_tokens - len(hits) * self.kv.block_size
            if n > budget and not chunked:
                break
            n = min(n, budget)
            if not self.kv.allocate(req, n, hits):
                break
            if req.num_preemptions == 0:  # count each prompt once, not on every recompute
                req.num_cached_tokens = len(hits) * self.kv.block_size
                self.kv.record_lookup(req.num_prompt_tokens, req.num_cached_tokens)
            self._pop_waiting()
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            batch.requests.append(req)
            batch.start.append(req.num_computed_tokens)
            batch.num_tokens.append(n)
            budget -= n
        for req in reversed(skipped):  # back where they were, in the same order
            self._enqueue(req, front=True)
        return batch

    def _pop_waiting(self) -> Request:
        return self.waiting.pop(0) if self.priority_policy else self.waiting.popleft()

    def _sibling_prefilling(self, req: Request) -> bool:
        sib = self.requests.get(req.share_prefix_with or "")
        if sib is None or sib.status == RequestStatus.FINISHED:
            return False
        return sib.num_computed_tokens < sib.num_prompt_tokens - 1 or sib.status != RequestStatus.RUNNING

    def after_step(self, batch: ScheduledBatch) -> None:
        """Advance computed counts and publish newly full blocks to the prefix cache."""
        for req, n in zip(batch.requests, batch.num_tokens):
            req.num_computed_tokens += n
            self.kv.cache_computed_blocks(req)
