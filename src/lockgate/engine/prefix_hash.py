"""Prefix-cache block hashes, shared by the engine core (its KV cache) and the API process (the
replica router): both must compute exactly the same chain for the same prompt.

A full block of `block_size` tokens is named by a 16-byte blake2b hash chained over every
token before it, starting from a root derived from the request's `cache_salt` (its tenant),
so one tenant's prompt never names another tenant's block.
"""
from __future__ import annotations

import hashlib

import numpy as np

BLOCK_HASH_BYTES = 16


def root_hash(cache_salt: str | None) -> bytes:
    return hashlib.blake2b((cache_salt or "").encode(), digest_size=BLOCK_HASH_BYTES, person=b"lockgate-kv").digest()


def hash_block(parent: bytes, token_ids: list[int]) -> bytes:
    """Chained hash of one full block. 16-byte blake2b: collisions are not a concern."""
    h = hashlib.blake2b(parent, digest_size=BLOCK_HASH_BYTES)
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.digest()


def prompt_block_hashes(token_ids: list[int], block_size: int, cache_salt: str | None,
                        max_blocks: int | None = None) -> list[bytes]:
    """The chained hashes of the prompt's full blocks that the engine could serve from its cache:
    those within the first `len - 1` tokens (one token is always computed), as `lookup_prefix`.
    One conversion of the whole prompt, then a slice per block (the router runs this per request)."""
    n = (len(token_ids) - 1) // block_size
    if max_blocks is not None:
        n = min(n, max_blocks)
    if n <= 0:
        return []
    data = np.asarray(token_ids[: n * block_size], dtype=np.int64).tobytes()
    step = block_size * 8
    parent = root_hash(cache_salt)
    out: list[bytes] = []
    blake = hashlib.blake2b
    for i in range(n):
        h = blake(parent, digest_size=BLOCK_HASH_BYTES)
        h.update(data[i * step:(i + 1) * step])
        parent = h.digest()
        out.append(parent)
    return out
