"""Stall watchdog: notices an engine core that is alive but no longer making progress.

The supervisor (`supervisor.py`) notices a core that died; this notices one that
hangs (a wedged kernel, a deadlock, a step that never returns). The core sends
a message at least every `core/proc.BUSY_HEARTBEAT_S` while it works and every
`core/proc.IDLE_POLL_MS` while idle, but only between steps, so a silence longer
than the stall timeout while requests are in flight means a step is stuck.

The check is a few attribute reads every `interval_s`; it never blocks the
event loop. Before declaring a stall it also asks whether messages are waiting
unread on the socket: a starved event loop is not a stuck engine.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

log = logging.getLogger("lockgate.engine.frontend.watchdog")
GRACE_S = 0.2


class StallWatchdog:
    """Calls `on_stall(seconds)` once work has been pending with no progress for `timeout_s`.

    `is_active()`: a core is up and serving (not starting, restarting or closing).
    `has_pending()`: requests are in flight. The owner calls `progress()` on every message
    from the core and after a (re)start.

    A busy event loop (not a stuck core) can leave core messages unread for a while: before
    declaring a stall, `run` yields to the loop for `GRACE_S` and checks again, so a reader
    that was merely behind catches up first. (Asking the ZeroMQ socket whether data waits is
    not an option: reading ZMQ_EVENTS consumes the edge-triggered wake-up of pyzmq's asyncio
    socket, and its pending recv() would then never return.)
    """

    def __init__(
        self,
        timeout_s: float | None,
        *,
        is_active: Callable[[], bool],
        has_pending: Callable[[], bool],
        on_stall: Callable[[float], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.timeout_s = timeout_s if timeout_s and timeout_s > 0 else None
        self.is_active = is_active
        self.has_pending = has_pending
        self.on_stall = on_stall
        self.clock = clock
        self.last_progress = clock()

    @property
    def enabled(self) -> bool:
        return self.timeout_s is not None

    @property
    def interval_s(self) -> float:
        """How often `run` checks: a fraction of the timeout, so detection lags by little."""
        assert self.timeout_s is not None
        return min(1.0, max(0.05, self.timeout_s / 4))

    def progress(self) -> None:
        self.last_progress = self.clock()

    def check(self) -> float | None:
        """Seconds without progress if the engine counts as stuck now, else None.

        Time with no work pending (or with no core up) never counts: the clock
        restarts when work appears, so an idle engine is never declared stuck.
        """
        if self.timeout_s is None:
            return None
        now = self.clock()
        if not self.is_active() or not self.has_pending():
            self.last_progress = now
            return None
        stalled = now - self.last_progress
        return stalled if stalled > self.timeout_s else None

    async def run(self) -> None:
        """Check every `interval_s` until cancelled; report a stall once, then wait for progress."""
        if self.timeout_s is None:
            return
        while True:
            await asyncio.sleep(self.interval_s)
            if self.check() is None:
                continue
            await asyncio.sleep(GRACE_S)  # let a reader that was merely behind catch up
            stalled = self.check()
            if stalled is None:
                continue
            try:
                self.on_stall(stalled)
            except Exception:  # noqa: BLE001 - the watchdog must outlive a bad handler
                log.exception("stall handler failed")
            self.progress()  # one report per stall; the restart resets the clock again
