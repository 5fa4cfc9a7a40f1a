"""Several replicas on the simulator, routed by the replica router or by plain policies: the
fleet keeps a light tenant's TTFT against a flooding one, and prefix-aware routing keeps
shared-prefix groups together where round robin spreads them (and thrashes the caches)."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from lockgate.engine.sim import SimRequest, StepCost, simulate
from lockgate.lifecycle.fleet_sim import random_pick, round_robin, simulate_fleet
from lockgate.lifecycle.router import Router, RouterConfig
from tests.engine.sim_workloads import BLOCK, config, stream


# ---- the fleet simulator itself ---------------------------------------------------------------


def test_one_replica_is_the_single_engine_simulator():
    reqs = stream("a", 0.0, 1.0, 0.013, tenant="A", prompt_len=100, output_len=12)
    reqs += stream("b", 0.005, 1.0, 0.031, tenant="B", prompt_len=300, output_len=5)
    cost = StepCost(0.010, 2e-5)
    one = simulate(reqs, config(max_prefill_tokens=256), 1024, cost)
    fleet = simulate_fleet(reqs, config(max_prefill_tokens=256), 1, 1024, cost, round_robin(), record_steps=True)
    assert [r.token_times for r in fleet.results.values()] == [r.token_times for r in one.results.values()]
    assert [(s.start_s, s.end_s, s.tokens, s.sampled) for s in fleet.steps] == \
        [(s.start_s, s.end_s, s.tokens, s.sampled) for s in one.steps]
    assert fleet.all_finished() and fleet.end_s == one.end_s


def test_router_index_follows_the_replicas_caches_exactly():
    rng = random.Random(5)
    docs = [[rng.randrange(1, 30000) for _ in range(256)] for _ in range(6)]
    reqs = [SimRequest(f"r{i}", tenant=f"t{i % 2}", arrival_s=i * 0.004, output_len=8,
                       prompt_token_ids=docs[i % 6] + [rng.randrange(1, 30000) for _ in range(40)])
            for i in range(300)]
    rep = simulate_fleet(reqs, config(), 3, 200, StepCost(0.01, 1e-5), RouterConfig(block_size=BLOCK), seed=1)
    assert rep.all_finished() and rep.router is not None
    for stats in rep.replicas:  # 200 blocks each: evictions happened, and were all reported
        assert stats.num_requests > 0
        assert rep.router.replica_view(stats.index)["cached_blocks"] == stats.cached_blocks
        assert rep.router.replica_view(stats.index)["running"] == 0
        assert rep.router.replica_view(stats.index)["queued_tokens"] == 0
    assert sum(s.prefix_queries for s in rep.replicas) > 200 * 296 * 0.9
    assert set(d.reason for d in rep.decisions.values()) <= {"prefix", "load", "miss"}


def test_policies_and_arguments_are_checked():
    reqs = [SimRequest("a", prompt_len=20, output_len=2)]
    with pytest.raises(ValueError, match="block_size"):
        simulate_fleet(reqs, config(), 2, 64, StepCost(0.01), RouterConfig(block_size=32))
    with pytest.raises(ValueError, match="policy chose"):
        simulate_fleet(reqs, config(), 2, 64, StepCost(0.01), lambda req, n: 2)
    router = Router(RouterConfig(block_size=BLOCK))
    router.add_replica(5)
    with pytest.raises(ValueError, match="router replicas"):
        simulate_fleet(reqs, config(), 2, 64, StepCost(0.01), router)
    with pytest.raises(RuntimeError, match="stuck"):
        simulate_fleet([SimRequest("big", prompt_len=100)], config(), 2, 4, StepCost(0.01), round_robin())
    assert simulate_fleet(reqs, config(), 3, 64, StepCost(0.01), random_pick(3)).all_finished()


# ---- noisy neighbour across the fleet -----------------------------------------------------------
# Per replica (as tests/engine/test_sim.py's single engine): steps of 20 ms + 5 us per token,
# 128-token prompts and a prefill cap of 512, about 175 req/s; the fleet of two serves ~350 req/s.
# The quiet tenant sends a steady 66 req/s for 2 s; the flood sends 1200 req/s (over 3x the
# fleet's capacity) for the first second, a backlog that outlasts the quiet tenant's stream.

NN_COST = StepCost(0.020, 5e-6)


def noisy_neighbour(policy: str, with_flood: bool):
    reqs = stream("q", 0.0, 2.0, 1 / 66, tenant="quiet", prompt_len=128, output_len=32)
    if with_flood:
        reqs += stream("f", 0.0, 1.0, 1 / 1200, tenant="flood", prompt_len=128, output_len=32)
    return simulate_fleet(reqs, config(policy, max_prefill_tokens=512), 2, 4096, NN_COST,
                          RouterConfig(block_size=BLOCK), seed=0)


def is_quiet(r: SimRequest) -> bool:
    return r.tenant == "quiet"


def test_noisy_neighbour_the_quiet_tenants_ttft_holds_across_the_fleet():
    alone = noisy_neighbour("priority", with_flood=False)
    flood = noisy_neighbour("priority", with_flood=True)
    assert flood.all_finished() and flood.end_s > 3.0  # the flood's backlog outlived the quiet stream
    p99_alone, p99_flood = alone.ttft_percentile(99, is_quiet), flood.ttft_percentile(99, is_quiet)
    assert p99_flood <= 1.2 * p99_alone
    # Both replicas served both tenants: the flood took neither over, the quiet tenant kept both.
    assert all(n > 40 for n in flood.replica_counts(is_quiet).values()) and len(flood.replica_counts()) == 2
    # The same fleet with fcfs replicas: the quiet tenant queues behind the flood's backlog.
    assert noisy_neighbour("fcfs", with_flood=True).ttft_percentile(99, is_quiet) > 10 * p99_alone


# ---- shared-prefix groups -----------------------------------------------------------------------------
# 16 groups (a 512-token document each, after a 256-token system prompt every request shares),
# then a 64-token question; Poisson arrivals at 200 req/s on 4 replicas of 384 KV blocks: one
# replica cannot hold every group's document, four can hold them all once each.


def groups_workload(rate: float = 200.0, duration: float = 3.0, seed: int = 0) -> list[SimRequest]:
    rng = random.Random(seed)
    system = [rng.randrange(1, 30000) for _ in range(256)]
    docs = [system + [rng.randrange(1, 30000) for _ in range(512)] for _ in range(16)]
    out, t, i = [], 0.0, 0
    while t < duration:
        g = rng.randrange(len(docs))
        ids = docs[g] + [rng.randrange(1, 30000) for _ in range(64)]
        out.append(SimRequest(f"g{g}-{i}", tenant="T", output_len=16, arrival_s=t, prompt_token_ids=ids))
        t += rng.expovariate(rate)
        i += 1
    return out


def group_concentration(rep) -> float:
    """Share of requests served by their group's most used replica."""
    by_group: dict[str, Counter[int]] = {}
    for rid, replica in rep.replica_of.items():
        by_group.setdefault(rid.split("-")[0], Counter())[replica] += 1
    return sum(c.most_common(1)[0][1] for c in by_group.values()) / len(rep.replica_of)


def test_prefix_aware_routing_keeps_groups_together_and_hits_the_cache():
    reqs = groups_workload()
    cfg, cost = config(max_prefill_tokens=512), StepCost(0.010, 2e-5)
    routed = simulate_fleet(reqs, cfg, 4, 384, cost, RouterConfig(block_size=BLOCK), seed=0)
    rr = simulate_fleet(reqs, cfg, 4, 384, cost, round_robin())
    rnd = simulate_fleet(reqs, cfg, 4, 384, cost, random_pick(1))
    assert routed.all_finished() and rr.all_finished() and rnd.all_finished()
    # Each group stays mostly on one replica (round robin: about a quarter of each on each)...
    assert group_concentration(routed) > 0.7 and group_concentration(rr) < 0.4
    # ...so the fleet's prefix cache serves far more of the prompts than round robin's or random's.
    assert routed.prefix_hit_rate > 0.85
    assert routed.prefix_hit_rate > rr.prefix_hit_rate + 0.2 and routed.prefix_hit_rate > rnd.prefix_hit_rate + 0.2
    # The load still spreads: no replica serves more than a third of the requests.
    assert max(routed.replica_counts().values()) < len(reqs) / 3
    # Fewer prefill tokens: a lower median TTFT, and no preemption for memory.
    assert routed.ttft_percentile(50) < 0.5 * rr.ttft_percentile(50)
    assert routed.num_preemptions == 0 < rr.num_preemptions
    reasons = Counter(d.reason for d in routed.decisions.values())
    assert reasons["prefix"] > 0.9 * len(reqs)
