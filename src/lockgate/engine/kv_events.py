"""KV-cache events in vLLM's schema, and their publisher in the engine-core process.

Each engine core tells whoever listens what its prefix cache holds as it changes,
so a router can keep an exact index of every replica's cached blocks. The shapes
and the wire are vLLM's (`vllm/distributed/kv_events.py`), so tools written for it
read ours:

- msgpack of msgspec structs, `array_like=True` and `omit_defaults=True`; events are
  tagged unions (the class name is the first element of each event's array);
  a batch is `[ts, [event, ...], data_parallel_rank]`.
- PUB socket, one multipart message per batch: `(topic, seq as 8 bytes big-endian, payload)`,
  seq 0, 1, 2, ... per publisher.
- Replay on a ROUTER socket: a client sends `(b"", start seq as 8 bytes big-endian)`
  (a DEALER, or a REQ whose envelope adds the empty frame) and gets `(b"", seq, payload)`
  for every buffered batch with seq >= start, then the end marker `(b"", -1, b"")`.

Ours, within that schema: block hashes are the 16-byte chained hashes of `prefix_hash.py`
(vLLM allows bytes or ints); a chain's first block has parent None (its salted root is
never published); `medium` is "GPU", vLLM's name for the engine's own KV cache, whatever
the device. A replay request older than the buffer first gets one snapshot batch,
`AllBlocksCleared` then the whole cache as `BlockStored` events (parents first), tagged
with the latest seq, so a subscriber can always rebuild the exact index; a core that has
published nothing yet and is asked for a later seq publishes its snapshot as seq 0 first.
The engine core publishes `[AllBlocksCleared]` as its first batch, so seq 0 always says
"this cache starts empty".

A core on a network (`serve --ray`) binds them on TCP as CURVE servers (`engine/curve.py`): only
the API process that started it can subscribe or replay.

Importable without torch (the API process's subscriber uses the structs).
"""
from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Union

import msgspec
import zmq

from lockgate.engine.curve import CurveGuard

log = logging.getLogger("lockgate.engine.kv_events")

MEDIUM_GPU = "GPU"  # vLLM's medium for the engine's own (primary) KV cache
END_SEQ = -1  # the replay's end marker
END_SEQ_BYTES = END_SEQ.to_bytes(8, "big", signed=True)

ExternalBlockHash = Union[bytes, int]  # vLLM's: ours are always 16-byte `bytes`


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):  # type: ignore[call-arg]
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):  # type: ignore[call-arg]
    """Base of every KV-cache event (the tag is the class name)."""


class BlockStored(KVCacheEvent):
    """Consecutive blocks of one chain became cached: `block_hashes[i]`'s parent is
    `block_hashes[i - 1]`, the first one's is `parent_block_hash` (None: a chain's first block);
    `token_ids` are the blocks' tokens, `block_size` per block."""

    block_hashes: list[ExternalBlockHash]
    parent_block_hash: ExternalBlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None


class BlockRemoved(KVCacheEvent):
    """These blocks left the cache (evicted or dropped)."""

    block_hashes: list[ExternalBlockHash]
    medium: str | None
    group_idx: int | None = None


class AllBlocksCleared(KVCacheEvent):
    """The cache holds nothing any more (what follows in the batch, if anything, is all it holds)."""


KVEvent = Union[BlockStored, BlockRemoved, AllBlocksCleared]


class KVEventBatch(EventBatch):
    events: list[KVEvent]


def block_stored(block_hashes: list[bytes], parent: bytes | None, token_ids: list[int],
                 block_size: int) -> BlockStored:
    """A BlockStored for the engine's own cache (no LoRA, medium GPU)."""
    return BlockStored(block_hashes=block_hashes, parent_block_hash=parent, token_ids=token_ids,
                       block_size=block_size, lora_id=None, medium=MEDIUM_GPU, lora_name=None)


def block_removed(block_hashes: list[bytes]) -> BlockRemoved:
    return BlockRemoved(block_hashes=block_hashes, medium=MEDIUM_GPU)


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(KVEventBatch)


def encode_batch(batch: KVEventBatch) -> bytes:
    return _encoder.encode(batch)


def decode_batch(payload: bytes | memoryview) -> KVEventBatch:
    """A batch from its msgpack bytes; `msgspec.DecodeError` (a ValueError) if malformed."""
    return _decoder.decode(payload)


def seq_bytes(seq: int) -> bytes:
    return seq.to_bytes(8, "big", signed=True)


class KVEventPublisher:
    """The core process's end: PUB bound at `pub_addr`, ROUTER for replays bound at `replay_addr`.

    Synchronous and single-threaded (the core loop calls `publish` after a step and
    `serve_replay` when `replay_socket` is readable); sending never blocks. The last
    `buffer_batches` (seq, payload) pairs are kept for replays; `snapshot()` (the KV cache's
    `snapshot_events`) answers a replay older than that. `ctx`: share the caller's ZeroMQ
    context (the caller terminates it), else one of its own. `guard`: the core's CURVE guard
    (`engine/curve.py`, TCP addresses: both sockets are CURVE servers), in `ctx`.
    """

    def __init__(self, pub_addr: str, replay_addr: str | None, *, topic: str = "",
                 buffer_batches: int = 10_000, snapshot: Callable[[], list[KVEvent]] | None = None,
                 data_parallel_rank: int | None = 0, hwm: int = 100_000,
                 ctx: zmq.Context | None = None, guard: CurveGuard | None = None) -> None:
        if buffer_batches < 1:
            raise ValueError(f"buffer_batches must be >= 1, got {buffer_batches}")
        self.topic = topic
        self._topic = topic.encode()
        self._snapshot = snapshot
        self._dp_rank = data_parallel_rank
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_batches)
        self.next_seq = 0
        self.num_replays = 0
        self.num_snapshots = 0
        self._own_ctx = ctx is None
        self._ctx = zmq.Context() if ctx is None else ctx
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.SNDHWM, hwm)  # past it a slow subscriber loses batches: it replays them
        self._pub.setsockopt(zmq.LINGER, 0)
        self._replay: zmq.Socket | None = None
        self._closed = False
        try:
            if guard is not None:
                guard.protect(self._pub, "kv-events")
            self._pub.bind(pub_addr)  # an ipc file a killed core left behind is replaced by libzmq
            if replay_addr is not None:
                self._replay = self._ctx.socket(zmq.ROUTER)
                self._replay.setsockopt(zmq.SNDHWM, 0)  # a replay is bounded by the buffer: send all of it
                self._replay.setsockopt(zmq.LINGER, 0)
                if guard is not None:
                    guard.protect(self._replay, "kv-replay")
                self._replay.bind(replay_addr)
        except zmq.ZMQError:
            self.close()
            raise

    @property
    def endpoints(self) -> tuple[str, str | None]:
        """Where the sockets are bound (a TCP address bound to port `*` gets its real port here)."""
        replay = self._replay.last_endpoint.decode() if self._replay is not None else None
        return self._pub.last_endpoint.decode(), replay

    @property
    def replay_socket(self) -> zmq.Socket | None:
        """The ROUTER socket, for a poller (None without a replay address)."""
        return self._replay

    def publish(self, events: Sequence[KVEvent], ts: float | None = None) -> int:
        """Send one batch with the next seq; returns that seq."""
        batch = KVEventBatch(ts=time.time() if ts is None else ts, events=list(events),
                             data_parallel_rank=self._dp_rank)
        payload = encode_batch(batch)
        seq = self.next_seq
        self.next_seq += 1
        self._buffer.append((seq, payload))
        self._send_pub((self._topic, seq.to_bytes(8, "big"), payload))
        return seq

    def _send_pub(self, frames: tuple[bytes, bytes, bytes]) -> None:
        try:
            self._pub.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:  # PUB drops rather than blocks; kept in the buffer for replays
            log.warning("kv events: PUB socket full, batch dropped (subscribers will replay it)")

    def serve_replay(self) -> int:
        """Answer every pending replay request without blocking; returns how many."""
        sock = self._replay
        if sock is None:
            return 0
        served = 0
        while True:
            try:
                frames = sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return served
            served += 1
            if len(frames) != 3 or len(frames[2]) != 8:
                log.warning("kv events: invalid replay request (%d frames), ignored", len(frames))
                continue
            client, start = frames[0], int.from_bytes(frames[2], "big", signed=True)
            try:
                self._answer(client, start)
            except zmq.ZMQError as exc:  # the client went away mid-answer: nothing to do
                log.warning("kv events: replay answer failed: %s", exc)

    def _answer(self, client: bytes, start: int) -> None:
        sock = self._replay
        assert sock is not None
        self.num_replays += 1
        start = max(start, 0)
        if self._snapshot is not None and start > 0 and self.next_seq == 0:
            # Asked for a later seq than this (new) publisher ever sent: its state as seq 0.
            self.publish([AllBlocksCleared(), *self._snapshot()])
            self.num_snapshots += 1
        oldest = self._buffer[0][0] if self._buffer else self.next_seq
        if start < oldest and self._snapshot is not None:
            # Older than the buffer: the whole cache now, which is the state after the latest seq.
            self.num_snapshots += 1
            payload = encode_batch(KVEventBatch(ts=time.time(), events=[AllBlocksCleared(), *self._snapshot()],
                                                data_parallel_rank=self._dp_rank))
            sock.send_multipart((client, b"", seq_bytes(self.next_seq - 1), payload), flags=zmq.NOBLOCK)
        else:
            for seq, payload in self._buffer:
                if seq >= start:
                    sock.send_multipart((client, b"", seq_bytes(seq), payload), flags=zmq.NOBLOCK)
        sock.send_multipart((client, b"", END_SEQ_BYTES, b""), flags=zmq.NOBLOCK)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for sock in (self._pub, self._replay):
            if sock is not None:
                sock.close(linger=0)
        self._replay = None
        if self._own_ctx:
            self._ctx.term()
