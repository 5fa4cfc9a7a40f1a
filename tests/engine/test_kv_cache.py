"""Block accounting, prefix caching with salts, and LRU eviction of the KV block manager."""
from __future__ import annotations

from lockgate.engine.core.kv_cache import KVCacheManager
from lockgate.engine.core.request import Request
from lockgate.engine.messages import EngineCoreRequest
from lockgate.engine.sampling_params import SamplingParams


def req(rid: str, tokens: list[int], salt: str | None = None) -> Request:
    return Request(EngineCoreRequest(rid, tokens, SamplingParams(max_tokens=4), 0.0, cache_salt=salt), [], 4)


def compute(kv: KVCacheManager, r: Request, hits: list[int] | None = None) -> None:
    """Admit r (taking prefix hits) and pretend its whole prompt was computed."""
    hits = kv.lookup_prefix(r) if hits is None else hits
    assert kv.allocate(r, r.num_tokens - r.num_computed_tokens - len(hits) * kv.block_size, hits)
    r.num_computed_tokens = r.num_tokens
    kv.cache_computed_blocks(r)


def test_allocate_and_free_return_every_block():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    a, b = req("a", list(range(10))), req("b", list(range(100, 107)))
    compute(kv, a)
    compute(kv, b)
    assert len(a.block_ids) == 3 and len(b.block_ids) == 2
    assert kv.num_free_blocks == 5 and abs(kv.usage - 0.5) < 1e-9
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == 10 and kv.usage == 0.0
    assert all(blk.ref_count == 0 for blk in kv.blocks)


def test_prefix_hit_shares_blocks_and_counts():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    a = req("a", list(range(13)))
    compute(kv, a)
    b = req("b", list(range(12)) + [99, 98])
    hits = kv.lookup_prefix(b)
    assert hits == a.block_ids[:3]
    compute(kv, b, hits)
    assert b.block_ids[:3] == a.block_ids[:3]
    assert all(kv.blocks[i].ref_count == 2 for i in hits)
    kv.free(a)
    kv.free(b)
    assert kv.num_free_blocks == 10


def test_full_prompt_hit_leaves_one_token_to_compute():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    a = req("a", list(range(8)))
    compute(kv, a)
    kv.free(a)
    b = req("b", list(range(8)))
    assert len(kv.lookup_prefix(b)) == 1  # only the first block: the last token must run for logits


def test_salt_isolates_tenants():
    kv = KVCacheManager(num_blocks=10, block_size=4)
    compute(kv, req("a", list(range(12)), salt="tenant-a"))
    assert kv.lookup_prefix(req("b", list(range(12)) + [1], salt="tenant-b")) == []
    assert len(kv.lookup_prefix(req("c", list(range(12)) + [1], salt="tenant-a"))) == 3


def test_lru_eviction_reuses_oldest_cached_blocks_and_forgets_them():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a = req("a", list(range(8)))
    compute(kv, a)
    kv.free(a)  # 2 cached, evictable
    b = req("b", list(range(50, 58)))
    compute(kv, b)
    kv.free(b)
    assert len(kv.cached) == 4 and kv.num_free_blocks == 4
    c = req("c", list(range(100, 108)))
    compute(kv, c)  # needs 2 blocks: evicts a's (the least recently freed)
    assert kv.lookup_prefix(req("a2", list(range(8)) + [0])) == []
    assert len(kv.lookup_prefix(req("b2", list(range(50, 58)) + [0]))) == 2
    kv.free(c)


def test_allocate_is_all_or_nothing():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    r = req("a", list(range(12)))
    assert not kv.allocate(r, 12)
    assert r.block_ids == [] and kv.num_free_blocks == 2
