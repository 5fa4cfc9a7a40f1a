"""`AutoscaleLoop`: one version's autoscaler driving its live fleet.

Every `interval_s` (and at once when a request is held at zero replicas) it samples
the fleet as admission sees it: each SLO class's predicted queue wait against its
TTFT target (`autoscale_signals.class_loads` on the version's queue), the requests
admission refused since the last sample, KV usage and requests in flight,
asks the autoscaler (`autoscaler.py`, the same code the simulator runs) for a
decision and applies a change through `Fleet.set_replicas`: new replicas load in
the background, removed ones drain with no time limit (a scale-down never cuts a
request short). A change is an audit record with its figures, a metric and a log
line; the fleet keeps the last change (`last_decision`) and the last evaluation for `/admin/models`.
The same loop serves local replicas and Ray actors: the fleet's client factory
decides where a replica runs.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from lockgate.gateway.admission import Admission
from lockgate.lifecycle.autoscale_signals import class_loads
from lockgate.lifecycle.autoscale_types import Decision, FleetSample
from lockgate.lifecycle.autoscaler import Autoscaler
from lockgate.lifecycle.fleet import Fleet

log = logging.getLogger("lockgate.lifecycle")

OnChange = Callable[[Decision], Awaitable[None]]


@dataclass(slots=True)
class ScaleCounts:
    """Applied scale events, by direction and mode (the metric)."""

    counts: dict[tuple[str, str], int] = field(default_factory=dict)

    def add(self, d: Decision) -> None:
        key = ("up" if d.desired > d.current else "down", d.mode)
        self.counts[key] = self.counts.get(key, 0) + 1


class AutoscaleLoop:
    def __init__(self, fleet: Fleet, autoscaler: Autoscaler, admission: Admission,
                 on_change: OnChange | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.fleet = fleet
        self.autoscaler = autoscaler
        self.admission = admission
        self.on_change = on_change  # the audit record (registry)
        self.clock = clock
        self.events = ScaleCounts()
        self._origin = clock()
        self._asked, self._refused = admission.num_asked, admission.num_refused
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        fleet.autoscale = autoscaler.config
        fleet.wake_autoscaler = self._wake.set

    # ---- life ----------------------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.autoscaler.config.interval_s)
            self._wake.clear()
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - one bad evaluation must not stop the autoscaler
                log.exception("%s: autoscaler evaluation failed", self.fleet.ref)

    def set_bounds(self, min_replicas: int, max_replicas: int) -> None:
        """New bounds (an admin's PATCH): the next evaluation, at once, decides within them."""
        config = dataclasses.replace(self.autoscaler.config, min_replicas=min_replicas, max_replicas=max_replicas)
        self.autoscaler.config = config
        self.fleet.autoscale = config
        self._wake.set()

    # ---- one evaluation ---------------------------------------------------------------------
    def sample(self) -> FleetSample:
        fleet, adm = self.fleet, self.admission
        q = fleet.queue
        mean_prompt = q.num_tokens / q.num_requests if q.num_requests else 0.0
        classes = class_loads(q, adm.policy.classes, mean_prompt, adm.policy.aging_s)
        arrived, refused = adm.num_asked - self._asked, adm.num_refused - self._refused
        self._asked, self._refused = adm.num_asked, adm.num_refused
        return FleetSample(t=self.clock() - self._origin, ready=fleet.num_ready, starting=fleet.num_starting,
                           in_flight=fleet.num_in_flight, kv_usage=fleet.kv_usage, classes=classes,
                           held=fleet.held, arrived=arrived, refused=refused)

    async def step(self) -> Decision:
        """Sample, decide, and apply a change (audited first; applied even when the audit log cannot be
        written: the SLO comes first, and the failure is logged)."""
        decision = self.autoscaler.decide(self.sample())
        self.fleet.last_evaluation = decision
        if not decision.changed:
            return decision
        self.fleet.last_decision = decision
        log.info("%s: autoscale %d -> %d replicas (%s): %s", self.fleet.ref, decision.current, decision.desired,
                 decision.mode, decision.reason)
        if self.on_change is not None:
            try:
                await self.on_change(decision)
            except Exception as exc:  # noqa: BLE001 - see above
                log.error("%s: the autoscale decision could not be audited (%s); applying it anyway",
                          self.fleet.ref, exc)
        await self.fleet.set_replicas(decision.desired)
        self.events.add(decision)
        self.autoscaler.note_scaled(decision.t)
        return decision
