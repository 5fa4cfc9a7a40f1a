"""Paged KV-cache block manager with automatic prefix caching.

The pool holds `num_blocks` fixed-size blocks. A request's KV lives in the blocks
of its block table. A full block is identified by a hash chained over every
token before it (and the request's `cache_salt`, so tenants never share blocks).
Freed blocks stay in the cache, evictable in LRU order, until their memory is
needed again.

With `record_events`, the manager also records what its cache gains and loses as
KV-cache events in vLLM's schema (`engine/kv_events.py`): `BlockStored` when blocks
become canonical cached blocks, `BlockRemoved` when they are evicted or dropped,
`AllBlocksCleared` when a reset drops everything; the core loop drains them
(`take_events`) and publishes them. `snapshot_events` describes the whole cache
for a subscriber that must start over. Off (the offline engine, the simulator),
none of it runs.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from lockgate.engine.core.request import Request
from lockgate.engine.kv_events import (
    AllBlocksCleared, BlockRemoved, BlockStored, KVEvent, block_removed, block_stored)
from lockgate.engine.prefix_hash import hash_block, root_hash


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None  # set once the block is full and registered


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks needed to hold `num_tokens` tokens."""
    return -(-num_tokens // block_size)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 record_events: bool = False) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {num_blocks}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Blocks nobody references, oldest-freed first: the eviction order (LRU).
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[bytes, int] = {}  # block hash -> block id
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # of those, tokens served from the cache
        # KV-cache events (None: not recorded). For snapshots, each block's parent hash and tokens
        # while it is a canonical cached block: memory bounded by the pool, overwritten on reuse.
        self._events: list[KVEvent] | None = None
        if record_events and enable_prefix_caching:
            self._events = []
            self._block_parent: list[bytes | None] = [None] * num_blocks
            self._block_tokens = np.zeros((num_blocks, block_size), dtype=np.int32)

    # ---- accounting -------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by live requests (cached-but-free blocks count as free)."""
        return 1.0 - len(self.free_queue) / len(self.blocks)

    @property
    def record_events(self) -> bool:
        return self._events is not None

    def blocks_needed(self, num_tokens: int) -> int:
        return blocks_for(num_tokens, self.block_size)

    # ---- prefix cache -----------------------------------------------------
    def _extend_hashes(self, req: Request, upto_tokens: int) -> None:
        """Compute the chained hashes of req's full blocks among its first `upto_tokens` tokens."""
        bs = self.block_size
        parent = req.block_hashes[-1] if req.block_hashes else root_hash(req.cache_salt)
        for i in range(len(req.block_hashes), upto_tokens // bs):
            parent = hash_block(parent, req.token_ids(i * bs, (i + 1) * bs))
            req.block_hashes.append(parent)

    def lookup_prefix(self, req: Request) -> list[int]:
        """Cached blocks matching req's longest prefix. At least one token is left to
        compute, so the step that finishes the prompt still produces logits."""
        if not self.enable_prefix_caching:
            return []
        limit = req.num_tokens - 1
        self._extend_hashes(req, limit)
        hits: list[int] = []
        for h in req.block_hashes[: limit // self.block_size]:
            bid = self.cached.get(h)
            if bid is None:
                break
            hits.append(bid)
        return hits

    def record_lookup(self, num_prompt_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queries += num_prompt_tokens
        self.prefix_hits += num_hit_tokens

    # ---- allocation -------------------------------------------------------
    def _take_free(self) -> Block:
        bid, _ = self.free_queue.popitem(last=False)
        block = self.blocks[bid]
        if block.block_hash is not None:  # evict: its contents are about to be overwritten
            if self.cached.get(block.block_hash) == bid:
                del self.cached[block.block_hash]
                if self._events is not None:
                    self._record_removed(block.block_hash)
            block.block_hash = None
        return block

    def can_allocate(self, req: Request, num_new_tokens: int, hit_blocks: list[int] = ()) -> bool:
        need = self.blocks_needed(req.num_computed_tokens + len(hit_blocks) * self.block_size + num_new_tokens)
        need -= len(req.block_ids) + len(hit_blocks)
        # Hit blocks that sit in the free queue stop being free once we reference them.
        reclaimed = sum(1 for b in hit_blocks if self.blocks[b].ref_count == 0)
        return need <= len(self.free_queue) - reclaimed

    def allocate(self, req: Request, num_new_tokens: int, hit_blocks: list[int] = ()) -> bool:
        """Give req blocks for `num_new_tokens` more tokens (after taking `hit_blocks`
        from the prefix cache). All or nothing: False leaves req untouched."""
        if not self.can_allocate(req, num_new_tokens, hit_blocks):
            return False
        for bid in hit_blocks:
            block = self.blocks[bid]
            if block.ref_count == 0:
                del self.free_queue[bid]
            block.ref_count += 1
            req.block_ids.append(bid)
        req.num_computed_tokens += len(hit_blocks) * self.block_size
        need = self.blocks_needed(req.num_computed_tokens + num_new_tokens) - len(req.block_ids)
        for _ in range(need):
            block = self._take_free()
            block.ref_count = 1
            req.block_ids.append(block.block_id)
        return True

    def cache_computed_blocks(self, req: Request) -> None:
        """Register req's blocks that became full with computed KV so others can reuse them."""
        if not self.enable_prefix_caching:
            return
        num_full = req.num_computed_tokens // self.block_size
        self._extend_hashes(req, num_full * self.block_size)
        if self._events is not None:
            self._cache_and_record(req, num_full)
            return
        for i in range(num_full):
            block = self.blocks[req.block_ids[i]]
            if block.block_hash is not None:
                continue
            h = req.block_hashes[i]
            block.block_hash = h
            # Two requests may compute the same block concurrently; the first one stays canonical.
            self.cached.setdefault(h, block.block_id)

    def trim(self, req: Request, num_tokens: int) -> None:
        """Free req's blocks past those `num_tokens` tokens need (rejected speculative rows): tail
        blocks that hold no computed token, never hashed, so first in line for reuse."""
        keep = self.blocks_needed(num_tokens)
        while len(req.block_ids) > keep:
            self._release(req.block_ids.pop())

    def free(self, req: Request) -> None:
        """Drop req's references. Tail blocks go to the free queue first, so under
        pressure a shared prefix outlives the unique suffixes that follow it."""
        for bid in reversed(req.block_ids):
            self._release(bid)
        req.block_ids = []
        req.num_computed_tokens = 0

    def _release(self, bid: int) -> None:
        """One reference to block `bid` dropped; unreferenced, it joins the free queue: at the front
        when its contents are worthless (not the canonical cached copy), else at the back (LRU)."""
        block = self.blocks[bid]
        block.ref_count -= 1
        if block.ref_count == 0:
            if block.block_hash is None or self.cached.get(block.block_hash) != bid:
                block.block_hash = None
                self.free_queue[bid] = None
                self.free_queue.move_to_end(bid, last=False)
            else:
                self.free_queue[bid] = None

    def reset_prefix_cache(self) -> None:
        """Drop every cached block nobody references (blocks in use stay cached)."""
        dropped: list[bytes] = []
        for h, bid in list(self.cached.items()):
            if self.blocks[bid].ref_count == 0:
                self.blocks[bid].block_hash = None
                del self.cached[h]
                dropped.append(h)
        if self._events is not None and dropped:
            if self.cached:
                self._events.append(block_removed(dropped))
            else:  # everything went: one clear says it all (and supersedes what is pending)
                self._events[:] = [AllBlocksCleared()]

    # ---- KV-cache events ----------------------------------------------------
    def _cache_and_record(self, req: Request, num_full: int) -> None:
        """`cache_computed_blocks` with events: each run of consecutive blocks that became
        canonical in this call is one BlockStored."""
        run = -1  # first block of the current run of new canonical blocks
        for i in range(num_full):
            block = self.blocks[req.block_ids[i]]
            if block.block_hash is None:
                h = req.block_hashes[i]
                block.block_hash = h
                if h not in self.cached:  # the first one computed stays canonical
                    self.cached[h] = block.block_id
                    if run < 0:
                        run = i
                    continue
            if run >= 0:
                self._record_stored(req, run, i)
                run = -1
        if run >= 0:
            self._record_stored(req, run, num_full)

    def _record_stored(self, req: Request, start: int, end: int) -> None:
        bs = self.block_size
        hashes = req.block_hashes[start:end]
        parent = req.block_hashes[start - 1] if start else None  # a chain's root is never published
        tokens = req.token_ids(start * bs, end * bs)
        ids = req.block_ids[start:end]
        self._block_tokens[ids] = np.asarray(tokens, dtype=np.int32).reshape(end - start, bs)
        prev = parent
        for bid, h in zip(ids, hashes):
            self._block_parent[bid] = prev
            prev = h
        assert self._events is not None
        self._events.append(block_stored(hashes, parent, tokens, bs))

    def _record_removed(self, block_hash: bytes) -> None:
        events = self._events
        assert events is not None
        if events and isinstance(events[-1], BlockRemoved):  # evictions of one allocation: one event
            events[-1].block_hashes.append(block_hash)
        else:
            events.append(block_removed([block_hash]))

    def take_events(self) -> list[KVEvent]:
        """The events recorded since the last call, oldest first ([] when not recording)."""
        events = self._events
        if not events:
            return []
        self._events = []
        return events

    def snapshot_events(self) -> list[BlockStored]:
        """Every canonical cached block as BlockStored events, each block after its parent
        (when the parent is cached too): applied to an empty index, they give the cache."""
        if self._events is None:
            raise RuntimeError("snapshot_events needs record_events=True (and prefix caching)")
        cached, parents, bs = self.cached, self._block_parent, self.block_size
        emitted: set[bytes] = set()
        out: list[BlockStored] = []
        for h in cached:
            if h in emitted:
                continue
            chain: dict[bytes, int] = {}  # from h up to the first ancestor already emitted or not cached
            x: bytes | None = h
            while x is not None and x not in emitted and x not in chain:
                bid = cached.get(x)
                if bid is None:
                    break
                chain[x] = bid
                x = parents[bid]
            hashes = list(chain)[::-1]
            ids = list(chain.values())[::-1]
            emitted.update(hashes)
            out.append(block_stored(hashes, parents[ids[0]], self._block_tokens[ids].ravel().tolist(), bs))
        return out
