"""`DrainingServer`: uvicorn's server with lockgate's SIGTERM.

SIGTERM drains (new requests 503 at once, in-flight ones finish up to the drain timeout, then
the server stops and exits with status 0); SIGINT (Ctrl-C) stops the way uvicorn does, and a
second Ctrl-C forces the exit. One API worker of several (`--api-workers N`) runs one too, on
the listening socket its parent shares, and says when it serves (`on_started`).
"""
from __future__ import annotations

import asyncio
import signal
import socket
from collections.abc import Callable
from types import FrameType

import uvicorn

from lockgate.server.app import drain
from lockgate.server.state import AppState


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: AppState, drain_timeout_s: float,
                 on_started: Callable[[], None] | None = None) -> None:
        super().__init__(config)
        self.state = state
        self.drain_timeout_s = drain_timeout_s
        self.on_started = on_started
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.on_started is not None:
            self.on_started()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self.started and self._loop is not None and self._drain_task is None:
            # Not recorded in _captured_signals: uvicorn would re-raise it at exit and
            # turn a clean drain into death by SIGTERM.
            self._loop.call_soon_threadsafe(self._begin_drain)
            return
        if sig == signal.SIGTERM and self._drain_task is not None:
            return  # already draining; SIGINT still forces the way out
        super().handle_exit(sig, frame)

    def _begin_drain(self) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        await drain(self.state, self.drain_timeout_s)
        self.should_exit = True
