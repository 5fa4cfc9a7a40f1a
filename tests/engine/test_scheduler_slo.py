"""SLO-aware scheduling: decodes first, the per-step prefill cap, the merged prefill order,
priority preemption, aging, fair share between tenants (VTC) and the fcfs policy."""
from __future__ import annotations

import math

import pytest

from lockgate.engine.config import EngineConfig
from lockgate.engine.core.kv_cache import KVCacheManager
from lockgate.engine.core.request import Request, RequestStatus
from lockgate.engine.core.scheduler import Scheduler
from lockgate.engine.core.waiting import OUTPUT_WEIGHT, PROMPT_WEIGHT
from lockgate.engine.messages import EngineCoreRequest
from lockgate.engine.sampling_params import SamplingParams


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def make(blocks: int = 256, block_size: int = 4, clock: Clock | None = None, **cfg) -> Scheduler:
    return Scheduler(EngineConfig(block_size=block_size, **cfg), KVCacheManager(blocks, block_size),
                     clock=clock or Clock())


def add(s: Scheduler, rid: str, n_prompt: int, priority: int = 0, tenant: str = "", weight: float = 1.0,
        t: float | None = None, prompt: list[int] | None = None, share: str | None = None) -> Request:
    base = 1000 * (s._seq + 1)  # distinct prompts: no prefix-cache hits between them
    ids = prompt if prompt is not None else list(range(base, base + n_prompt))
    r = Request(EngineCoreRequest(rid, ids, SamplingParams(max_tokens=64),
                                  s.clock() if t is None else t, priority, share_prefix_with=share,
                                  tenant=tenant, tenant_weight=weight), [], 64)
    s.add(r)
    return r


def step(s: Scheduler) -> list[tuple[str, int]]:
    """Schedule, then play the runner; returns (request id, tokens) in batch order."""
    batch = s.schedule()
    s.after_step(batch)
    for r in batch.requests:
        if r.num_computed_tokens == r.num_tokens:
            r.output_token_ids.append(1)
    return [(r.request_id, n) for r, n in zip(batch.requests, batch.num_tokens)]


# ---- decodes first, the prefill cap ------------------------------------------------


def test_decodes_first_and_the_prefill_cap_bounds_every_step():
    s = make(max_num_batched_tokens=100, max_prefill_tokens=8)
    for i in range(3):
        add(s, f"d{i}", 2)
    assert step(s) == [("d0", 2), ("d1", 2), ("d2", 2)]
    add(s, "long", 30)  # 15x the others
    add(s, "next", 5)
    seen = []
    for _ in range(4):
        got = step(s)
        seen.append(got)
        # Every running decode gets its token in every step, before any prefill...
        assert got[:3] == [("d0", 1), ("d1", 1), ("d2", 1)]
        # ... and the prefills in a step never exceed the cap, although the budget has room.
        assert sum(n for rid, n in got[3:]) <= 8
    assert seen[0][3:] == [("long", 8)]
    assert seen[3][3:] == [("long", 6), ("next", 2)]  # the tail of long, then next fills the cap


def test_decodes_do_not_count_against_the_prefill_cap():
    s = make(max_num_batched_tokens=100, max_prefill_tokens=4)
    for i in range(6):
        add(s, f"d{i}", 1)
    step(s)
    step(s)  # 4 prompts admitted in the first step (the cap), 2 in the second, with 4 decodes
    got = dict(step(s))
    assert got == {f"d{i}": 1 for i in range(6)}  # 6 decode tokens > cap of 4


def test_without_chunking_the_cap_never_splits_a_prompt():
    s = make(max_num_batched_tokens=64, max_prefill_tokens=8, enable_chunked_prefill=False)
    add(s, "big", 20)
    add(s, "small", 4)
    assert step(s) == [("big", 20)]  # whole, though over the cap; small waits for the next step
    assert step(s) == [("big", 1), ("small", 4)]


# ---- merged prefill order ------------------------------------------------------------


def test_merged_prefill_order_strictly_better_waiting_first_ties_to_running():
    s = make(max_num_batched_tokens=100, max_prefill_tokens=8, scheduling_policy="priority")
    add(s, "low", 20, priority=2)
    assert step(s) == [("low", 8)]
    add(s, "high", 6, priority=0)
    add(s, "peer", 6, priority=2)
    # high (strictly better) goes before the running low prefill; peer (a tie) goes after it.
    assert step(s) == [("high", 6), ("low", 2)]
    assert step(s) == [("high", 1), ("low", 8)]
    assert step(s) == [("high", 1), ("low", 2), ("peer", 6)]


def test_fcfs_running_prefills_go_before_waiting_whatever_their_priority():
    s = make(max_num_batched_tokens=100, max_prefill_tokens=8)
    add(s, "low", 20, priority=2)
    step(s)
    add(s, "high", 6, priority=0)
    assert step(s) == [("low", 8)]
    assert step(s) == [("low", 4), ("high", 4)]


# ---- priority preemption -------------------------------------------------------------


def test_priority_preemption_takes_the_newest_of_the_worst_class_and_never_an_equal_one():
    s = make(max_num_seqs=3, scheduling_policy="priority")
    b1 = add(s, "b1", 4, priority=2, t=0.0)
    b2 = add(s, "b2", 4, priority=2, t=1.0)
    c = add(s, "c", 4, priority=1, t=2.0)
    step(s)
    assert len(s.running) == 3
    add(s, "hi", 4, priority=0, t=3.0)
    got = step(s)
    # b2 (newest of the worst class) leaves, also out of this step's batch where its decode was.
    assert b2.status == RequestStatus.WAITING and b2.num_computed_tokens == 0 and b2.block_ids == []
    assert got == [("c", 1), ("b1", 1), ("hi", 4)]  # decodes in importance order
    assert s.num_preemptions == 1 and b2.num_preemptions == 1
    add(s, "c2", 4, priority=1, t=4.0)
    step(s)
    assert b1.status == RequestStatus.WAITING and s.num_preemptions == 2  # strictly worse: preempted
    add(s, "c3", 4, priority=1, t=5.0)
    got = dict(step(s))
    assert "c3" not in got and s.num_preemptions == 2  # only equal or better running: no preemption
    assert {r.request_id for r in s.running} == {"c", "hi", "c2"} and c.status == RequestStatus.RUNNING


def test_priority_preemption_when_kv_blocks_are_short():
    s = make(blocks=4, block_size=4, scheduling_policy="priority")
    batch_req = add(s, "batch", 12, priority=2, t=0.0)  # 3 of the 4 blocks
    step(s)
    add(s, "hi", 8, priority=0, t=1.0)  # needs 2 blocks: only 1 free
    got = step(s)
    assert got == [("hi", 8)]
    assert batch_req.status == RequestStatus.WAITING and s.num_preemptions == 1
    assert batch_req.output_token_ids == [1]  # kept: it recomputes prompt + output later


def test_fcfs_never_preempts_for_priority():
    s = make(max_num_seqs=1)
    add(s, "low", 4, priority=5)
    step(s)
    add(s, "high", 4, priority=0)
    assert step(s) == [("low", 1)] and s.num_preemptions == 0


def test_fcfs_keeps_arrival_order_whatever_the_priority():
    s = make(max_num_batched_tokens=4)
    add(s, "first", 4, priority=9)
    add(s, "second", 4, priority=0)
    assert step(s) == [("first", 4)]


def test_memory_preemption_in_the_decode_phase_admits_nothing_new():
    s = make(blocks=4, block_size=4, max_num_batched_tokens=64, scheduling_policy="priority")
    add(s, "a", 8, t=0.0)
    add(s, "b", 8, t=1.0)
    step(s)
    add(s, "c", 1, priority=-5, t=2.0)  # more important than both, but memory is tight
    assert step(s) == [("a", 1)]  # b preempted; nothing admitted in this step


# ---- aging -------------------------------------------------------------------------------


def test_aging_lowers_the_effective_priority_with_the_scheduler_clock():
    clock = Clock()
    s = make(clock=clock, max_num_seqs=1, scheduling_policy="priority", priority_aging_s=10.0)
    add(s, "blocker", 1, t=0.0)
    step(s)
    low = add(s, "low", 4, priority=2, t=-1e9)  # the client's arrival time plays no part in aging
    clock.now = 15.0
    add(s, "high", 4, priority=0)
    assert s.effective_priority(low, 15.0) == 1
    s.finish(s.requests["blocker"])
    assert step(s) == [("high", 4)]  # low has waited 15 s: effective 1, still behind 0
    s.finish(s.requests["high"])
    add(s, "high2", 4, priority=0)
    clock.now = 20.0  # low waited 20 s: effective 0, a tie, and it entered first
    assert step(s) == [("low", 4)]


def test_no_aging_when_disabled_and_preempted_requests_keep_their_entry_time():
    clock = Clock()
    s = make(clock=clock, max_num_seqs=1, scheduling_policy="priority", priority_aging_s=0.0)
    low = add(s, "low", 4, priority=2)
    step(s)
    clock.now = 1000.0
    add(s, "high", 4, priority=0)
    assert step(s) == [("high", 4)]  # low, running, is preempted: no aging
    assert low.status == RequestStatus.WAITING and low.enqueue_time == 0.0
    assert s.effective_priority(low, 1e6) == 2


def test_an_aged_running_request_is_not_preempted_by_a_fresh_one_of_its_effective_class():
    clock = Clock()
    s = make(clock=clock, max_num_seqs=1, scheduling_policy="priority", priority_aging_s=1.0)
    old = add(s, "old", 4, priority=2)
    clock.now = 2.5  # effective 0 now
    step(s)
    add(s, "fresh", 4, priority=0)
    assert step(s) == [("old", 1)] and old.status == RequestStatus.RUNNING


# ---- fair share (VTC) --------------------------------------------------------------------


def test_vtc_picks_the_least_served_tenant_fifo_within_a_tenant():
    s = make(max_num_seqs=1, scheduling_policy="priority")
    a1 = add(s, "a1", 8, tenant="A")
    add(s, "a2", 8, tenant="A")
    add(s, "a3", 8, tenant="A")
    add(s, "b1", 4, tenant="B")
    assert step(s) == [("a1", 8)]  # equal counters: the earliest entry
    assert s.counters.counter("A") == PROMPT_WEIGHT * 8 + OUTPUT_WEIGHT  # the prompt and its first token
    s.finish(a1)
    assert step(s) == [("b1", 4)]  # B has been served less, though a2 entered before b1
    s.finish(s.requests["b1"])
    assert step(s) == [("a2", 8)]  # then A again, in its own order
    assert [r.request_id for r in s.waiting] == ["a3"]


def test_vtc_weights_divide_the_charges():
    s = make(scheduling_policy="priority")
    add(s, "a", 8, tenant="A", weight=2.0)
    add(s, "b", 8, tenant="B", weight=1.0)
    step(s)  # both prefilled and sample one token each
    assert s.counters.counter("A") == pytest.approx((PROMPT_WEIGHT * 8 + OUTPUT_WEIGHT) / 2.0)
    assert s.counters.counter("B") == pytest.approx(PROMPT_WEIGHT * 8 + OUTPUT_WEIGHT)
    step(s)
    assert s.counters.counter("A") == pytest.approx((PROMPT_WEIGHT * 8 + 2 * OUTPUT_WEIGHT) / 2.0)


def test_vtc_weighted_share_of_admissions():
    # One admission per step (one prompt fills the cap); A has weight 3: it gets 3 of every 4.
    s = make(max_prefill_tokens=4, scheduling_policy="priority")
    for i in range(12):
        add(s, f"a{i}", 4, tenant="A", weight=3.0)
        add(s, f"b{i}", 4, tenant="B", weight=1.0)
    admitted = []
    for _ in range(8):
        admitted += [rid[0] for rid, n in step(s) if n == 4]
    assert admitted.count("a") == 6 and admitted.count("b") == 2


def test_vtc_charges_only_uncached_prompt_tokens_and_only_once():
    s = make(blocks=6, block_size=4, scheduling_policy="priority")
    shared = list(range(500, 508))
    a = add(s, "a", 9, tenant="A", prompt=shared + [1])
    step(s)
    s.finish(a)
    add(s, "a2", 9, tenant="A", prompt=shared + [2])  # 8 tokens served from the prefix cache
    step(s)
    assert s.counters.counter("A") == pytest.approx(PROMPT_WEIGHT * (9 + 1) + OUTPUT_WEIGHT * 2)
    hog = add(s, "hog", 16, tenant="A", priority=-1)
    before = s.counters.counter("A")
    step(s)  # hog preempts a2 (strictly worse) for blocks
    assert s.requests["a2"].num_preemptions == 1
    s.finish(hog)
    step(s)  # a2 is admitted again (recompute): not charged again for its prompt
    a2 = s.requests["a2"]
    assert a2.status == RequestStatus.RUNNING
    assert s.counters.counter("A") == pytest.approx(before + PROMPT_WEIGHT * 16 + OUTPUT_WEIGHT * 2)


def test_vtc_lift_on_reactivation_and_debt_is_kept():
    s = make(scheduling_policy="priority")
    big = add(s, "big", 40, tenant="A")
    small = add(s, "small", 10, tenant="B")
    step(s)
    assert s.counters.counter("A") == pytest.approx(40 + OUTPUT_WEIGHT)
    assert s.counters.counter("B") == pytest.approx(10 + OUTPUT_WEIGHT)
    # C was idle: it is lifted to the least active counter (B's), not left at 0.
    add(s, "c", 4, tenant="C")
    assert s.counters.counter("C") == pytest.approx(10 + OUTPUT_WEIGHT)
    # A goes idle with debt and comes back: it keeps its (higher) counter.
    s.finish(big)
    add(s, "big2", 4, tenant="A")
    assert s.counters.counter("A") == pytest.approx(40 + OUTPUT_WEIGHT)
    # A tenant with requests still running is active: no lift for its next one.
    s.finish(small)
    s.finish(s.requests["c"])
    add(s, "b-late", 4, tenant="B")  # B was inactive: lifted to min(A, ...) = A's counter
    assert s.counters.counter("B") == pytest.approx(40 + OUTPUT_WEIGHT)


def test_vtc_only_within_the_same_effective_priority():
    s = make(max_num_seqs=1, scheduling_policy="priority", priority_aging_s=0.0)
    add(s, "hog", 40, tenant="A")
    step(s)
    s.finish(s.requests["hog"])
    add(s, "b", 4, tenant="B", priority=1)
    add(s, "a", 4, tenant="A", priority=0)  # A's counter is far higher, but its class is better
    assert step(s) == [("a", 4)]


# ---- n > 1 siblings under both policies ------------------------------------------------------


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_siblings_wait_for_the_first_ones_prompt_blocks(policy):
    s = make(scheduling_policy=policy)
    prompt = list(range(700, 712))
    add(s, "r#0", 12, prompt=prompt)
    add(s, "r#1", 12, prompt=prompt, share="r#0")
    add(s, "other", 4)
    assert step(s) == [("r#0", 12), ("other", 4)]  # the sibling is skipped but keeps its place
    got = step(s)
    assert ("r#1", 4) in got  # 8 tokens from the cache, only the rest computed
    assert s.requests["r#1"].num_cached_tokens == 8


# ---- config ----------------------------------------------------------------------------------


@pytest.mark.parametrize("field,bad", [
    ("max_prefill_tokens", 0), ("max_prefill_tokens", -5), ("max_prefill_tokens", 1.5),
    ("max_prefill_tokens", True),
    ("priority_aging_s", -1.0), ("priority_aging_s", math.inf), ("priority_aging_s", math.nan),
    ("priority_aging_s", "10"),
    ("fake_token_delay_s", -0.001), ("fake_token_delay_s", math.inf), ("fake_token_delay_s", math.nan),
])
def test_config_validation(field, bad):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**{field: bad})


def test_config_defaults():
    c = EngineConfig()
    assert (c.max_prefill_tokens, c.priority_aging_s, c.fake_token_delay_s, c.scheduling_policy) == \
        (512, 10.0, 0.0, "fcfs")
    assert EngineConfig(priority_aging_s=0).priority_aging_s == 0


def test_request_tenant_fields_and_validation():
    from lockgate.engine.messages import check_tenant

    r = EngineCoreRequest("x", [1], SamplingParams(), 0.0)
    assert (r.tenant, r.tenant_weight) == ("", 1.0)
    for bad in (0.0, -1.0, math.inf, math.nan, True):
        with pytest.raises(ValueError, match="tenant_weight"):
            check_tenant("t", bad)
    with pytest.raises(ValueError, match="tenant"):
        check_tenant(3, 1.0)


# ---- random traffic: the books stay straight -------------------------------------------------


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_traffic_keeps_every_invariant(policy, seed):
    import random
    from collections import Counter

    rng = random.Random(seed)
    clock = Clock()
    s = make(blocks=16, block_size=4, clock=clock, max_num_seqs=5, max_num_batched_tokens=24,
             max_prefill_tokens=10, scheduling_policy=policy, priority_aging_s=0.5)
    want: dict[str, int] = {}
    done: set[str] = set()
    i = 0
    for _ in range(400):
        for _ in range(rng.randrange(0, 3)):
            if i < 60:
                rid = f"r{i}"
                want[rid] = rng.randrange(1, 8)
                r = add(s, rid, rng.randrange(1, 30), priority=rng.randrange(3), tenant=rng.choice("ABC"),
                        weight=rng.choice([0.5, 1.0, 3.0]))
                r.max_tokens = want[rid]
                i += 1
        if s.requests and rng.random() < 0.05:
            victim = rng.choice(sorted(s.requests))
            s.finish(s.requests[victim])
            done.add(victim)
        batch = s.schedule()
        assert batch.total_tokens <= 24 and len(s.running) <= 5
        prefill = sum(n for r, n in zip(batch.requests, batch.num_tokens) if n > 1 or not r.is_decode)
        assert prefill <= 10
        assert len({id(r) for r in batch.requests}) == len(batch.requests)
        assert all(r.status == RequestStatus.RUNNING for r in batch.requests)
        s.after_step(batch)
        for r in batch.requests:
            if r.num_computed_tokens == r.num_tokens:
                r.output_token_ids.append(1)
                if r.num_output_tokens >= want[r.request_id]:
                    s.finish(r)
                    done.add(r.request_id)
        clock.now += 0.01
        # Block references, queue membership and tenant activity all agree.
        refs = Counter(b for r in s.requests.values() for b in r.block_ids)
        for block in s.kv.blocks:
            assert block.ref_count == refs.get(block.block_id, 0)
        assert len(s.waiting) + len(s.running) == len(s.requests)
        assert all(r.block_ids == [] and r.num_computed_tokens == 0 for r in s.waiting)
        if policy == "priority":
            assert s.counters.active == dict(Counter(r.tenant for r in s.requests.values()))
        if i == 60 and not s.requests:
            break
    assert done == set(want) and s.kv.num_free_blocks == 16
    assert s.num_preemptions > 0  # the pool really was tight
