"""KVEventSubscriber: one engine core's KV-cache events, in order and exactly once, in the API process.

It reads the core's PUB socket (`engine/kv_events.py`: vLLM's framing) and hands every
batch's events to `on_events` in seq order, so a router can keep an exact index of what
that core's prefix cache holds:

- start: the SUB socket connects first; once its handshake with the publisher is done
  (so batches from then on reach it), a replay from seq 0 (DEALER to the core's ROUTER)
  brings the index from nothing to now; batches that arrive on the SUB socket while a
  replay runs wait in a backlog and are applied after it (duplicates skipped).
- a gap (a batch lost on the PUB socket) asks for a replay from the last applied seq:
  that batch is replayed too and must match what was applied (a payload hash), or the
  publisher is a new one. A batch that begins with `AllBlocksCleared` (a snapshot, or a
  core's first batch) describes the whole cache, so it applies whatever came before it.
- a new publisher (a restarted core: its PUB socket disconnected, or a seq that goes
  backwards, or a replay that does not have the last seq applied) calls `on_reset`, then
  the index is rebuilt by a replay from 0 once the new core is there.
- a malformed message is logged and skipped; an exception in a callback is logged; the
  reader never dies of either. Nothing here blocks the event loop.
- a remote core's TCP sockets: `curve` (the cluster's client keys, `engine/curve.py`) on both.
"""
from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable

import msgspec
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from lockgate.engine.curve import CurveClient
from lockgate.engine.kv_events import END_SEQ, AllBlocksCleared, KVEvent, decode_batch

log = logging.getLogger("lockgate.engine.kv_events")

# The SUB socket's "publisher is there" event (the handshake: its subscription is on the way).
CONNECTED_EVENT = getattr(zmq, "EVENT_HANDSHAKE_SUCCEEDED", zmq.EVENT_CONNECTED)
REPLAY_TIMEOUT_S = 2.0  # no end marker by then: ask again on a fresh socket (the core may still be loading)
RECENT_BATCHES = 4096  # payload hashes kept to tell a duplicate from a new publisher's batch
BACKLOG_BATCHES = 100_000  # batches held while a replay runs (past it the oldest go; replayed again)


class _Result(enum.Enum):
    APPLIED = 1
    DUPLICATE = 2
    GAP = 3
    RESET = 4
    SKIPPED = 5  # malformed


class KVEventSubscriber:
    """One engine core's KV-cache events; see the module docstring."""

    def __init__(self, pub_addr: str, replay_addr: str, on_events: Callable[[list[KVEvent]], None],
                 on_reset: Callable[[], None], topic: str = "", *,
                 replay_timeout_s: float = REPLAY_TIMEOUT_S, curve: CurveClient | None = None) -> None:
        self.pub_addr = pub_addr
        self.replay_addr = replay_addr
        self.topic = topic
        self._topic = topic.encode()
        self._on_events = on_events
        self._on_reset = on_reset
        self.replay_timeout_s = replay_timeout_s
        self._curve = curve  # a remote core's TCP sockets (engine/curve.py); None: local IPC
        self.last_seq = -1  # the latest batch applied (-1: none from this publisher)
        self.num_gaps = 0
        self.num_resets = 0
        self.num_reconnects = 0
        self.num_replays = 0  # replay requests sent
        self.num_malformed = 0
        self._ctx = zmq.asyncio.Context()
        self._sub: zmq.asyncio.Socket | None = None
        self._monitor: zmq.asyncio.Socket | None = None
        self._replay: zmq.asyncio.Socket | None = None
        self._poller = zmq.asyncio.Poller()
        self._task: asyncio.Task[None] | None = None
        self._applied: OrderedDict[int, int] = OrderedDict()  # seq -> hash(payload), the recent ones
        self._backlog: deque[tuple[int, bytes]] = deque(maxlen=BACKLOG_BATCHES)
        self._want_replay: int | None = None  # a replay to send from this seq
        self._replay_pending = False
        self._replay_start = 0
        self._replay_verify = False  # the replay starts at last_seq: the publisher must still have it
        self._replay_frames = 0
        self._replay_void = False  # a reset during this replay: ignore the rest of it
        self._replay_deadline = 0.0
        self._awaiting_publisher = False  # no publisher on the SUB socket (yet, or any more): replays wait
        self._closed = False

    # ---- life cycle ------------------------------------------------------------------
    async def start(self) -> None:
        """Connect (SUB first) and start the reader; the replay from seq 0 goes out as soon as the
        SUB socket's handshake with the publisher is done (at once if the core is up)."""
        self._open()
        self._need_replay(0)
        await self._maybe_send_replay()
        self._task = asyncio.create_task(self._run(), name="kv-events-subscriber")

    async def reconnect(self) -> None:
        """Close and reopen both sockets, then catch up by a replay from the last seq applied."""
        self.num_reconnects += 1
        await self._stop_task()
        self._close_sockets()
        self._backlog.clear()
        self._replay_pending = False
        self._want_replay = None
        self._open()
        self._need_replay(max(self.last_seq, 0))
        await self._maybe_send_replay()
        self._task = asyncio.create_task(self._run(), name="kv-events-subscriber")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._stop_task()
        self._close_sockets()
        self._ctx.term()

    async def _stop_task(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _open(self) -> None:
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, BACKLOG_BATCHES)
        sub.setsockopt(zmq.SUBSCRIBE, self._topic)
        if self._curve is not None:
            self._curve.apply(sub)
        self._monitor = sub.get_monitor_socket(CONNECTED_EVENT | zmq.EVENT_DISCONNECTED)
        sub.connect(self.pub_addr)
        self._sub = sub
        self._awaiting_publisher = True  # replays wait for the SUB socket's handshake
        self._poller.register(sub, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._open_replay()

    def _open_replay(self) -> None:
        sock = self._ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVHWM, 0)  # a replay's length is bounded by the publisher's buffer
        if self._curve is not None:
            self._curve.apply(sock)
        sock.connect(self.replay_addr)
        self._replay = sock
        self._poller.register(sock, zmq.POLLIN)

    def _close_replay(self) -> None:
        if self._replay is not None:
            self._poller.unregister(self._replay)
            self._replay.close(linger=0)
            self._replay = None

    def _close_sockets(self) -> None:
        self._close_replay()
        if self._sub is not None:
            self._poller.unregister(self._sub)
            with contextlib.suppress(zmq.ZMQError):
                self._sub.disable_monitor()
            self._sub.close(linger=0)
            self._sub = None
        if self._monitor is not None:
            self._poller.unregister(self._monitor)
            self._monitor.close(linger=0)
            self._monitor = None

    # ---- the reader ------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            try:
                timeout = 1000
                if self._replay_pending:
                    timeout = max(0, int((self._replay_deadline - time.monotonic()) * 1000) + 1)
                ready = dict(await self._poller.poll(timeout))
                if self._monitor is not None and self._monitor in ready:
                    await self._drain_monitor()
                if self._sub is not None and self._sub in ready:
                    await self._drain_sub()
                if self._replay is not None and self._replay in ready:
                    await self._drain_replay()
                if self._replay_pending and time.monotonic() >= self._replay_deadline:
                    # Usual while a core loads its model (it answers once its loop runs).
                    log.debug("kv events: no answer to the replay from seq %d in %.1f s; asking again",
                             self._replay_start, self.replay_timeout_s)
                    self._replay_pending = False
                    self._close_replay()  # a late answer must not end the next replay
                    self._open_replay()
                    self._need_replay(self._replay_start)
                await self._maybe_send_replay()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - the reader must outlive anything one message does
                log.exception("kv events: reader error (continuing)")
                await asyncio.sleep(0.05)

    async def _drain_monitor(self) -> None:
        assert self._monitor is not None
        while True:
            try:
                frames = await self._monitor.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            event = parse_monitor_message(frames)["event"]
            if event == zmq.EVENT_DISCONNECTED:
                await self._publisher_gone()
            elif event == CONNECTED_EVENT and self._awaiting_publisher:
                log.debug("kv events: connected to %s; replaying from seq %d", self.pub_addr, max(self.last_seq, 0))
                self._awaiting_publisher = False
                self._need_replay(max(self.last_seq, 0))

    async def _publisher_gone(self) -> None:
        """The core's PUB socket went away (the core died or closed): its cache went with it."""
        await self._drain_sub()  # what it sent before it went still counts
        if self._replay is not None:
            await self._drain_replay()
        log.warning("kv events: publisher at %s disconnected; index reset", self.pub_addr)
        self._replay_pending = False
        self._close_replay()
        self._open_replay()
        self._want_replay = None
        if self.last_seq >= 0:
            self._reset()
        self._backlog.clear()
        self._awaiting_publisher = True

    async def _drain_sub(self, limit: int = 1000) -> None:
        assert self._sub is not None
        for _ in range(limit):
            try:
                frames = await self._sub.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 3 or len(frames[1]) != 8:
                self.num_malformed += 1
                log.warning("kv events: malformed PUB message (%d frames), skipped", len(frames))
                continue
            if frames[0] != self._topic:
                continue  # SUBSCRIBE matches a prefix; the topic must match exactly
            self._on_pub(int.from_bytes(frames[1], "big"), frames[2])

    async def _drain_replay(self) -> None:
        while self._replay is not None:
            try:
                frames = await self._replay.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            if not self._replay_pending:
                continue
            if len(frames) != 3 or len(frames[1]) != 8:
                self.num_malformed += 1
                log.warning("kv events: malformed replay message (%d frames), skipped", len(frames))
                continue
            seq = int.from_bytes(frames[1], "big", signed=True)
            if seq == END_SEQ:
                self._end_replay()
                continue
            self._replay_frames += 1
            if self._replay_void:
                continue
            result = self._handle(seq, frames[2])
            if result is _Result.RESET:
                self._replay_void = True
            elif result is _Result.GAP:
                # The publisher's buffer starts after what we have and it sent no snapshot
                # (not one of ours): nothing better to do than go on from here.
                log.warning("kv events: replay from seq %d starts at %d; the index may miss blocks",
                            self._replay_start, seq)
                self.num_gaps += 1
                self._apply(seq, frames[2])

    # ---- ordering ----------------------------------------------------------------------
    def _on_pub(self, seq: int, payload: bytes) -> None:
        if self._replay_pending or self._want_replay is not None or self._awaiting_publisher:
            self._backlog.append((seq, payload))
            return
        if self._handle(seq, payload) is _Result.GAP:
            self.num_gaps += 1
            self._backlog.append((seq, payload))
            self._need_replay(max(self.last_seq, 0))

    def _end_replay(self) -> None:
        self._replay_pending = False
        if self._replay_verify and self._replay_frames == 0 and not self._replay_void:
            # We asked from our last seq and the publisher never sent it: a new publisher.
            log.warning("kv events: the publisher has no seq %d; a new publisher", self._replay_start)
            self._reset()
            self._need_replay(0)
        while self._backlog and self._want_replay is None:
            seq, payload = self._backlog.popleft()
            if self._handle(seq, payload) is _Result.GAP:
                self.num_gaps += 1
                self._backlog.appendleft((seq, payload))
                self._need_replay(max(self.last_seq, 0))

    def _handle(self, seq: int, payload: bytes) -> _Result:
        """Apply one batch if it is the next one (or a whole-cache one); say what happened."""
        digest = hash(payload)
        if seq <= self.last_seq:
            if self._applied.get(seq) == digest:
                return _Result.DUPLICATE
            log.warning("kv events: seq %d after %d from %s: a new publisher", seq, self.last_seq, self.pub_addr)
            self._reset()
            self._need_replay(0)
            return _Result.RESET
        try:
            batch = decode_batch(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            if seq != self.last_seq + 1:
                return _Result.GAP  # get the ones before it first
            self.num_malformed += 1
            log.warning("kv events: malformed batch seq %d skipped: %s", seq, exc)
            self._advance(seq, digest)
            return _Result.SKIPPED
        events = batch.events
        if seq != self.last_seq + 1 and not (events and isinstance(events[0], AllBlocksCleared)):
            return _Result.GAP
        self._advance(seq, digest)
        self._deliver(events)
        return _Result.APPLIED

    def _apply(self, seq: int, payload: bytes) -> None:
        """Apply a batch regardless of order (a foreign publisher's replay that cannot go back)."""
        try:
            batch = decode_batch(payload)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self.num_malformed += 1
            log.warning("kv events: malformed batch seq %d skipped: %s", seq, exc)
            batch = None
        self._advance(seq, hash(payload))
        if batch is not None:
            self._deliver(batch.events)

    def _advance(self, seq: int, digest: int) -> None:
        self.last_seq = seq
        self._applied[seq] = digest
        while len(self._applied) > RECENT_BATCHES:
            self._applied.popitem(last=False)

    def _deliver(self, events: list[KVEvent]) -> None:
        if not events:
            return
        try:
            self._on_events(events)
        except Exception:  # noqa: BLE001 - the consumer's bug must not stop the stream
            log.exception("kv events: on_events failed")

    def _reset(self) -> None:
        self.num_resets += 1
        self.last_seq = -1
        self._applied.clear()
        self._backlog.clear()
        try:
            self._on_reset()
        except Exception:  # noqa: BLE001
            log.exception("kv events: on_reset failed")

    def _need_replay(self, start: int) -> None:
        self._want_replay = start if self._want_replay is None else min(self._want_replay, start)

    async def _maybe_send_replay(self) -> None:
        if self._replay_pending or self._want_replay is None or self._awaiting_publisher or self._replay is None:
            return
        start, self._want_replay = self._want_replay, None
        self._replay_pending = True
        self._replay_start = start
        self._replay_verify = start == self.last_seq and start >= 0
        self._replay_frames = 0
        self._replay_void = False
        self._replay_deadline = time.monotonic() + self.replay_timeout_s
        self.num_replays += 1
        try:
            await self._replay.send_multipart((b"", start.to_bytes(8, "big")), flags=zmq.NOBLOCK)
        except zmq.Again:  # no peer yet: the deadline asks again
            log.debug("kv events: replay request not sent (no peer yet)")
