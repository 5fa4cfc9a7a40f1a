"""The embedding cache (`lockgate serve --embedding-cache BYTES`): a vector computed once is never
computed again while it lives, because repeated texts are common.

Per tenant (never shared across tenants; open mode's tenant is ''), keyed by `cache_key`: SHA-256
of the served model name and version, the input's token ids and the requested `dimensions`. LRU
bounded in bytes (the vectors' bytes), each entry living a TTL from when it was written. Two homes,
one interface (`get`, `put`, `nbytes`):

- `MemoryEmbeddingCache`: this process's own (a server without a store: open mode, no data dir);
  an ordered dict under a lock, so any thread may use it;
- `StoreEmbeddingCache`: the store's `embedding_cache` table (store/embedding_ops.py), shared by
  every API process of the server (and every instance on PostgreSQL); reached through the
  `AsyncStore`, never on the event loop.

A cache never fails a request: a lookup it cannot answer is a miss, a write that fails is dropped
(logged). Vectors are opaque little-endian float32 bytes here.
"""
from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

from lockgate.gateway.response_cache import check_ttl, parse_bytes

log = logging.getLogger("lockgate.gateway")

DEFAULT_BYTES = 64 * 2**20
DEFAULT_TTL_S = 3600.0
_SWEEP_EVERY_S = 60.0  # the memory cache drops expired entries at least this often (on a put)


def cache_key(model: str, version: str | None, token_ids: list[int], dimensions: int | None) -> str:
    """What makes two inputs the same vector: the model's served name and version, the exact token
    ids (after tokenization, so equal texts and their token ids meet) and the requested dimensions."""
    h = hashlib.sha256()
    h.update(f"{len(model)}:{model}|{version or ''}|{dimensions or 0}|".encode())
    h.update(",".join(map(str, token_ids)).encode("ascii"))
    return h.hexdigest()


def check_settings(max_bytes: int, ttl_s: float) -> None:
    """The flags' values (ValueError naming the flag)."""
    parse_bytes(max_bytes, "--embedding-cache")
    check_ttl(ttl_s, "--embedding-cache-ttl")


class EmbeddingCache(Protocol):
    shared: bool  # every API process of the server sees the same entries

    @property
    def nbytes(self) -> int: ...  # the vectors' bytes held (as last known)

    async def get(self, tenant: str, keys: list[str]) -> dict[str, bytes]: ...

    async def put(self, tenant: str, entries: list[tuple[str, bytes]]) -> None: ...


class MemoryEmbeddingCache:
    shared = False

    def __init__(self, max_bytes: int, ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        self.max_bytes = int(max_bytes)
        self.ttl_s = float(ttl_s)
        self.clock = clock
        self._entries: OrderedDict[tuple[str, str], tuple[bytes, float]] = OrderedDict()  # LRU first
        self._lock = threading.Lock()
        self._bytes = 0
        self._next_sweep = 0.0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get_now(self, tenant: str, keys: list[str]) -> dict[str, bytes]:
        now = self.clock()
        found: dict[str, bytes] = {}
        with self._lock:
            for key in keys:
                slot = (tenant, key)
                entry = self._entries.get(slot)
                if entry is None:
                    continue
                if entry[1] <= now:  # expired: gone
                    self._drop(slot)
                    continue
                self._entries.move_to_end(slot)
                found[key] = entry[0]
        return found

    def put_now(self, tenant: str, entries: list[tuple[str, bytes]]) -> None:
        now = self.clock()
        expires = now + self.ttl_s
        with self._lock:
            if now >= self._next_sweep:
                for slot in [s for s, (_, exp) in self._entries.items() if exp <= now]:
                    self._drop(slot)
                self._next_sweep = now + min(self.ttl_s, _SWEEP_EVERY_S)
            for key, vec in entries:
                if len(vec) > self.max_bytes:
                    continue  # would evict everything and still not fit
                slot = (tenant, key)
                self._drop(slot)
                self._entries[slot] = (vec, expires)
                self._bytes += len(vec)
            while self._bytes > self.max_bytes and self._entries:
                self._drop(next(iter(self._entries)))

    def _drop(self, slot: tuple[str, str]) -> None:
        entry = self._entries.pop(slot, None)
        if entry is not None:
            self._bytes -= len(entry[0])

    async def get(self, tenant: str, keys: list[str]) -> dict[str, bytes]:
        return self.get_now(tenant, keys)  # microseconds under the lock: no thread hop

    async def put(self, tenant: str, entries: list[tuple[str, bytes]]) -> None:
        self.put_now(tenant, entries)


class StoreEmbeddingCache:
    shared = True

    def __init__(self, store: Any, astore: Any, max_bytes: int, ttl_s: float,
                 clock: Callable[[], float] = time.time) -> None:
        """`store`: a `SqlStore` (its `embedding_cache_*` methods); `astore`: its `AsyncStore`."""
        self.store, self.astore = store, astore
        self.max_bytes = int(max_bytes)
        self.ttl_s = float(ttl_s)
        self.clock = clock
        self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    async def get(self, tenant: str, keys: list[str]) -> dict[str, bytes]:
        if not keys:
            return {}
        try:
            return await self.astore.hot(self.store.embedding_cache_get, tenant, keys, self.clock())
        except Exception as e:  # noqa: BLE001 - a cache: the inputs are computed instead
            log.warning("embedding cache lookup failed (computing instead): %r", e)
            return {}

    async def put(self, tenant: str, entries: list[tuple[str, bytes]]) -> None:
        entries = [(k, v) for k, v in entries if len(v) <= self.max_bytes]
        if not entries:
            return
        try:
            self._bytes = await self.astore.call(self.store.embedding_cache_put, tenant, entries, self.clock(),
                                                 self.ttl_s, self.max_bytes)
        except Exception as e:  # noqa: BLE001 - the answer is already computed; only the reuse is lost
            log.warning("embedding cache write failed: %r", e)


def build_embedding_cache(max_bytes: int, ttl_s: float, store: Any = None, astore: Any = None
                          ) -> EmbeddingCache | None:
    """None when off (`max_bytes` 0); in the store when the gateway has one, else in this process."""
    if max_bytes <= 0:
        return None
    if store is not None and astore is not None and hasattr(store, "embedding_cache_get"):
        return StoreEmbeddingCache(store, astore, max_bytes, ttl_s)
    return MemoryEmbeddingCache(max_bytes, ttl_s)
