"""The response cache (`lockgate serve --response-cache BYTES`): exact-match answers of
deterministic requests, so the same answer is never computed twice.

Pure policy and storage, no I/O: which requests may be cached (`cacheable`: greedy, or an
explicit seed), what makes two requests the same (`cache_key`: SHA-256 over the tenant's
namespace, the serving model version, the route, the exact prompt token ids and the effective
sampling parameters), what the client's `Cache-Control` asks (`CacheControl`), and
`ResponseCache`: LRU bounded in bytes, a TTL per entry, thread-safe, with its counters.
Entries are opaque bytes (the route side encodes the engine's final outputs:
server/cached_response.py). One cache per API process: with `--api-workers N` each worker has
its own. Off by default, so benchmarks and evaluations never hit it unknowingly.
"""
from __future__ import annotations

import dataclasses
import hashlib
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from lockgate.engine.sampling_params import GREEDY_TEMPERATURE_EPS, SamplingParams

HEADER = "x-lockgate-cache"  # response header: "hit" or "miss" (cacheable requests only)
DEFAULT_TTL_S = 600.0
MAX_TTL_S = 30 * 86400.0
MAX_BYTES = 1 << 40  # 1 TiB: anything larger is a typo
# Bookkeeping per entry besides its answer (key, node, dict slot): counted against the bound so
# that many tiny answers cannot grow the process far past it.
ENTRY_OVERHEAD = 256

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)")
_encode = msgspec.msgpack.encode  # a dataclass's fields in their declared order: the same bytes every time


def parse_bytes(text: str | int, flag: str = "--response-cache") -> int:
    """A size in bytes: a plain number or one with a unit (64MiB, 1.5GB, 512k); 0 is off.
    ValueError naming `flag` for anything else (negative, not a number, over 1 TiB)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = _SIZE.fullmatch(str(text).strip().lower())
        if m is None or m.group(2) not in _UNITS:
            raise ValueError(f"{flag}: expected a size in bytes such as 67108864 or 64MiB (units: KB, MB, GB, "
                             f"KiB, MiB, GiB), got {str(text)[:64]!r}")
        value = int(float(m.group(1)) * _UNITS[m.group(2)])
    if not 0 <= value <= MAX_BYTES:
        raise ValueError(f"{flag}: must be between 0 (off) and {MAX_BYTES} bytes (1 TiB), got {value}")
    return value


def check_ttl(ttl_s: float, flag: str = "--response-cache-ttl") -> float:
    if not 0 < ttl_s <= MAX_TTL_S:  # NaN fails too
        raise ValueError(f"{flag}: must be in (0, {MAX_TTL_S:.0f}] seconds, got {ttl_s}")
    return float(ttl_s)


def cacheable(params: SamplingParams) -> bool:
    """Whether the answer is a function of the request: greedy (temperature 0, as the engine treats
    it) or seeded. A sampled request without a seed must be sampled again each time."""
    return params.temperature < GREEDY_TEMPERATURE_EPS or params.seed is not None


@dataclass(frozen=True, slots=True)
class CacheControl:
    """The request's `Cache-Control`: `no-cache` skips the lookup (the fresh answer is still stored,
    as LiteLLM's clients expect); `no-store` neither reads nor writes."""

    read: bool = True
    write: bool = True

    @classmethod
    def parse(cls, header: str | None) -> CacheControl:
        if not header:
            return cls()
        directives = {d.strip().split("=", 1)[0].lower() for d in header[:1024].split(",")}
        if "no-store" in directives:
            return cls(read=False, write=False)
        if "no-cache" in directives:
            return cls(read=False, write=True)
        return cls()


def cache_key(namespace: str, model_version: str, route: str, prompts: list[list[int]],
              params: SamplingParams) -> bytes:
    """SHA-256 over everything that decides the answer: the tenant's namespace (never shared across
    tenants), the model version (`NAME@VERSION`), the route, every prompt's token ids (after the chat
    template and tools are rendered) and the effective sampling parameters (after defaults and the
    tenant's caps), every field of them: a field that cannot change the answer only splits entries."""
    bias = sorted(params.logit_bias.items()) if params.logit_bias else None  # its only map: order-free
    if bias is not None:
        params = dataclasses.replace(params, logit_bias=None)
    return hashlib.sha256(_encode([namespace, model_version, route, prompts, params, bias])).digest()


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    stores: int = 0
    evictions: int = 0  # by the byte bound (least recently used first)
    expirations: int = 0  # found past their TTL
    entries: int = 0
    bytes: int = 0


class _Entry:
    __slots__ = ("data", "size", "expires")

    def __init__(self, data: bytes, size: int, expires: float) -> None:
        self.data, self.size, self.expires = data, size, expires


class ResponseCache:
    """LRU by bytes (each entry's answer plus `ENTRY_OVERHEAD`) with a TTL per entry. Every method
    takes one lock: safe from threads, cheap on the event loop."""

    def __init__(self, max_bytes: int, ttl_s: float = DEFAULT_TTL_S, clock: Callable[[], float] | None = None
                 ) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        self.max_bytes = max_bytes
        self.ttl_s = check_ttl(ttl_s, "ttl_s")
        self._clock = clock or time.monotonic
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self._stats = CacheStats()

    def get(self, key: bytes) -> bytes | None:
        """The entry's bytes (now the most recently used), or None (a miss; an expired one is dropped)."""
        now = self._clock()
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.expires <= now:
                self._drop(key)
                self._stats.expirations += 1
                entry = None
            if entry is None:
                self._stats.misses += 1
                return None
            self._entries.move_to_end(key)
            self._stats.hits += 1
            return entry.data

    def put(self, key: bytes, data: bytes, ttl_s: float | None = None) -> bool:
        """Store (or replace) an entry for `ttl_s` (the cache's TTL by default), evicting the least
        recently used ones until it fits. False: larger than the whole cache, not stored."""
        size = len(data) + len(key) + ENTRY_OVERHEAD
        if size > self.max_bytes:
            return False
        expires = self._clock() + (self.ttl_s if ttl_s is None else ttl_s)
        with self._lock:
            if key in self._entries:
                self._drop(key)
            while self._stats.bytes + size > self.max_bytes:
                self._drop(next(iter(self._entries)))
                self._stats.evictions += 1
            self._entries[key] = _Entry(data, size, expires)
            self._stats.bytes += size
            self._stats.entries += 1
            self._stats.stores += 1
            return True

    def _drop(self, key: bytes) -> None:
        entry = self._entries.pop(key)
        self._stats.bytes -= entry.size
        self._stats.entries -= 1

    def stats(self) -> CacheStats:
        """A copy of the counters, entries and bytes held now."""
        with self._lock:
            s = self._stats
            return CacheStats(s.hits, s.misses, s.stores, s.evictions, s.expirations, s.entries, s.bytes)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
