"""The embedding cache in the store (schema 10, `embedding_cache`): `EmbeddingOps`, mixed into `SqlStore`.

What makes it shared: every API process of a server (`--api-workers`) opens the same SQLite file,
and every instance the same PostgreSQL database, so a vector computed by one is a hit for all.
Rows are keyed by (tenant, key) and read only with the caller's tenant: never across tenants.
Each row has its expiry (the TTL, fixed when written) and its last use (LRU). The bound in bytes
(the vectors' bytes, `nbytes`) holds over the whole table: a put drops expired rows, then the least
recently used ones, until the total fits. Vectors are stored as base64 text of little-endian float32.
"""
from __future__ import annotations

import base64
from typing import Any

_IN_CHUNK = 256  # keys per `IN (...)`: under every backend's limit on bound parameters
_EVICT_BATCH = 256  # rows looked at per round of eviction

_UPSERT = ("INSERT INTO embedding_cache(tenant_id, key, vector, nbytes, created_at, expires_at, used_at) "
           "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(tenant_id, key) DO UPDATE SET vector = excluded.vector, "
           "nbytes = excluded.nbytes, created_at = excluded.created_at, expires_at = excluded.expires_at, "
           "used_at = excluded.used_at")


class EmbeddingOps:
    def _write(self, admin: bool = False, lazy: bool = False) -> Any:
        raise NotImplementedError

    def _q(self, sql: str, args: tuple | list = ()) -> Any:
        raise NotImplementedError

    def embedding_cache_get(self, tenant_id: str, keys: list[str], now: float) -> dict[str, bytes]:
        """The tenant's live (unexpired) vectors among `keys`; their last use becomes `now`."""
        if not keys:
            return {}
        found: dict[str, str] = {}
        with self._write() as conn:
            for i in range(0, len(keys), _IN_CHUNK):
                chunk = keys[i:i + _IN_CHUNK]
                rows = conn.execute(
                    f"SELECT key, vector FROM embedding_cache WHERE tenant_id = ? AND expires_at > ? "
                    f"AND key IN ({','.join('?' * len(chunk))})", (tenant_id, now, *chunk)).fetchall()
                found.update((str(k), str(v)) for k, v in rows)
            if found:
                conn.executemany("UPDATE embedding_cache SET used_at = ? WHERE tenant_id = ? AND key = ?",
                                 [(now, tenant_id, k) for k in found])
        return {k: base64.b64decode(v) for k, v in found.items()}

    def embedding_cache_put(self, tenant_id: str, entries: list[tuple[str, bytes]], now: float, ttl_s: float,
                            max_bytes: int) -> int:
        """Write the tenant's vectors (replacing any under the same key), each living `ttl_s`; then
        evict down to `max_bytes`. Returns the table's bytes after."""
        rows = [(tenant_id, key, base64.b64encode(vec).decode("ascii"), len(vec), now, now + ttl_s, now)
                for key, vec in entries]
        with self._write() as conn:
            if rows:
                conn.executemany(_UPSERT, rows)
            return self._evict_embeddings(conn, now, max_bytes)

    def embedding_cache_evict(self, now: float, max_bytes: int) -> int:
        """Drop expired rows, then the least recently used until `max_bytes` holds; the bytes left."""
        with self._write() as conn:
            return self._evict_embeddings(conn, now, max_bytes)

    def embedding_cache_bytes(self) -> int:
        return int(self._q("SELECT COALESCE(SUM(nbytes), 0) FROM embedding_cache").fetchone()[0])

    @staticmethod
    def _evict_embeddings(conn: Any, now: float, max_bytes: int) -> int:
        conn.execute("DELETE FROM embedding_cache WHERE expires_at <= ?", (now,))
        total = int(conn.execute("SELECT COALESCE(SUM(nbytes), 0) FROM embedding_cache").fetchone()[0])
        while total > max_bytes:
            rows = conn.execute("SELECT tenant_id, key, nbytes FROM embedding_cache ORDER BY used_at, key "
                                f"LIMIT {_EVICT_BATCH}").fetchall()
            if not rows:
                break
            victims = []
            for tenant_id, key, nbytes in rows:
                if total <= max_bytes:
                    break
                victims.append((tenant_id, key))
                total -= int(nbytes)
            conn.executemany("DELETE FROM embedding_cache WHERE tenant_id = ? AND key = ?", victims)
        return max(total, 0)
