"""Random adds, aborts and steps on a tiny pool: block accounting holds at every step,
everything finishes, and greedy outputs do not depend on what else was running."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from lockgate import LLM, SamplingParams
from lockgate.engine.core.request import RequestStatus
from tests.engine.tiny_models import make_checkpoint


def check_invariants(llm: LLM) -> None:
    core = llm.engine.core
    kv, sched = core.kv, core.scheduler
    refs = Counter(b for r in sched.requests.values() for b in r.block_ids)
    for block in kv.blocks:
        assert block.ref_count == refs.get(block.block_id, 0)
        assert (block.block_id in kv.free_queue) == (block.ref_count == 0)
    for h, bid in kv.cached.items():
        assert kv.blocks[bid].block_hash == h
    for r in sched.requests.values():
        if r.status == RequestStatus.WAITING:
            assert r.block_ids == [] and r.num_computed_tokens == 0
        else:
            assert len(r.block_ids) * kv.block_size >= r.num_computed_tokens


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_random_traffic_keeps_the_books_straight(tmp_path, policy):
    make_checkpoint(tmp_path, "llama3.1")
    opts = dict(dtype="float32", num_kv_blocks=24, block_size=4, max_num_batched_tokens=24,
                max_num_seqs=6, scheduling_policy=policy)
    llm = LLM(str(tmp_path), **opts)
    rng = random.Random(1)
    shared = [rng.randrange(256) for _ in range(10)]
    prompts = {f"r{i}": (shared if rng.random() < 0.5 else []) + [rng.randrange(256) for _ in range(rng.randrange(1, 30))]
               for i in range(40)}
    p = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    pending, aborted, done = list(prompts), set(), {}
    while pending or llm.engine.has_unfinished_requests():
        for _ in range(rng.randrange(0, 3)):
            if pending:
                rid = pending.pop(0)
                llm.engine.add_request(rid, prompts[rid], p, priority=rng.randrange(3))
        live = list(llm.engine.output_processor.parents)
        if live and rng.random() < 0.1:
            victim = rng.choice(live)
            llm.engine.abort_request(victim)
            aborted.add(victim)
        for out in llm.engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        check_invariants(llm)
    assert set(done) | aborted == set(prompts)
    assert all(len(t) == 12 for t in done.values())
    s = llm.engine.stats()
    assert s.num_free_blocks == s.num_total_blocks and s.num_running == 0 and s.num_waiting == 0
    assert s.num_preemptions > 0  # the pool really was tight
    # Same prompts alone, with room to spare: identical greedy tokens.
    alone = LLM(str(tmp_path), dtype="float32")
    some = sorted(done)[:8]
    outs = alone.generate([prompts[r] for r in some], p)
    assert [o.outputs[0].token_ids for o in outs] == [done[r] for r in some]
