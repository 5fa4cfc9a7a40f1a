"""Run one load phase: open loop (requests sent at planned times) or closed loop (N clients back to back).

Open loop sends each request at its planned time whether or not earlier ones
have finished (that is what exposes queueing); `max_concurrency` optionally caps
the requests in flight. A phase ends when every request it sent has finished.
"""
from __future__ import annotations

import asyncio
import itertools
import sys
import time
from dataclasses import dataclass

import httpx

from lockgate.bench.client import Target, send
from lockgate.bench.record import OK, RequestRecord
from lockgate.bench.workload import Workload


@dataclass(slots=True)
class Plan:
    """Either `schedule` (send times, open loop) or `concurrency` clients (closed loop)."""
    schedule: list[float] | None = None
    concurrency: int = 0
    duration_s: float | None = None   # closed loop: no new request after this
    count: int | None = None          # closed loop: at most this many requests
    max_concurrency: int = 0          # open loop: cap on requests in flight (0: none)
    label: str = "bench"


@dataclass(slots=True)
class PhaseResult:
    records: list[RequestRecord]
    duration_s: float   # from the phase start to the last request's end


def make_client(timeout_s: float, max_connections: int | None) -> httpx.AsyncClient:
    # trust_env=False: measure the server itself, never through a proxy set in the environment.
    return httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 30.0)),
                             limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=1024),
                             trust_env=False, http2=False)


class _Progress:
    """A rich progress bar on stderr (a no-op when disabled)."""

    def __init__(self, enabled: bool, label: str, total: float | None, by_time: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self.by_time = by_time
        self.done = self.failed = 0
        if not self.enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                            console=Console(stderr=True), transient=False)
        self.task = self.bar.add_task(label, total=total, status="")
        self.bar.start()

    def finished(self, rec: RequestRecord, elapsed: float) -> None:
        self.done += 1
        self.failed += rec.status != OK
        if self.enabled:
            self.bar.update(self.task, completed=int(elapsed) if self.by_time else self.done,
                            status=f"done {self.done}  not ok {self.failed}")

    def close(self) -> None:
        if self.enabled:
            self.bar.stop()


async def run_phase(plan: Plan, workload: Workload, target: Target, *, timeout_s: float = 600.0,
                    progress: bool = True) -> PhaseResult:
    if plan.schedule is not None:
        cap = plan.max_concurrency or None
        total: float | None = len(plan.schedule)
        by_time = False
    else:
        cap = plan.concurrency
        total = plan.count if plan.count is not None else plan.duration_s
        by_time = plan.count is None
    bar = _Progress(progress, plan.label, total, by_time)
    records: list[RequestRecord] = []
    async with make_client(timeout_s, cap) as http:
        t0 = time.perf_counter()

        async def one(i: int, at: float, sem: asyncio.Semaphore | None) -> None:
            spec = workload.spec(i)
            if sem is None:
                rec = await send(http, target, spec, at, t0)
            else:
                async with sem:
                    rec = await send(http, target, spec, at, t0)
            records.append(rec)
            bar.finished(rec, time.perf_counter() - t0)

        try:
            if plan.schedule is not None:
                sem = asyncio.Semaphore(cap) if cap else None
                tasks = []
                for i, at in enumerate(plan.schedule):
                    delay = t0 + at - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    tasks.append(asyncio.create_task(one(i, at, sem)))
                await asyncio.gather(*tasks)
            else:
                counter = itertools.count()

                async def worker() -> None:
                    while True:
                        i = next(counter)
                        now = time.perf_counter() - t0
                        if (plan.count is not None and i >= plan.count) or (
                                plan.duration_s is not None and now >= plan.duration_s):
                            return
                        await one(i, now, None)

                await asyncio.gather(*(worker() for _ in range(plan.concurrency)))
        finally:
            bar.close()
        end = max([r.start_s + (r.e2e_s or 0.0) for r in records], default=0.0)
    records.sort(key=lambda r: r.index)
    return PhaseResult(records, max(end, 1e-6))
