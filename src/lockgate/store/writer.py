"""`AsyncStore`: the store for the asyncio server; the event loop never waits on disk.

Every call runs on one dedicated writer thread, first in first out. The hot
writes (`add_reservations`, `checkpoint_reservations`, `settle`) are group
committed: those queued back to back (while the previous transaction commits,
or within `window_s` after the first) are merged into one transaction, so a
burst of N requests costs a few commits instead of N. Each caller awaits its
own future, resolved on its loop with `call_soon_threadsafe`.

A caller that stops waiting (its task cancelled: the client went away) does not
cancel the write: whatever was queued is written. If a merged batch fails, its
calls are retried one by one so only the faulty call sees the error.

WAL checkpoints run every `checkpoint_interval_s`, the bulk on a thread of
their own (autocheckpoint is off for the writer's connection): otherwise every
~1000 pages one commit pays a whole checkpoint, a p99 spike of tens of ms.

The CLI and tests use the plain synchronous `Store` directly.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from lockgate.store.base import Store
from lockgate.store.models import Reservation, UsageRecord

log = logging.getLogger(__name__)

_BATCHED = ("add_reservations", "checkpoint_reservations", "settle")


@dataclass(slots=True)
class _Item:
    kind: str  # "call" or one of _BATCHED
    fut: asyncio.Future | None
    loop: asyncio.AbstractEventLoop | None
    fn: Callable[..., Any] | None = None
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    payload: list = field(default_factory=list)


class StoreClosed(RuntimeError):
    pass


def _resolve(fut: asyncio.Future, result: Any, exc: BaseException | None) -> None:
    if fut.done():  # the caller was cancelled; the write happened anyway
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


class AsyncStore:
    def __init__(self, store: Store, *, window_s: float = 0.0, max_batch: int = 1024,
                 checkpoint_interval_s: float | None = 1.0, wal_restart_pages: int = 4096,
                 hot_threads: int = 0) -> None:
        self.store = store
        # `hot` calls (per-request limit and budget statements of a shared store) on threads of their
        # own, concurrently, when the store takes several connections (PostgreSQL); else the writer's.
        self._hot = ThreadPoolExecutor(hot_threads, thread_name_prefix="lockgate-store-hot") if hot_threads else None
        self.wal_restart_pages = int(wal_restart_pages)
        self.window_s = float(window_s)
        self.max_batch = int(max_batch)
        self._queue: deque[_Item] = deque()
        self._cond = threading.Condition()
        self._closing = False
        # What group commit achieved: calls to the batched methods, and transactions they took.
        self.batched_calls = 0
        self.transactions = 0
        # WAL checkpoints off the writer thread: a commit never waits for the checkpoint's fsync.
        self._stop_checkpoints = threading.Event()
        self._checkpointer: threading.Thread | None = None
        self.checkpoints = 0
        if checkpoint_interval_s and hasattr(store, "checkpoint") and hasattr(store, "disable_autocheckpoint"):
            self._checkpointer = threading.Thread(target=self._checkpoint_loop, args=(float(checkpoint_interval_s),),
                                                  name="lockgate-store-checkpoint", daemon=True)
        self._thread = threading.Thread(target=self._run, name="lockgate-store-writer", daemon=True)
        self._thread.start()
        if self._checkpointer is not None:
            self._checkpointer.start()

    # ------------------------------------------------------------------ the async API
    # Plain functions returning an awaitable future: the work is queued at the call, not at the
    # first await, so `a = astore.settle(x); b = astore.call(f)` runs x before f.
    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> asyncio.Future:
        """Run `fn(*args, **kwargs)` (any store method, or anything touching the store) on the writer thread."""
        return self._submit(_Item("call", None, None, fn=fn, args=args, kwargs=kwargs))

    def hot(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        """Run `fn(*args)` now: on the hot pool when there is one (not queued behind group commits)."""
        if self._hot is None:
            return self.call(fn, *args)
        return asyncio.get_running_loop().run_in_executor(self._hot, functools.partial(fn, *args))

    def add_reservations(self, reservations: list[Reservation]) -> asyncio.Future:
        return self._submit(_Item("add_reservations", None, None, payload=list(reservations)))

    def checkpoint_reservations(self, updates: list[tuple[str, int, int]]) -> asyncio.Future:
        return self._submit(_Item("checkpoint_reservations", None, None, payload=list(updates)))

    def settle(self, records: list[UsageRecord]) -> asyncio.Future:
        return self._submit(_Item("settle", None, None, payload=list(records)))

    def submit_nowait(self, kind: str, payload: list) -> None:
        """Queue a batched write without waiting for it (fire and forget; errors are logged)."""
        if kind not in _BATCHED:
            raise ValueError(kind)
        self._enqueue(_Item(kind, None, None, payload=list(payload)))

    def _submit(self, item: _Item) -> asyncio.Future:
        loop = asyncio.get_running_loop()  # must be called from the event loop
        item.loop, item.fut = loop, loop.create_future()
        self._enqueue(item)
        return item.fut

    def _enqueue(self, item: _Item) -> None:
        with self._cond:
            if self._closing:
                raise StoreClosed("the store is closed")
            self._queue.append(item)
            self._cond.notify()

    @property
    def pending(self) -> int:
        return len(self._queue)

    def close(self, timeout: float | None = None) -> None:
        """Write everything queued, then stop the writer thread (blocking). Does not close the store."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        self._stop_checkpoints.set()
        if self._hot is not None:
            self._hot.shutdown(wait=True)
        if self._checkpointer is not None and threading.current_thread() is not self._checkpointer:
            self._checkpointer.join(timeout)

    async def aclose(self) -> None:
        """`close()` without blocking the event loop."""
        await asyncio.to_thread(self.close)

    # ------------------------------------------------------------------ the threads
    def _checkpoint_loop(self, interval: float) -> None:
        """Copy the WAL into the database here (the bulk, without blocking the writer), then let the writer
        thread copy the few frames appended meanwhile once the WAL is long: with every frame copied, its
        next commit starts the WAL over from the beginning (under steady load a checkpoint from here alone
        never catches up and the WAL would grow without bound). That last step costs the writer one fsync
        every `wal_restart_pages` pages, instead of a whole checkpoint every 1000."""
        store: Any = self.store
        while not self._stop_checkpoints.wait(interval):
            try:
                _, wal_pages, _ = store.checkpoint("PASSIVE")
                self.checkpoints += 1
                if wal_pages >= self.wal_restart_pages:  # frames keep coming: finish on the writer
                    self._enqueue(_Item("call", None, None, fn=store.checkpoint, args=("PASSIVE",)))
            except StoreClosed:
                return
            except Exception as e:  # noqa: BLE001 - the next one may succeed; commits still work
                log.warning("WAL checkpoint failed: %r", e)

    def _run(self) -> None:
        if self._checkpointer is not None:
            try:
                self.store.disable_autocheckpoint()  # type: ignore[attr-defined]
            except Exception as e:  # noqa: BLE001 - then commits checkpoint themselves, as by default
                log.warning("cannot turn off autocheckpoint: %r", e)
        while True:
            with self._cond:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:  # closing and drained
                    return
                first = self._queue.popleft()
            if first.kind == "call":
                self._run_call(first)
                continue
            batch = [first]
            deadline = time.monotonic() + self.window_s
            while len(batch) < self.max_batch:
                with self._cond:
                    if self._queue and self._queue[0].kind != "call":
                        batch.append(self._queue.popleft())
                        continue
                    if self._queue or self._closing:  # a plain call next (keep FIFO), or flushing
                        break
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
            self._run_batch(batch)

    def _run_call(self, item: _Item) -> None:
        try:
            assert item.fn is not None
            result, exc = item.fn(*item.args, **item.kwargs), None
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            result, exc = None, e
        self._deliver(item, result, exc)

    def _write(self, items: list[_Item]) -> None:
        adds = [r for it in items if it.kind == "add_reservations" for r in it.payload]
        cps = [u for it in items if it.kind == "checkpoint_reservations" for u in it.payload]
        settles = [r for it in items if it.kind == "settle" for r in it.payload]
        write_batch = getattr(self.store, "write_batch", None)
        if write_batch is not None:
            write_batch(adds, cps, settles)
            self.transactions += 1
            return
        for name, payload in (("add_reservations", adds), ("checkpoint_reservations", cps), ("settle", settles)):
            if payload:
                getattr(self.store, name)(payload)
                self.transactions += 1

    def _run_batch(self, batch: list[_Item]) -> None:
        self.batched_calls += len(batch)
        try:
            self._write(batch)
        except BaseException as e:  # noqa: BLE001
            if len(batch) == 1:
                self._deliver(batch[0], None, e)
                return
            for item in batch:  # isolate the faulty call
                try:
                    self._write([item])
                    self._deliver(item, None, None)
                except BaseException as e1:  # noqa: BLE001
                    self._deliver(item, None, e1)
            return
        for item in batch:
            self._deliver(item, None, None)

    @staticmethod
    def _deliver(item: _Item, result: Any, exc: BaseException | None) -> None:
        if item.fut is None or item.loop is None:
            if exc is not None:
                log.error("store write %s failed: %r", item.kind, exc)
            return
        try:
            item.loop.call_soon_threadsafe(_resolve, item.fut, result, exc)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            if exc is not None:
                log.error("store %s failed after its loop closed: %r", item.kind, exc)
