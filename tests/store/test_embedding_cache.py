"""The embedding cache in the store (store/embedding_ops.py) on both backends, as the API processes
of one server (or several instances) share it: two store objects on one database see each other's
entries, never another tenant's; the TTL hides an entry at once; the byte bound evicts the least
recently used; and `StoreEmbeddingCache` (gateway/embedding_cache.py) over two `AsyncStore`s."""
from __future__ import annotations

import asyncio
from pathlib import Path


from lockgate.gateway.embedding_cache import StoreEmbeddingCache, build_embedding_cache
from lockgate.store.sqlite import open_store
from lockgate.store.writer import AsyncStore




def vec(i: int, n: int = 16) -> bytes:
    return bytes([i % 256]) * n


def test_shared_between_stores_and_never_across_tenants(two: tuple) -> None:
    a, b = two
    assert a.embedding_cache_put("t1", [("k1", vec(1)), ("k2", vec(2))], 100.0, 60.0, 1 << 20) == 32
    assert b.embedding_cache_get("t1", ["k1", "k2", "k3"], 101.0) == {"k1": vec(1), "k2": vec(2)}
    assert b.embedding_cache_get("t2", ["k1", "k2"], 101.0) == {}  # another tenant: nothing
    assert a.embedding_cache_get("t1", [], 101.0) == {}
    # A put under the same key replaces the vector (and its expiry), never duplicates it.
    b.embedding_cache_put("t1", [("k1", vec(9, 8))], 102.0, 60.0, 1 << 20)
    assert a.embedding_cache_get("t1", ["k1"], 103.0) == {"k1": vec(9, 8)}
    assert a.embedding_cache_bytes() == 24
    keys = [f"many{i}" for i in range(600)]  # more keys than one IN (...) holds
    a.embedding_cache_put("t3", [(k, vec(i, 4)) for i, k in enumerate(keys)], 104.0, 60.0, 1 << 20)
    assert len(b.embedding_cache_get("t3", keys, 105.0)) == 600


def test_ttl_hides_and_then_drops_an_entry(two: tuple) -> None:
    a, b = two
    a.embedding_cache_put("t", [("old", vec(1))], 100.0, 10.0, 1 << 20)
    assert b.embedding_cache_get("t", ["old"], 109.9) == {"old": vec(1)}
    assert b.embedding_cache_get("t", ["old"], 110.0) == {}  # expired: invisible at once
    assert a.embedding_cache_evict(110.0, 1 << 20) == 0  # and gone from the table on the next sweep
    assert a.embedding_cache_bytes() == 0


def test_the_byte_bound_evicts_the_least_recently_used(two: tuple) -> None:
    a, b = two
    for i, key in enumerate(("a", "b", "c")):  # 16 bytes each, used at 100, 101, 102
        a.embedding_cache_put("t", [(key, vec(i))], 100.0 + i, 60.0, 48)
    assert b.embedding_cache_get("t", ["a"], 103.0) == {"a": vec(0)}  # "a" is now the most recent
    assert a.embedding_cache_put("u", [("d", vec(3))], 104.0, 60.0, 48) == 48  # evicts "b", the LRU
    assert b.embedding_cache_get("t", ["a", "b", "c"], 105.0) == {"a": vec(0), "c": vec(2)}
    assert b.embedding_cache_get("u", ["d"], 105.0) == {"d": vec(3)}
    assert a.embedding_cache_evict(105.0, 16) == 16  # a smaller bound: only the most recent stays
    assert set(b.embedding_cache_get("t", ["a", "c"], 106.0)) | set(b.embedding_cache_get("u", ["d"], 106.0)) \
        == {"d"}


def test_two_api_processes_share_entries_through_their_async_stores(tmp_path: Path) -> None:
    """As `--api-workers 2` on one data directory: each worker's cache over its own AsyncStore."""
    async def main() -> None:
        s1, s2 = open_store(tmp_path), open_store(tmp_path)
        w1, w2 = AsyncStore(s1), AsyncStore(s2)
        try:
            c1 = build_embedding_cache(1 << 20, 30.0, s1, w1)
            c2 = build_embedding_cache(1 << 20, 30.0, s2, w2)
            assert isinstance(c1, StoreEmbeddingCache) and c1.shared
            await c1.put("tenant", [("key", vec(7)), ("huge", b"x" * (2 << 20))])  # over the bound: skipped
            assert await c2.get("tenant", ["key", "huge"]) == {"key": vec(7)}
            assert await c2.get("other", ["key"]) == {}
            assert c1.nbytes == 16
            s2.close()  # a store that cannot answer: a miss, never an error
            assert await c2.get("tenant", ["key"]) == {}
        finally:
            await w1.aclose()
            await w2.aclose()
            s1.close()

    asyncio.run(main())
