"""One API worker of several (`lockgate serve --api-workers N`): its role, its app, its server.

The parent (workers.py) forks each worker with the server's listening socket. A worker builds
the app exactly as a single server does, then takes its role before anything starts:

- worker 0, the primary, starts and supervises every engine core and runs the autoscalers
  (one owner for each); its fleets share their cores (the other workers attach to them, a core
  stops only once they have left) and it publishes them (topology.py);
- every other worker attaches to the primary's cores and follows them (a restarted core, a
  restarted primary, replicas the autoscaler adds or drains); it starts nothing.

Every worker's metrics go to the server's merged page (observability/worker_metrics.py), and
every response says which worker answered (`x-lockgate-worker`). Then the worker serves on the
shared socket (the kernel hands each new connection to one of the workers waiting on it) until
its parent forwards SIGTERM (drain) or SIGINT.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI

from lockgate.observability.worker_metrics import SNAPSHOT_S, WorkerMetrics, use_multiprocess
from lockgate.server.draining import DrainingServer
from lockgate.server.state import AppState
from lockgate.server.topology import TopologyFollower, TopologyPublisher

log = logging.getLogger("lockgate.server")

WORKER_HEADER = b"x-lockgate-worker"
# The primary stops a shared core only after the other workers have detached: they drain for
# up to the drain timeout too; this much more before it stops the core anyway.
DETACH_GRACE_S = 10.0
STARTUP_FAILURE = 3  # uvicorn's exit status when the application cannot start

Task = Callable[[], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class WorkerContext:
    index: int  # 0: the primary
    count: int
    run_dir: Path  # the server's private directory (topology, metrics), the parent's to remove
    sock: socket.socket  # the listening socket, shared by every worker
    ready_fd: int  # the parent's pipe: this worker's index, once it serves

    @property
    def primary(self) -> bool:
        return self.index == 0

    def notify_ready(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self.ready_fd, bytes([self.index]))


class WorkerApp:
    """The app under the worker's own thin ASGI layer: the `x-lockgate-worker` header on every
    response, and the worker's background tasks running for the app's life (its lifespan)."""

    def __init__(self, app: FastAPI, index: int, tasks: list[Task]) -> None:
        self.app = app
        self.tasks = tasks
        self._header = (WORKER_HEADER, str(index).encode())

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            # Before the models start (an attached fleet comes up through the follower), until the app
            # has shut down: stopped before uvicorn hears so, or its loop would cancel them mid-way.
            running = [asyncio.ensure_future(t()) for t in self.tasks]

            async def stop() -> None:
                for t in running:
                    t.cancel()
                await asyncio.gather(*running, return_exceptions=True)

            async def send_after_tasks(message: dict[str, Any]) -> None:
                if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed",
                                       "lifespan.startup.failed"):
                    await stop()
                await send(message)

            try:
                await self.app(scope, receive, send_after_tasks)
            finally:
                await stop()
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = self._header

        async def send_with_worker(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        await self.app(scope, receive, send_with_worker)


def take_role(app: FastAPI, ctx: WorkerContext, drain_timeout_s: float) -> WorkerApp:
    """The built app as this worker's: primary or attached, metrics merged, the header."""
    state: AppState = app.state.lockgate
    registry = state.models
    merged = WorkerMetrics(ctx.run_dir, ctx.index)
    state.metrics.workers = merged
    metrics = state.metrics

    async def snapshots() -> None:
        while True:
            try:
                merged.write_snapshot(metrics.scrape_time_families())
            except Exception:  # noqa: BLE001 - metrics must never take the worker down
                log.exception("cannot write this worker's metrics snapshot")
            await asyncio.sleep(SNAPSHOT_S)

    tasks: list[Task] = [snapshots]
    if ctx.primary:
        for fleet in registry.fleets():
            fleet.share_wait_s = drain_timeout_s + DETACH_GRACE_S
        tasks.append(TopologyPublisher(registry, ctx.run_dir).run)
    else:
        follower = TopologyFollower(registry, ctx.run_dir, ctx.index)
        follower.prepare()
        tasks.append(follower.run)
    return WorkerApp(app, ctx.index, tasks)


def run_worker(ctx: WorkerContext, build: Callable[[], FastAPI],
               make_config: Callable[[WorkerApp], uvicorn.Config], drain_timeout_s: float) -> int:
    """Build and serve this worker's app on the shared socket; its exit status."""
    for handler in logging.getLogger().handlers:  # say which worker each line comes from
        handler.setFormatter(logging.Formatter(
            f"%(asctime)s %(levelname)s [worker {ctx.index}] %(name)s: %(message)s"))
    use_multiprocess(ctx.run_dir)  # before build() makes the metrics
    app = build()
    asgi = take_role(app, ctx, drain_timeout_s)
    server = DrainingServer(make_config(asgi), app.state.lockgate, drain_timeout_s, on_started=ctx.notify_ready)
    try:
        server.run(sockets=[ctx.sock])
    except KeyboardInterrupt:
        pass
    return 0 if server.started else STARTUP_FAILURE
