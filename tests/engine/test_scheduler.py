"""Scheduling decisions: token budget, decode-first, chunked prefill, priority, preemption, abort."""
from __future__ import annotations

from lockgate.engine.config import EngineConfig
from lockgate.engine.core.kv_cache import KVCacheManager
from lockgate.engine.core.request import Request, RequestStatus
from lockgate.engine.core.scheduler import Scheduler
from lockgate.engine.messages import EngineCoreRequest
from lockgate.engine.sampling_params import SamplingParams


def make(blocks: int = 64, block_size: int = 4, **cfg) -> Scheduler:
    return Scheduler(EngineConfig(block_size=block_size, **cfg), KVCacheManager(blocks, block_size))


def add(s: Scheduler, rid: str, n_prompt: int, t: float, priority: int = 0) -> Request:
    base = 1000 * len(s.requests)  # distinct prompts: no prefix-cache hits between them
    r = Request(EngineCoreRequest(rid, list(range(base, base + n_prompt)), SamplingParams(max_tokens=8), t,
                                  priority), [], 8)
    s.add(r)
    return r


def run_step(s: Scheduler) -> dict[str, int]:
    """Schedule, then play the runner: every request that reached its end samples a token."""
    batch = s.schedule()
    s.after_step(batch)
    for r in batch.requests:
        if r.num_computed_tokens == r.num_tokens:
            r.output_token_ids.append(1)
    return {r.request_id: n for r, n in zip(batch.requests, batch.num_tokens)}


def test_chunked_prefill_respects_budget_and_decodes_go_first():
    s = make(max_num_batched_tokens=10)
    add(s, "a", 6, 0.0)
    assert run_step(s) == {"a": 6}
    add(s, "b", 25, 1.0)
    assert run_step(s) == {"a": 1, "b": 9}  # a's decode first, b gets the rest of the budget
    assert run_step(s) == {"a": 1, "b": 9}
    assert run_step(s) == {"a": 1, "b": 7}


def test_without_chunking_a_prompt_waits_for_room():
    s = make(max_num_batched_tokens=10, enable_chunked_prefill=False)
    add(s, "a", 6, 0.0)
    add(s, "b", 8, 1.0)
    assert run_step(s) == {"a": 6}
    assert run_step(s) == {"a": 1, "b": 8}


def test_max_num_seqs():
    s = make(max_num_seqs=2)
    for i in range(3):
        add(s, f"r{i}", 3, float(i))
    assert set(run_step(s)) == {"r0", "r1"}


def test_priority_policy_orders_waiting():
    s = make(max_num_batched_tokens=4, scheduling_policy="priority")
    add(s, "low", 4, 0.0, priority=5)
    add(s, "high", 4, 1.0, priority=-1)
    add(s, "mid", 4, 2.0, priority=0)
    assert run_step(s) == {"high": 4}


def test_preemption_takes_least_important_latest_and_requeues_it_first():
    s = make(blocks=4, block_size=4, max_num_batched_tokens=64, scheduling_policy="priority")
    a = add(s, "a", 8, 0.0, priority=0)
    b = add(s, "b", 8, 1.0, priority=0)
    run_step(s)  # a, b each fill 2 blocks; the sampled 9th token needs a third
    step = run_step(s)  # both need a third block; only b (latest) is preempted
    assert step == {"a": 1}
    assert b.status == RequestStatus.WAITING and b.block_ids == [] and b.num_computed_tokens == 0
    assert s.waiting[0] is b and s.num_preemptions == 1
    assert a.status == RequestStatus.RUNNING and len(a.block_ids) == 3
    assert b.output_token_ids == [1]  # kept: recompute covers prompt + output so far


def test_finish_frees_blocks_wherever_the_request_is():
    s = make(blocks=8)
    a = add(s, "a", 9, 0.0)
    b = add(s, "b", 5, 1.0)
    run_step(s)
    c = add(s, "c", 5, 2.0)
    s.finish(a)
    s.finish(c)  # still waiting
    s.finish(b)
    assert not s.has_unfinished() and s.kv.num_free_blocks == 8
