"""The in-process embedding cache (gateway/embedding_cache.py): per tenant, LRU within a byte bound,
a TTL per entry, safe from several threads; and what its key tells apart."""
from __future__ import annotations

import threading

import pytest

from lockgate.gateway.embedding_cache import (
    MemoryEmbeddingCache,
    build_embedding_cache,
    cache_key,
    check_settings,
)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_the_key_tells_model_version_tokens_and_dimensions_apart() -> None:
    base = cache_key("m", "v1", [1, 2, 3], None)
    assert base == cache_key("m", "v1", [1, 2, 3], None)
    others = {cache_key("m2", "v1", [1, 2, 3], None), cache_key("m", "v2", [1, 2, 3], None),
              cache_key("m", "v1", [1, 2, 3], 8), cache_key("m", "v1", [12, 3], None),
              cache_key("m", "v1", [1, 2, 3, 0], None), cache_key("m|v1", None, [1, 2, 3], None)}
    assert base not in others and len(others) == 6


def test_lru_within_the_byte_bound_per_tenant() -> None:
    c = MemoryEmbeddingCache(48, 60.0, Clock())
    c.put_now("t", [("a", b"a" * 16), ("b", b"b" * 16), ("c", b"c" * 16)])
    assert c.get_now("t", ["a"]) == {"a": b"a" * 16}  # "a" becomes the most recent
    assert c.get_now("u", ["a", "b"]) == {}  # another tenant sees none of it
    c.put_now("u", [("a", b"x" * 16)])  # evicts "b", the least recently used
    assert set(c.get_now("t", ["a", "b", "c"])) == {"a", "c"}
    assert c.get_now("u", ["a"]) == {"a": b"x" * 16}
    assert c.nbytes == 48 and len(c) == 3
    c.put_now("t", [("big", b"z" * 49)])  # larger than the whole cache: never stored
    assert c.get_now("t", ["big"]) == {} and c.nbytes == 48
    c.put_now("t", [("a", b"y" * 8)])  # a new vector under a key replaces the old one
    assert c.get_now("t", ["a"]) == {"a": b"y" * 8} and c.nbytes == 40


def test_each_entry_lives_its_ttl() -> None:
    clock = Clock()
    c = MemoryEmbeddingCache(1 << 20, 10.0, clock)
    c.put_now("t", [("k", b"v" * 4)])
    clock.t += 5
    c.put_now("t", [("j", b"w" * 4)])
    clock.t += 5  # "k" is 10 s old: gone; "j" still has 5 s
    assert c.get_now("t", ["k", "j"]) == {"j": b"w" * 4}
    assert c.nbytes == 4
    clock.t += 100  # an expired entry is dropped by the next put's sweep even if never read again
    c.put_now("t", [("n", b"n")])
    assert len(c) == 1 and c.nbytes == 1


def test_safe_from_many_threads() -> None:
    c = MemoryEmbeddingCache(4096, 60.0)
    errors: list[BaseException] = []

    def work(w: int) -> None:
        try:
            for i in range(400):
                c.put_now(f"t{w % 3}", [(f"k{i % 50}", bytes([w]) * 64)])
                got = c.get_now(f"t{w % 3}", [f"k{i % 50}", f"k{(i + 7) % 50}"])
                assert all(len(v) == 64 for v in got.values())
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert c.nbytes <= 4096 and c.nbytes == 64 * len(c)


def test_settings_and_building() -> None:
    assert build_embedding_cache(0, 60.0) is None  # 0 turns it off
    assert isinstance(build_embedding_cache(1024, 60.0), MemoryEmbeddingCache)  # no store: this process's
    check_settings(64 << 20, 3600.0)
    with pytest.raises(ValueError, match="--embedding-cache-ttl"):
        check_settings(1024, 0.0)
    with pytest.raises(ValueError, match="--embedding-cache"):
        check_settings(-1, 60.0)
