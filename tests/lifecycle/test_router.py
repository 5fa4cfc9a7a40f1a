"""The replica router's policy on synthetic indexes: cost terms, ties, in-flight counting, the
minimum match, common blocks, tenant salts, the sent-prefix fallback, fair share, exclusions."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from lockgate.engine.prefix_hash import prompt_block_hashes
from lockgate.lifecycle.router import NoReplicaError, Router, RouterConfig

BS = 16


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def blocks(tag: str, n: int, start: int = 0) -> list[bytes]:
    """Synthetic block hashes (the router only compares them)."""
    return [f"{tag}:{i}".encode() for i in range(start, start + n)]


def make(n: int = 4, seed: int = 0, clock: Clock | None = None, **kw) -> Router:
    cfg = RouterConfig(**{"block_size": BS, "min_match_tokens": 64, "tie_tokens": 0.0, **kw})
    r = Router(cfg, rng=random.Random(seed), clock=clock or Clock())
    for i in range(n):
        r.add_replica(i, routable=True)
    return r


def route(r: Router, hashes: list[bytes], tokens: int | None = None, **kw):
    """Route and end at once (no load left behind)."""
    d, t = r.route(hashes, tokens if tokens is not None else len(hashes) * BS + 1, **kw)
    t.end()
    return d


# ---- the cost -----------------------------------------------------------------------------------


def test_cost_is_uncached_prefill_plus_queued_plus_running_plus_kv_pressure():
    r = make(2, decode_tokens=10.0, kv_pressure_start=0.8, kv_pressure_tokens=1000.0, common_window=0)
    doc = blocks("doc", 8)  # 128 tokens
    r.blocks_stored(0, doc)
    # Replica 0: 128 of 129 tokens cached. Replica 1: all 129 to prefill.
    d = route(r, doc, 129)
    assert (d.replica, d.reason, d.matched_tokens, d.cost) == (0, "prefix", 128, 1.0)
    # Load on replica 0: one queued request of 300 uncached tokens, three running.
    _, queued = r.route(blocks("x", 18), 300, exclude=[1])
    for _ in range(3):
        _, t = r.route(blocks("y", 1), 10, exclude=[1])
        t.started()
    assert r.replica_view(0)["queued_tokens"] == 300 and r.replica_view(0)["running"] == 3
    d, t = r.route(doc, 129, exclude=[1])
    assert d.cost == 1 + 300 + 3 * 10.0
    t.end()
    # KV pressure: nothing up to 0.8, then linear to kv_pressure_tokens at 1.0.
    for usage, extra in [(0.5, 0.0), (0.8, 0.0), (0.9, 500.0), (1.0, 1000.0), (1.7, 1000.0)]:
        r.set_kv_usage(0, usage)
        d = route(r, doc, 129, exclude=[1])
        assert d.cost == pytest.approx(331.0 + extra)
    # The prefix still wins over the idle replica (cost 129) until the load outweighs it.
    r.set_kv_usage(0, 0.0)
    queued.end()
    assert route(r, doc, 129).replica == 0  # 1 + 30 < 129
    for _ in range(10):
        _, t = r.route(blocks("z", 1), 10, exclude=[1])
        t.started()
    d = route(r, doc, 129)
    assert (d.replica, d.reason, d.matched_tokens, d.cost) == (1, "load", 0, 129.0)  # 1 + 130 > 129


def test_ties_are_broken_at_random_so_cold_misses_spread():
    r = make(4, seed=1)
    picks = Counter(route(r, blocks(f"p{i}", 4)).replica for i in range(400))
    assert set(picks) == {0, 1, 2, 3} and min(picks.values()) > 60
    assert all(route(r, blocks(f"q{i}", 4)).reason == "miss" for i in range(10))
    # Seeded: the same picks again.

    def picks(seed: int) -> list[int]:
        r = make(4, seed=seed)
        return [route(r, blocks(f"p{i}", 4)).replica for i in range(50)]

    assert picks(1) == picks(1) != picks(2)


def test_tie_tokens_widens_the_tie():
    r = make(2, tie_tokens=50.0)
    _, t = r.route(blocks("a", 2), 40, exclude=[1])  # replica 0 carries 40 queued tokens
    picks = Counter(route(r, blocks(f"p{i}", 2), 40).replica for i in range(200))
    assert set(picks) == {0, 1}  # 40 apart is within 50: a tie
    r2 = make(2, tie_tokens=30.0)
    r2.route(blocks("a", 2), 40, exclude=[1])
    assert {route(r2, blocks(f"p{i}", 2), 40).replica for i in range(50)} == {1}
    t.end()


def test_a_burst_spreads_because_each_route_counts_in_flight_at_once():
    r = make(4)
    tickets = [r.route(blocks(f"b{i}", 8), 129)[1] for i in range(32)]
    assert Counter(t.replica for t in tickets) == {0: 8, 1: 8, 2: 8, 3: 8}
    assert [r.replica_view(i)["queued_tokens"] for i in range(4)] == [8 * 129] * 4
    for t in tickets:
        t.started()
    assert [r.replica_view(i)["running"] for i in range(4)] == [8] * 4
    assert all(r.replica_view(i)["queued_tokens"] == 0 for i in range(4))
    for t in tickets:
        t.end()
        t.end()  # idempotent
        t.started()  # and nothing after the end
    assert all(r.replica_view(i)["running"] == 0 and r.replica_view(i)["queued_requests"] == 0 for i in range(4))
    # end() without started(): its queued tokens go.
    _, t = r.route(blocks("c", 8), 129)
    t.end()
    assert sum(r.replica_view(i)["queued_tokens"] for i in range(4)) == 0


def test_a_same_prefix_stream_sticks_before_any_kv_event_arrives():
    r = make(2, common_window=0)
    doc = blocks("doc", 64)  # a 1024-token document, then a unique block per request
    tickets = []
    for i in range(6):
        d, t = r.route(doc + blocks(f"u{i}", 1), 1041)
        t.started()
        tickets.append(t)
    # The first one missed; the router's own record of what it sent there makes the next ones
    # find the document on the same replica (17 tokens each plus the decodes, against 1041).
    assert len({t.replica for t in tickets}) == 1
    assert r.replica_view(tickets[0].replica)["routed"] == {"prefix": 5, "load": 0, "miss": 1}
    for t in tickets:
        t.end()


def test_a_same_prefix_burst_spreads_while_the_first_prefill_is_queued():
    r = make(2, common_window=0)
    doc = blocks("doc", 64)
    first, t1 = r.route(doc + blocks("u0", 1), 1041)
    # Queued behind the first one's full prefill (1041 + 17) costs more than a prefill elsewhere.
    second, t2 = r.route(doc + blocks("u1", 1), 1041)
    assert second.replica != first.replica and second.reason == "load"
    t1.end()
    t2.end()


# ---- what counts as cached --------------------------------------------------------------------


def test_minimum_match_does_not_decide():
    r = make(2, common_window=0, sent_ttl_s=0.0)
    r.blocks_stored(0, blocks("p", 3))  # 48 tokens < 64
    r.blocks_stored(1, blocks("q", 4))  # 64 tokens
    d = route(r, blocks("p", 6))
    assert d.reason == "miss" and d.matched_tokens == 0
    r.blocks_stored(0, blocks("p", 1, start=3))  # now 4 blocks: 64 tokens decide
    d = route(r, blocks("p", 6))
    assert (d.replica, d.reason, d.matched_tokens) == (0, "prefix", 64)
    d = route(r, blocks("q", 6))
    assert (d.replica, d.reason, d.matched_tokens) == (1, "prefix", 64)


def test_match_is_a_leading_prefix_not_a_set_intersection():
    r = make(2, common_window=0, sent_ttl_s=0.0)
    prompt = blocks("p", 12)
    r.blocks_stored(0, prompt[1:])  # everything but the first block: useless to the engine
    r.blocks_stored(1, prompt[:5])  # the first five
    d = route(r, prompt)
    assert (d.replica, d.matched_tokens) == (1, 80)
    r.blocks_removed(1, prompt[2:3])  # a hole after two blocks: 32 tokens, below the minimum
    assert route(r, prompt).reason == "miss"


def test_matched_tokens_leave_one_token_to_compute():
    r = make(1, common_window=0)
    doc = blocks("doc", 8)
    r.blocks_stored(0, doc)
    d = route(r, doc, 128)  # a prompt of exactly 8 blocks: the last token is always computed
    assert d.matched_tokens == 127 and d.cost == 1.0


def test_common_blocks_do_not_pin_traffic_and_the_match_beyond_them_decides():
    r = make(4, common_window=20, common_fraction=0.5, seed=3)
    system = blocks("sys", 16)  # a 256-token system prompt in every request
    r.blocks_stored(0, system)  # cached only on replica 0 so far
    # Before it is common (in fewer than common_min_requests = 8 requests), the system prompt
    # decides: everything goes to replica 0.
    assert not r.is_common(system[0])
    assert {route(r, system + blocks(f"u{i}", 2)).replica for i in range(8)} == {0}
    assert all(r.is_common(h) for h in system)
    # Now it is in >= 50% of the recent requests: it counts as cached everywhere, so unique
    # questions behind it spread, and their cost is only what lies beyond it.
    later = [route(r, system + blocks(f"v{i}", 2), 18 * BS + 1) for i in range(200)]
    assert set(Counter(d.replica for d in later)) == {0, 1, 2, 3}
    assert all(d.reason == "miss" and d.matched_tokens == 16 * BS and d.cost == 2 * BS + 1 for d in later)
    # A document behind the system prompt, cached on replica 2, decides.
    doc = blocks("doc", 8)
    r.blocks_stored(2, system + doc)
    d = route(r, system + doc + blocks("w", 1))
    assert (d.replica, d.reason, d.matched_tokens) == (2, "prefix", 24 * BS)
    # Below the minimum beyond the common part: does not decide (common blocks do not count).
    r.blocks_stored(1, system + blocks("short", 3))
    assert route(r, system + blocks("short", 3) + blocks("w2", 4)).reason == "miss"


def test_common_block_window_is_bounded():
    r = make(2, common_window=8, common_max_blocks=4)
    for i in range(100):
        route(r, blocks(f"p{i}", 50))
    assert len(r._window) == 8 and len(r._counts) == 8 * 4
    assert not any(r.is_common(h) for h in blocks("p99", 50))


def test_tenant_salt_keeps_tenants_apart():
    r = make(2, common_window=0)
    tokens = list(range(1, 1 + 20 * BS))
    a = prompt_block_hashes(tokens, BS, "tenant-a")
    b = prompt_block_hashes(tokens, BS, "tenant-b")
    assert len(a) == len(b) == 19 and not set(a) & set(b)
    r.blocks_stored(0, a)
    da = route(r, a, len(tokens), tenant="tenant-a")
    assert (da.replica, da.reason, da.matched_tokens) == (0, "prefix", 19 * BS)
    db = route(r, b, len(tokens), tenant="tenant-b")
    assert db.reason == "miss" and db.matched_tokens == 0


# ---- the sent-prefix fallback ---------------------------------------------------------------------


def test_sent_prefixes_count_until_their_ttl_or_a_real_event():
    clock = Clock()
    r = make(4, clock=clock, common_window=0, sent_ttl_s=10.0)
    doc = blocks("doc", 8)
    first = route(r, doc)
    assert first.reason == "miss"
    # No event yet: the router's own record says the prefix is there.
    d = route(r, doc)
    assert (d.replica, d.reason) == (first.replica, "prefix")
    assert r.replica_view(first.replica)["sent_blocks"] == 8
    clock.t += 10.0  # expired
    assert route(r, doc, 8 * BS + 1).reason == "miss"
    assert sum(r.replica_view(i)["sent_blocks"] for i in range(4)) == 8  # the last miss's record only
    # A real removal overrides the record at once.
    clock.t += 10.0
    d0 = route(r, doc)
    r.blocks_removed(d0.replica, doc[4:])
    assert route(r, doc, exclude=[i for i in range(4) if i != d0.replica]).matched_tokens == 64
    # A real store replaces it: the ttl no longer applies.
    clock.t += 10.0
    r.blocks_stored(2, doc)
    clock.t += 100.0
    d = route(r, doc)
    assert (d.replica, d.reason) == (2, "prefix")


def test_cleared_forgets_a_replicas_blocks_and_records():
    r = make(2, common_window=0)
    doc = blocks("doc", 8)
    r.blocks_stored(0, doc)
    route(r, blocks("other", 8), exclude=[1])
    r.cleared(0)
    assert r.replica_view(0)["cached_blocks"] == 0 and r.replica_view(0)["sent_blocks"] == 0
    assert route(r, doc).reason == "miss"


# ---- fair share across the fleet -----------------------------------------------------------------


def test_fair_share_a_flood_queued_on_a_replica_does_not_push_a_light_tenant_off_its_cache():
    doc = blocks("doc", 32)  # the light tenant's 512-token document, cached on replica 0

    def flooded(fair: bool) -> Router:
        r = make(2, common_window=0, fair_share=fair)
        r.blocks_stored(0, doc)
        for i in range(50):  # the flood: 40 x 128 queued tokens on replica 0 (5120), 10 on replica 1
            r.route(blocks(f"f{i}", 8), 128, tenant="flood", exclude=[1] if i < 40 else [0])
        return r

    # Under VTC only about as much of the flood's queue as the light request's own work runs
    # before it: its cached replica is still the cheapest.
    d = route(flooded(True), doc + blocks("q", 1), 529, tenant="light")
    assert (d.replica, d.reason) == (0, "prefix")
    assert d.cost == 17 + 17  # its prefill, plus min(5120, 0 + 17) of the flood's queue
    # The flood itself sees its own backlog: it goes where its queue is shorter.
    assert route(flooded(True), blocks("f-next", 8), 128, tenant="flood").replica == 1
    # Blind to tenants, the flood's queue decides for everyone.
    d = route(flooded(False), doc + blocks("q", 1), 529, tenant="light")
    assert (d.replica, d.reason) == (1, "load")


def test_fair_share_counts_the_tenants_own_queue_in_full():
    r = make(2, common_window=0)
    for i in range(4):
        r.route(blocks(f"a{i}", 8), 100, tenant="a", exclude=[1])
    d, _ = r.route(blocks("b", 8), 100, tenant="b", exclude=[1])
    assert d.cost == 100 + 100  # b: its prefill, and min(400, 0 + 100) of a's queue
    d, _ = r.route(blocks("a-next", 8), 100, tenant="a", exclude=[1])
    assert d.cost == 100 + 400 + 100  # a: its prefill, its own 400, and b's 100


# ---- membership ------------------------------------------------------------------------------------


def test_unroutable_and_excluded_replicas_are_never_chosen():
    r = make(3, sent_ttl_s=0.0, common_window=0)  # the same doc 50 times would turn common
    r.set_routable(1, False)
    doc = blocks("doc", 8)
    r.blocks_stored(1, doc)  # its cache does not matter while it is unroutable
    assert {route(r, doc).replica for _ in range(50)} == {0, 2}
    assert {route(r, blocks(f"p{i}", 8), exclude={0}).replica for i in range(20)} == {2}
    with pytest.raises(NoReplicaError):
        r.route(doc, 129, exclude=[0, 2])
    r.set_routable(1, True)
    assert route(r, doc).replica == 1
    assert r.replica_view(1)["routable"] is True


def test_add_and_remove_replicas():
    r = make(0)
    with pytest.raises(NoReplicaError):
        r.route([], 5)
    r.add_replica(3)  # starting: not routable yet
    with pytest.raises(NoReplicaError):
        r.route([], 5)
    r.set_routable(3, True)
    r.add_replica(1)
    assert r.replicas == [1, 3] and r.replica_view(1)["routable"] is False
    with pytest.raises(ValueError):
        r.add_replica(3)
    _, t = r.route(blocks("a", 4), 65)
    assert t.replica == 3
    r.remove_replica(3)
    t.started()  # a ticket outliving its replica is harmless
    t.end()
    with pytest.raises(NoReplicaError):
        r.route(blocks("a", 4), 65)
    r.add_replica(3, routable=True)  # back, with no load and no index
    assert r.replica_view(3)["queued_tokens"] == 0 and r.replica_view(3)["cached_blocks"] == 0
    # Late events about an unknown replica are ignored.
    r.blocks_stored(9, [b"x"])
    r.blocks_removed(9, [b"x"])
    r.set_kv_usage(9, 0.5)
    r.cleared(9)
    r.remove_replica(9)


def test_replica_view_counts_decisions_and_share():
    r = make(2, common_window=0)
    doc = blocks("doc", 8)
    r.blocks_stored(0, doc)
    route(r, doc)
    route(r, doc)
    r.set_kv_usage(1, 0.25)
    _, t = r.route(blocks("x", 4), 65, exclude=[0])
    v0, v1 = r.replica_view(0), r.replica_view(1)
    assert v0["routed"] == {"prefix": 2, "load": 0, "miss": 0} and v0["routed_share"] == pytest.approx(2 / 3, abs=1e-4)
    assert v1["routed"] == {"prefix": 0, "load": 0, "miss": 1} and v1["routed_share"] == pytest.approx(1 / 3, abs=1e-4)
    assert v0["cached_blocks"] == 8 and v1["kv_usage"] == 0.25 and v1["queued_tokens"] == 65
    assert set(v0) >= {"routable", "queued_tokens", "running", "cached_blocks", "routed", "routed_share"}
    t.end()


def test_config_is_checked():
    for bad in [dict(block_size=0), dict(common_fraction=0.0), dict(common_fraction=1.5),
                dict(kv_pressure_start=1.0), dict(tie_tokens=-1.0), dict(decode_tokens=float("nan")),
                dict(min_match_tokens=-1), dict(common_window=-1)]:
        with pytest.raises(ValueError):
            RouterConfig(**bad)


def test_peer_policies_for_the_benchmark():
    """round_robin takes turns whatever is cached; least_loaded (two choices) avoids the busier one."""
    r = make(3, policy="round_robin", common_window=0)
    doc = blocks("doc", 8)
    r.blocks_stored(0, doc)
    assert [route(r, doc).replica for _ in range(6)] == [1, 2, 0, 1, 2, 0]
    ll = make(2, policy="least_loaded", common_window=0, seed=1)
    busy = [ll.route(blocks(f"b{i}", 2), 40, exclude={1}) for i in range(5)]  # 5 queued on replica 0
    assert all(d.replica == 0 for d, _t in busy)
    assert {route(ll, blocks(f"q{i}", 2)).replica for i in range(3)} == {1}
    with pytest.raises(ValueError, match="policy"):
        RouterConfig(policy="fastest")
