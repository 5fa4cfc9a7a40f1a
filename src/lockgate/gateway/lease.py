"""`Lease`: everything one HTTP request holds, from admission to its last byte.

Each resource a request takes (its engine streams and their queue slots, its
metrics record; later its concurrency slot and budget reservation) is put on
the request's lease the moment it is taken. The guard middleware releases the
lease when the ASGI call ends, however it ends: a normal answer, a 4xx raised
half-way, a bug, a client that vanished mid-stream. That single `finally` is
what guarantees nothing leaks; routes never release by hand.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("lockgate.gateway")

# Named steps of the admission path where a test may inject a failure (see `checkpoint`).
FAULT_POINTS = ("admit", "track", "submit", "respond", "stream")


class InjectedFault(RuntimeError):
    """Raised at a checkpoint named by the test-only `x-lockgate-fault` header."""


class Lease:
    __slots__ = ("_releases", "released", "fault", "outcome", "accounted", "status", "code", "record")

    def __init__(self, fault: str | None = None) -> None:
        self._releases: list[Callable[[str], None]] = []
        self.released = False
        self.fault = fault  # only set when the server runs with fault injection enabled
        self.outcome = "aborted"  # why unfinished holdings are released; set by whoever ends the request
        self.accounted = False  # True once a metrics record holds the request's success/failure
        self.status = 0  # the HTTP status sent (set by the guard middleware)
        self.code: str | None = None  # the error code sent, if an error was (set by the error handlers)
        self.record: Any = None  # an inference request's observability record (observability/record.py)

    def hold(self, release: Callable[[str], None]) -> None:
        """Register how to give back something just taken; called with the outcome on release."""
        if self.released:  # taken after the request ended: give it back at once
            _run(release, self.outcome)
            return
        self._releases.append(release)

    def checkpoint(self, point: str) -> None:
        if self.fault == point:
            raise InjectedFault(f"injected fault at {point!r}")

    def release(self, outcome: str | None = None) -> None:
        """Give back everything, newest first; idempotent. A failing release never stops the others."""
        if self.released:
            return
        self.released = True
        if outcome is not None:
            self.outcome = outcome
        while self._releases:
            _run(self._releases.pop(), self.outcome)


def _run(release: Callable[[str], None], outcome: str) -> None:
    try:
        release(outcome)
    except Exception:  # noqa: BLE001 - one broken release must not leak the rest
        log.exception("releasing a request's resources failed")
