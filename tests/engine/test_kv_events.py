"""KV-cache events: what the KV cache records, vLLM's wire shapes, the publisher and the
subscriber over real ZeroMQ ipc sockets (gaps, reconnects, snapshots, restarts, garbage),
and one real engine-core process whose index survives a SIGKILL."""
from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
import zmq

from lockgate.engine.config import EngineConfig
from lockgate.engine.core.kv_cache import KVCacheManager
from lockgate.engine.core.request import Request
from lockgate.engine.frontend.client import AsyncEngineClient
from lockgate.engine.frontend.kv_events_sub import KVEventSubscriber
from lockgate.engine.kv_events import (
    END_SEQ,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
    KVEventBatch,
    KVEventPublisher,
    block_removed,
    block_stored,
    decode_batch,
    encode_batch,
)
from lockgate.engine.messages import EngineCoreRequest
from lockgate.engine.prefix_hash import hash_block, prompt_block_hashes, root_hash
from lockgate.engine.sampling_params import SamplingParams


def req(rid: str, tokens: list[int], salt: str | None = None) -> Request:
    return Request(EngineCoreRequest(rid, tokens, SamplingParams(max_tokens=4), 0.0, cache_salt=salt), [], 4)


def compute(kv: KVCacheManager, r: Request) -> None:
    """Admit r (taking prefix hits) and pretend its whole prompt was computed."""
    hits = kv.lookup_prefix(r)
    assert kv.allocate(r, r.num_tokens - r.num_computed_tokens - len(hits) * kv.block_size, hits)
    r.num_computed_tokens = r.num_tokens
    kv.cache_computed_blocks(r)


class Index:
    """What a router keeps: the set of a core's cached block hashes."""

    def __init__(self) -> None:
        self.hashes: set[bytes] = set()
        self.resets = 0
        self.batches = 0

    def apply(self, events: list[KVEvent]) -> None:
        self.batches += 1
        for ev in events:
            if isinstance(ev, BlockStored):
                self.hashes.update(ev.block_hashes)  # type: ignore[arg-type]
            elif isinstance(ev, BlockRemoved):
                self.hashes.difference_update(ev.block_hashes)  # type: ignore[arg-type]
            else:
                self.hashes.clear()

    def reset(self) -> None:
        self.resets += 1
        self.hashes.clear()


# ---- recording in the KV cache -------------------------------------------------------------


def test_nothing_recorded_when_off() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4)
    assert not kv.record_events
    for i in range(5):  # fills, evicts, resets
        r = req(f"r{i}", [i * 100 + j for j in range(9)])
        compute(kv, r)
        kv.free(r)
    kv.reset_prefix_cache()
    assert kv.take_events() == []
    with pytest.raises(RuntimeError):
        kv.snapshot_events()
    # No prefix caching: nothing to record even when asked.
    assert not KVCacheManager(num_blocks=4, block_size=4, enable_prefix_caching=False, record_events=True).record_events


def test_stored_events_chain_parents_with_none_first() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4, record_events=True)
    tokens = list(range(13))
    a = req("a", tokens, salt="t1")
    compute(kv, a)
    (ev,) = kv.take_events()
    assert isinstance(ev, BlockStored)
    assert ev.block_hashes == prompt_block_hashes(tokens + [0], 4, "t1")[:3] == a.block_hashes[:3]
    assert ev.parent_block_hash is None  # the salted root is never published
    assert ev.token_ids == tokens[:12] and ev.block_size == 4
    assert (ev.lora_id, ev.medium, ev.lora_name) == (None, "GPU", None)
    assert kv.take_events() == []  # drained

    # Shares two blocks, adds one: only the new block, its parent the last shared one.
    b = req("b", tokens[:8] + [99, 98, 97, 96, 95], salt="t1")
    compute(kv, b)
    (ev,) = kv.take_events()
    assert ev.block_hashes == [b.block_hashes[2]] and ev.parent_block_hash == a.block_hashes[1]
    assert ev.token_ids == [99, 98, 97, 96]

    # Decoding fills blocks one call at a time: one event per new block, chained across calls.
    c = req("c", [7] * 3, salt="t2")
    compute(kv, c)
    assert kv.take_events() == []  # no full block yet
    for tok in range(6):
        c.output_token_ids.append(tok)
        assert kv.allocate(c, 1)
        c.num_computed_tokens += 1
        kv.cache_computed_blocks(c)
    events = kv.take_events()
    assert [e.block_hashes for e in events] == [[c.block_hashes[0]], [c.block_hashes[1]]]
    assert [e.parent_block_hash for e in events] == [None, c.block_hashes[0]]
    assert events[1].token_ids == c.token_ids(4, 8) == [1, 2, 3, 4]


def test_same_block_computed_twice_is_stored_once() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4, record_events=True)
    a, b = req("a", list(range(9))), req("b", list(range(9)))
    for r in (a, b):  # both admitted before either computed: no hits, two copies
        assert kv.allocate(r, 9, [])
    for r in (a, b):
        r.num_computed_tokens = 9
        kv.cache_computed_blocks(r)
    events = kv.take_events()
    assert len(events) == 1 and events[0].block_hashes == a.block_hashes[:2]
    kv.free(a)
    kv.free(b)
    assert kv.take_events() == []  # freeing is no eviction


def test_removed_on_eviction_and_snapshot_follows() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4, record_events=True)
    a = req("a", list(range(9)))
    compute(kv, a)  # 3 blocks, 2 full
    kv.free(a)
    kv.take_events()
    b = req("b", list(range(100, 116)))  # needs all 4 blocks: evicts both cached ones
    compute(kv, b)
    removed = [e for e in kv.take_events() if isinstance(e, BlockRemoved)]
    assert len(removed) == 1  # evictions of one allocation: one event
    assert sorted(removed[0].block_hashes) == sorted(a.block_hashes[:2])
    assert removed[0].medium == "GPU"
    index = Index()
    index.apply(kv.snapshot_events())
    assert index.hashes == set(kv.cached) == set(b.block_hashes[:4])


def test_snapshot_lists_parents_first_with_their_tokens() -> None:
    kv = KVCacheManager(num_blocks=64, block_size=4, record_events=True)
    rng = random.Random(1)
    base = [rng.randrange(1000) for _ in range(12)]
    for i in range(6):  # a tree: shared prefixes of different lengths, two tenants
        cut = rng.choice([0, 4, 8, 12])
        r = req(f"r{i}", base[:cut] + [rng.randrange(1000) for _ in range(rng.randrange(5, 14))],
                salt="t1" if i % 3 else "t2")
        compute(kv, r)
        kv.free(r)
    events = kv.snapshot_events()
    seen: set[bytes] = set()
    for ev in events:
        assert isinstance(ev, BlockStored)
        parent = ev.parent_block_hash
        assert parent is None or parent in seen or parent not in kv.cached  # parents first
        # The tokens are the blocks' own: the chain recomputes from them (salt: one of the two roots).
        roots = [root_hash("t1"), root_hash("t2")] if parent is None else [parent]
        ok = False
        for p in roots:
            chain, h = [], p
            for j in range(len(ev.block_hashes)):
                h = hash_block(h, ev.token_ids[j * 4:(j + 1) * 4])
                chain.append(h)
            ok = ok or chain == ev.block_hashes
        assert ok
        seen.update(ev.block_hashes)  # type: ignore[arg-type]
    assert seen == set(kv.cached) and len(seen) == len(kv.cached)


def test_reset_prefix_cache_events() -> None:
    kv = KVCacheManager(num_blocks=16, block_size=4, record_events=True)
    a, b = req("a", list(range(9))), req("b", list(range(50, 59)))
    compute(kv, a)
    compute(kv, b)
    kv.free(a)
    kv.take_events()
    kv.reset_prefix_cache()  # b holds its blocks: only a's go
    (ev,) = kv.take_events()
    assert isinstance(ev, BlockRemoved) and sorted(ev.block_hashes) == sorted(a.block_hashes[:2])
    kv.free(b)
    kv.reset_prefix_cache()
    assert kv.take_events() == [AllBlocksCleared()] and not kv.cached
    kv.reset_prefix_cache()
    assert kv.take_events() == []  # nothing dropped, nothing said


def test_events_replayed_give_the_cache_and_change_no_decision() -> None:
    """A random workload with evictions: the index built from the events is the cache,
    and recording does not change a single allocation."""
    def run(record: bool) -> tuple[KVCacheManager, list[list[int]], Index]:
        kv = KVCacheManager(num_blocks=24, block_size=4, record_events=record)
        rng = random.Random(7)
        prefixes = [[rng.randrange(500) for _ in range(rng.choice([4, 8, 12]))] for _ in range(4)]
        live: list[Request] = []
        tables: list[list[int]] = []
        index = Index()
        for i in range(300):
            if live and (len(live) > 3 or rng.random() < 0.4):
                kv.free(live.pop(rng.randrange(len(live))))
            r = req(f"r{i}", rng.choice(prefixes) + [rng.randrange(500) for _ in range(rng.randrange(1, 10))],
                    salt=rng.choice(["a", "b"]))
            hits = kv.lookup_prefix(r)
            if kv.allocate(r, r.num_tokens - len(hits) * 4, hits):
                r.num_computed_tokens = r.num_tokens
                kv.cache_computed_blocks(r)
                live.append(r)
                tables.append(list(r.block_ids))
            index.apply(kv.take_events())
            if i == 150:
                for x in live:
                    kv.free(x)
                live.clear()
                kv.reset_prefix_cache()
                index.apply(kv.take_events())
        return kv, tables, index

    kv, tables, index = run(True)
    plain, plain_tables, _ = run(False)
    assert tables == plain_tables and kv.cached == plain.cached
    assert index.hashes == set(kv.cached)
    snap = Index()
    snap.apply(kv.snapshot_events())
    assert snap.hashes == set(kv.cached)


# ---- vLLM's wire shapes -------------------------------------------------------------------


def test_msgpack_layout_is_vllms() -> None:
    h1, h2, h0 = b"\x01" * 16, b"\x02" * 16, b"\x00" * 16
    batch = KVEventBatch(ts=12.5, events=[
        block_stored([h1, h2], None, [1, 2, 3, 4, 5, 6, 7, 8], 4),
        block_stored([h2], h0, [9, 9, 9, 9], 4),
        block_removed([h1]),
        AllBlocksCleared(),
    ], data_parallel_rank=0)
    raw = msgspec.msgpack.decode(encode_batch(batch))  # untyped: the bare msgpack structure
    # Positional, the tag first; array-like structs keep every field (omit_defaults trims nothing):
    # block_hashes, parent_block_hash, token_ids, block_size, lora_id, medium, lora_name,
    # extra_keys, group_idx, kv_cache_spec_kind, kv_cache_spec_sliding_window.
    assert raw == [12.5, [
        ["BlockStored", [h1, h2], None, [1, 2, 3, 4, 5, 6, 7, 8], 4, None, "GPU", None, None, None, None, None],
        ["BlockStored", [h2], h0, [9, 9, 9, 9], 4, None, "GPU", None, None, None, None, None],
        ["BlockRemoved", [h1], "GPU", None],  # block_hashes, medium, group_idx
        ["AllBlocksCleared"],
    ], 0]  # ts, events, data_parallel_rank
    assert decode_batch(encode_batch(batch)) == batch
    # vLLM's later optional fields decode too (a batch from a vLLM engine).
    full = msgspec.msgpack.encode([1.0, [["BlockStored", [7], 3, [1, 2], 2, None, "GPU", None, [None], 0,
                                          "full_attention"], ["BlockRemoved", [7], "GPU", 0]], 1])
    got = decode_batch(full)
    assert got.data_parallel_rank == 1 and got.events[0].kv_cache_spec_kind == "full_attention"
    assert got.events[1].group_idx == 0
    with pytest.raises(msgspec.ValidationError):
        decode_batch(msgspec.msgpack.encode([1.0, [["BlockGone", [1]]]]))


def _addrs(tmp: str) -> tuple[str, str]:
    return f"ipc://{tmp}/kv-events", f"ipc://{tmp}/kv-replay"


def test_pub_frames_and_replay_protocol(tmp_path: Path) -> None:
    pub_addr, replay_addr = _addrs(str(tmp_path))
    snap = [block_stored([b"\x05" * 16], None, [1, 2], 2)]
    pub = KVEventPublisher(pub_addr, replay_addr, topic="kv", buffer_batches=3, snapshot=lambda: snap)
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"kv")
    sub.connect(pub_addr)
    dealer = ctx.socket(zmq.DEALER)
    dealer.connect(replay_addr)
    try:
        time.sleep(0.2)  # the subscription reaches the PUB socket
        payloads = []
        for i in range(5):
            assert pub.publish([block_removed([bytes([i]) * 16])], ts=float(i)) == i
            payloads.append(encode_batch(KVEventBatch(ts=float(i), events=[block_removed([bytes([i]) * 16])],
                                                      data_parallel_rank=0)))
        for i in range(5):
            assert sub.poll(2000)
            topic, seq, payload = sub.recv_multipart()
            assert (topic, seq, payload) == (b"kv", i.to_bytes(8, "big"), payloads[i])

        def replay(start: int) -> list[tuple[int, bytes]]:
            dealer.send_multipart([b"", start.to_bytes(8, "big")])
            out = []
            while True:
                deadline = time.monotonic() + 2
                while not dealer.poll(10):
                    pub.serve_replay()
                    assert time.monotonic() < deadline
                empty, seq, payload = dealer.recv_multipart()
                assert empty == b""
                n = int.from_bytes(seq, "big", signed=True)
                out.append((n, payload))
                if n == END_SEQ:
                    return out

        assert replay(3) == [(3, payloads[3]), (4, payloads[4]), (END_SEQ, b"")]
        assert replay(9) == [(END_SEQ, b"")]
        # Older than the buffer (it holds 2..4): one snapshot batch, tagged with the latest seq.
        (seq, payload), end = replay(0)
        assert seq == 4 and end == (END_SEQ, b"")
        assert decode_batch(payload).events == [AllBlocksCleared(), *snap]
        assert pub.num_snapshots == 1
    finally:
        sub.close(0)
        dealer.close(0)
        ctx.term()
        pub.close()


# ---- publisher and subscriber -------------------------------------------------------------


async def _until(cond: Callable[[], bool], pub: KVEventPublisher | None, timeout: float = 5.0) -> None:
    """Wait for `cond`, answering replays meanwhile (as the core loop does)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if pub is not None:
            pub.serve_replay()
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


class Workload:
    """A KV cache with events on, driven by random requests, publishing after each one."""

    def __init__(self, pub: KVEventPublisher, kv: KVCacheManager, seed: int = 3) -> None:
        self.pub, self.kv = pub, kv
        self.rng = random.Random(seed)
        self.live: list[Request] = []
        self.n = 0

    def step(self, count: int = 1) -> None:
        rng, kv = self.rng, self.kv
        for _ in range(count):
            self.n += 1
            if self.live and (len(self.live) > 2 or rng.random() < 0.5):
                kv.free(self.live.pop(0))
            r = req(f"w{self.n}", [rng.randrange(6) for _ in range(rng.randrange(4, 20))])
            hits = kv.lookup_prefix(r)
            if kv.allocate(r, r.num_tokens - len(hits) * kv.block_size, hits):
                r.num_computed_tokens = r.num_tokens
                kv.cache_computed_blocks(r)
                self.live.append(r)
            events = kv.take_events()
            if events:
                self.pub.publish(events)


def _setup(tmp: str, buffer_batches: int = 1000) -> tuple[KVEventPublisher, KVCacheManager, Workload]:
    kv = KVCacheManager(num_blocks=12, block_size=2, record_events=True)
    pub = KVEventPublisher(*_addrs(tmp), buffer_batches=buffer_batches, snapshot=kv.snapshot_events)
    pub.publish([AllBlocksCleared()])  # as the core does
    return pub, kv, Workload(pub, kv)


def _synced(sub: KVEventSubscriber, pub: KVEventPublisher) -> Callable[[], bool]:
    return lambda: sub.last_seq == pub.next_seq - 1


def test_index_follows_the_cache(tmp_path: Path) -> None:
    async def main() -> None:
        pub, kv, work = _setup(str(tmp_path))
        work.step(20)  # before the subscriber: it catches up by replay from 0
        index = Index()
        sub = KVEventSubscriber(*_addrs(str(tmp_path)), index.apply, index.reset)
        await sub.start()
        try:
            await _until(_synced(sub, pub), pub)
            assert index.hashes == set(kv.cached)
            for _ in range(10):  # then live, on the PUB socket
                work.step(5)
                await _until(_synced(sub, pub), pub)
                assert index.hashes == set(kv.cached)
            assert (sub.num_gaps, sub.num_resets, pub.num_snapshots) == (0, 0, 0)
        finally:
            await sub.close()
            pub.close()

    asyncio.run(main())


def test_dropped_batch_is_repaired_by_replay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main() -> None:
        pub, kv, work = _setup(str(tmp_path))
        index = Index()
        sub = KVEventSubscriber(*_addrs(str(tmp_path)), index.apply, index.reset)
        await sub.start()
        try:
            await _until(_synced(sub, pub), pub)
            send = pub._send_pub
            with monkeypatch.context() as m:  # the next batches never reach the subscriber
                m.setattr(pub, "_send_pub", lambda frames: None)
                while pub.next_seq < 4:
                    work.step()
            while pub.next_seq < 6:
                work.step()
            assert pub._send_pub == send
            await _until(_synced(sub, pub), pub)
            assert index.hashes == set(kv.cached)
            assert sub.num_gaps >= 1 and sub.num_resets == 0 and pub.num_replays >= 2
        finally:
            await sub.close()
            pub.close()

    asyncio.run(main())


@pytest.mark.parametrize("buffer_batches", [1000, 3])
def test_reconnect_rebuilds_the_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, buffer_batches: int) -> None:
    """A subscriber that lost its socket for a while: replayed, or (buffer gone) a snapshot."""
    async def main() -> None:
        pub, kv, work = _setup(str(tmp_path), buffer_batches)
        index = Index()
        sub = KVEventSubscriber(*_addrs(str(tmp_path)), index.apply, index.reset)
        await sub.start()
        try:
            await _until(_synced(sub, pub), pub)
            work.step(3)
            await _until(_synced(sub, pub), pub)
            seen = sub.last_seq
            with monkeypatch.context() as m:
                m.setattr(pub, "_send_pub", lambda frames: None)
                while pub.next_seq < seen + 12:
                    work.step()
            await sub.reconnect()
            await _until(_synced(sub, pub), pub)
            assert index.hashes == set(kv.cached)
            assert sub.num_reconnects == 1 and sub.num_resets == 0
            assert pub.num_snapshots == (1 if buffer_batches == 3 else 0)
            work.step(5)  # and it goes on live
            await _until(_synced(sub, pub), pub)
            assert index.hashes == set(kv.cached)
        finally:
            await sub.close()
            pub.close()

    asyncio.run(main())


def test_new_publisher_resets_the_index(tmp_path: Path) -> None:
    async def main() -> None:
        addrs = _addrs(str(tmp_path))
        pub, kv, work = _setup(str(tmp_path))
        index = Index()
        sub = KVEventSubscriber(*addrs, index.apply, index.reset)
        await sub.start()
        try:
            work.step(10)
            await _until(_synced(sub, pub), pub)
            assert index.hashes
            # The same publisher starting its seq over (no disconnect): a seq that goes backwards.
            kv2 = KVCacheManager(num_blocks=12, block_size=2, record_events=True)
            pub.next_seq = 0
            pub._buffer.clear()
            pub._snapshot = kv2.snapshot_events
            pub.publish([AllBlocksCleared()])
            work2 = Workload(pub, kv2, seed=11)
            work2.step(2)
            await _until(lambda: sub.num_resets == 1 and _synced(sub, pub)(), pub)
            assert index.hashes == set(kv2.cached) and index.resets == 1
            # A restarted core: its sockets close, a new one binds the same addresses.
            pub.close()
            await _until(lambda: sub.num_resets == 2, None)  # the disconnect alone says the cache is gone
            assert index.hashes == set()
            kv3 = KVCacheManager(num_blocks=12, block_size=2, record_events=True)
            pub = KVEventPublisher(*addrs, snapshot=kv3.snapshot_events)
            pub.publish([AllBlocksCleared()])
            Workload(pub, kv3, seed=5).step(4)
            await _until(_synced(sub, pub), pub)
            assert index.hashes == set(kv3.cached) and kv3.cached
            assert sub.num_resets == 2
        finally:
            await sub.close()
            pub.close()

    asyncio.run(main())


def test_malformed_messages_are_skipped(tmp_path: Path) -> None:
    async def main() -> None:
        pub, kv, work = _setup(str(tmp_path))
        index = Index()
        sub = KVEventSubscriber(*_addrs(str(tmp_path)), index.apply, index.reset)
        await sub.start()
        try:
            await _until(_synced(sub, pub), pub)
            await asyncio.sleep(0.1)
            raw = pub._pub
            raw.send_multipart([b"", b"short"])  # two frames
            raw.send_multipart([b"", b"\x00\x01", b"x"])  # a seq that is not 8 bytes
            raw.send_multipart([b"other", (99).to_bytes(8, "big"), b"x"])  # another topic (prefix match)
            # A batch that is not msgpack, under the next seq (kept for replays as it was sent).
            seq = pub.next_seq
            pub.next_seq += 1
            pub._buffer.append((seq, b"\xc1garbage"))
            raw.send_multipart([b"", seq.to_bytes(8, "big"), b"\xc1garbage"])
            work.step(6)
            await _until(_synced(sub, pub), pub)
            assert index.hashes == set(kv.cached)
            assert sub.num_malformed == 3 and sub.num_resets == 0
            assert sub._task is not None and not sub._task.done()
        finally:
            await sub.close()
            pub.close()

    asyncio.run(main())


def test_a_failing_callback_does_not_stop_the_reader(tmp_path: Path) -> None:
    async def main() -> None:
        pub, kv, work = _setup(str(tmp_path))
        index = Index()
        calls = []

        def flaky(events: list[KVEvent]) -> None:
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("consumer bug")
            index.apply(events)

        sub = KVEventSubscriber(*_addrs(str(tmp_path)), flaky, index.reset)
        await sub.start()
        try:
            work.step(8)
            await _until(_synced(sub, pub), pub)
            assert len(calls) >= 3 and sub._task is not None and not sub._task.done()
        finally:
            await sub.close()
            pub.close()

    asyncio.run(main())


# ---- a real engine core ---------------------------------------------------------------------


def test_engine_core_publishes_its_cache_and_a_restart_resets_it() -> None:
    async def main() -> None:
        config = EngineConfig(load_format="fake", num_kv_blocks=64, block_size=16, max_model_len=512)
        client = AsyncEngineClient(config, max_restart_backoff_s=1.0, stall_timeout_s=None)
        await client.start()
        index = Index()
        sub = KVEventSubscriber(*client.kv_event_addresses, index.apply, index.reset)
        try:
            assert all(a.startswith("ipc://") for a in client.kv_event_addresses)
            await sub.start()
            await _until(lambda: sub.last_seq == 0, None)  # the core's first batch: an empty cache

            async def run(rid: str, prompt: list[int], salt: str) -> None:
                async for _ in client.generate(rid, prompt, SamplingParams(max_tokens=4), cache_salt=salt):
                    pass

            prompt = [1000 + i for i in range(100)]
            await run("a", prompt, "tenant-a")
            want = set(prompt_block_hashes(prompt, 16, "tenant-a"))
            assert len(want) == 6
            await _until(lambda: index.hashes == want, None)

            os.kill(client.core_pid, signal.SIGKILL)  # type: ignore[arg-type]
            await _until(lambda: index.resets == 1, None)  # its cache died with it
            assert index.hashes == set()
            await _until(lambda: client.num_restarts == 1 and client.healthy and sub.last_seq == 0, None, 60)
            assert index.hashes == set() and index.resets == 1

            prompt2 = [2000 + i for i in range(40)]  # the new core's index, from its own events
            await run("b", prompt2, "tenant-b")
            await _until(lambda: index.hashes == set(prompt_block_hashes(prompt2, 16, "tenant-b")), None)
        finally:
            await sub.close()
            await client.shutdown()

    asyncio.run(main())
