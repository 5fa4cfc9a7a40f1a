"""`DeadlinePool`: run a call that cannot be interrupted, waiting for it at most a deadline.

llguidance's grammar checks run in Rust and cannot be cancelled. The frontend's check runs
on a few daemon threads of its own; a caller that waits past its deadline gets TimeoutError
and goes on (a call not yet started is dropped; one running finishes on its thread, its
result discarded). The threads are bounded, so a flood of pathological grammars can only
delay other checks until their own deadlines, never hang a caller or grow threads.
"""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, TypeVar

T = TypeVar("T")


class DeadlinePool:
    def __init__(self, num_threads: int, name: str) -> None:
        if num_threads < 1:
            raise ValueError("a deadline pool needs at least one thread")
        self.num_threads = num_threads
        self.name = name
        self._calls: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._started = False

    def call(self, fn: Callable[[], T], timeout_s: float) -> T:
        """`fn()`'s result or exception; TimeoutError when it has not finished within `timeout_s`."""
        self._start()
        fut: Future[T] = Future()
        self._calls.put((fut, fn))
        try:
            return fut.result(timeout_s)
        except FutureTimeout:
            fut.cancel()  # dropped if no thread took it yet
            raise TimeoutError(f"over the {timeout_s:g} s limit") from None

    def _start(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
            for i in range(self.num_threads):
                threading.Thread(target=self._run, name=f"{self.name}-{i}", daemon=True).start()

    def _run(self) -> None:
        while True:
            fut, fn = self._calls.get()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                fut.set_exception(exc)
