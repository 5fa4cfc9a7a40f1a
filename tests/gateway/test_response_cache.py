"""The response cache's pure parts (gateway/response_cache.py): sizes and TTLs as flags take them,
which requests are cacheable, what the key covers, Cache-Control, LRU by bytes with a TTL per entry
(a fake clock), thread safety; and a hit's ledger row billed at the tenant's `cache_hit` price."""
from __future__ import annotations

import threading

import pytest

from lockgate.engine.sampling_params import SamplingParams
from lockgate.gateway.accounting import Meter
from lockgate.gateway.auth import Principal
from lockgate.gateway.response_cache import (
    ENTRY_OVERHEAD, CacheControl, ResponseCache, cache_key, cacheable, check_ttl, parse_bytes)
from lockgate.store.models import Price, Tenant
from lockgate.store.money import nano


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("text, expected", [
    ("0", 0), ("1048576", 1 << 20), ("64MiB", 64 << 20), ("64mib", 64 << 20), ("64MB", 64_000_000),
    ("512k", 512_000), ("1.5GiB", 3 << 29), ("2 GB", 2_000_000_000), (4096, 4096)])
def test_sizes_as_the_flag_takes_them(text: str | int, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text, why", [
    ("-1", "expected a size in bytes"), ("abc", "expected a size in bytes"), ("", "expected a size"),
    ("12XB", "expected a size"), ("1e9", "expected a size"), ("2TiB", "between 0 (off) and"), (-5, "between 0")])
def test_bad_sizes_are_refused_naming_the_flag(text: str | int, why: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_bytes(text)
    assert str(e.value).startswith("--response-cache: ") and why in str(e.value)


@pytest.mark.parametrize("ttl", [0, -1, float("nan"), float("inf"), 31 * 86400])
def test_bad_ttls_are_refused(ttl: float) -> None:
    with pytest.raises(ValueError, match="--response-cache-ttl: must be in"):
        check_ttl(ttl)


def test_only_greedy_or_seeded_requests_are_cacheable() -> None:
    assert cacheable(SamplingParams(temperature=0.0))
    assert cacheable(SamplingParams(temperature=1e-6))  # the engine treats it as greedy
    assert not cacheable(SamplingParams(temperature=0.7))
    assert not cacheable(SamplingParams())  # OpenAI's default temperature 1, no seed
    assert cacheable(SamplingParams(temperature=0.7, seed=0))


@pytest.mark.parametrize("header, read, write", [
    (None, True, True), ("", True, True), ("no-cache", False, True), ("No-Cache", False, True),
    ("max-age=0, no-cache", False, True), ("no-store", False, False), ("no-cache, no-store", False, False),
    ("private, max-age=60", True, True)])
def test_cache_control(header: str | None, read: bool, write: bool) -> None:
    c = CacheControl.parse(header)
    assert (c.read, c.write) == (read, write)


def test_the_key_covers_tenant_version_route_prompt_and_every_parameter() -> None:
    p = SamplingParams(temperature=0, max_tokens=8)
    base = cache_key("ten_a", "m@v1", "chat", [[1, 2, 3]], p)
    assert base == cache_key("ten_a", "m@v1", "chat", [[1, 2, 3]], SamplingParams(temperature=0, max_tokens=8))
    others = [
        cache_key("ten_b", "m@v1", "chat", [[1, 2, 3]], p),  # another tenant
        cache_key("", "m@v1", "chat", [[1, 2, 3]], p),  # open mode
        cache_key("ten_a", "m@v2", "chat", [[1, 2, 3]], p),  # another version
        cache_key("ten_a", "m@v1", "completions", [[1, 2, 3]], p),
        cache_key("ten_a", "m@v1", "chat", [[1, 2, 4]], p),
        cache_key("ten_a", "m@v1", "chat", [[1, 2], [3]], p),  # the same ids split in two prompts
        cache_key("ten_a", "m@v1", "chat", [[1, 2, 3]], p.replace(max_tokens=9)),
        cache_key("ten_a", "m@v1", "chat", [[1, 2, 3]], p.replace(stop=["x"])),
        cache_key("ten_a", "m@v1", "chat", [[1, 2, 3]], p.replace(logprobs=1)),
        cache_key("ten_a", "m@v1", "chat", [[1, 2, 3]], p.replace(n=2)),
        cache_key("ten_a", "m@v1", "chat", [[1, 2, 3]], p.replace(seed=1)),
        cache_key("ten_a", "m@v1", "chat", [[1, 2, 3]], p.replace(logit_bias={5: 1.0})),
    ]
    assert len({base, *others}) == len(others) + 1
    # A map's order is not part of the request's meaning.
    assert cache_key("t", "m@v1", "chat", [[1]], p.replace(logit_bias={5: 1.0, 7: -1.0})) == \
        cache_key("t", "m@v1", "chat", [[1]], p.replace(logit_bias={7: -1.0, 5: 1.0}))


def _cache(max_entries: int, data_len: int = 100, ttl: float = 60.0) -> tuple[ResponseCache, Clock]:
    clock = Clock()
    return ResponseCache(max_entries * (data_len + 32 + ENTRY_OVERHEAD), ttl, clock), clock


def test_the_byte_bound_evicts_the_least_recently_used() -> None:
    cache, _ = _cache(3)
    keys = [bytes([i]) * 32 for i in range(4)]
    for k in keys[:3]:
        assert cache.put(k, b"x" * 100)
    assert cache.get(keys[0]) == b"x" * 100  # now the most recently used: keys[1] goes first
    assert cache.put(keys[3], b"y" * 100)
    assert cache.get(keys[1]) is None
    assert all(cache.get(k) is not None for k in (keys[0], keys[2], keys[3]))
    s = cache.stats()
    assert (s.entries, s.bytes, s.evictions) == (3, 3 * (100 + 32 + ENTRY_OVERHEAD), 1)
    # A big answer pushes out as many as it needs; one larger than the whole cache is not stored.
    assert cache.put(b"b" * 32, b"z" * (2 * (100 + 32 + ENTRY_OVERHEAD) - 32 - ENTRY_OVERHEAD))
    assert len(cache) == 2 and cache.stats().evictions == 3  # two entries' room taken: one left beside it
    assert cache.get(keys[3]) is not None and cache.get(keys[0]) is None
    assert not cache.put(b"c" * 32, b"z" * cache.max_bytes)
    assert cache.get(b"c" * 32) is None and len(cache) == 2


def test_replacing_an_entry_counts_its_bytes_once() -> None:
    cache, _ = _cache(2)
    cache.put(b"k" * 32, b"a" * 100)
    cache.put(b"k" * 32, b"b" * 50)
    assert cache.get(b"k" * 32) == b"b" * 50
    assert cache.stats().bytes == 50 + 32 + ENTRY_OVERHEAD and len(cache) == 1


def test_entries_expire_after_their_ttl() -> None:
    cache, clock = _cache(4, ttl=10.0)
    cache.put(b"a" * 32, b"1")
    clock.now += 5
    cache.put(b"b" * 32, b"2")
    cache.put(b"c" * 32, b"3", ttl_s=1.0)  # a TTL of its own
    clock.now += 2
    assert cache.get(b"c" * 32) is None
    assert cache.get(b"a" * 32) == b"1"  # a hit does not extend the TTL
    clock.now += 3.5
    assert cache.get(b"a" * 32) is None and cache.get(b"b" * 32) == b"2"
    s = cache.stats()
    assert (s.hits, s.misses, s.expirations, s.entries) == (2, 2, 2, 1)


def test_threads_keep_the_accounting_exact() -> None:
    cache = ResponseCache(50 * (64 + 32 + ENTRY_OVERHEAD), 60.0)

    def work(t: int) -> None:
        for i in range(2000):
            key = bytes([t, i % 97]) * 16
            if cache.get(key) is None:
                cache.put(key, bytes(64))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    s = cache.stats()
    assert s.entries == len(cache) == 50 and s.bytes == 50 * (64 + 32 + ENTRY_OVERHEAD)
    assert s.hits + s.misses == 4 * 2000


def test_a_hit_is_billed_exactly_the_cache_hit_price() -> None:
    tenant = Tenant("ten_a", "a", prices={"*": Price(prompt=3.0, completion=15.0, cache_hit=0.000123)})
    meter = Meter("r1", Principal(tenant, None, False, True), model="m", prompt_tokens=1000, completion_tokens=500)
    fresh = meter.usage_row(200, "ok")
    assert fresh.cache is None and nano(fresh.cost_usd) == 3_000_000 + 7_500_000  # its tokens at USD per 1M
    meter.cache = "hit"
    row = meter.usage_row(200, "ok")
    assert row.cache == "hit" and nano(row.cost_usd) == 123_000
    assert (row.prompt_tokens, row.completion_tokens) == (1000, 500)  # the answer's tokens, as recorded
    assert nano(Meter("r2", Principal(Tenant("t", "t"), None, False, True), cache="hit").usage_row(200, "ok")
                .cost_usd) == 0  # zero by default
