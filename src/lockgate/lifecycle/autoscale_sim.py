"""The autoscaler on the simulator: a trace through a fleet whose size the autoscaler's own code decides.

Each replica is the real `Scheduler` and `KVCacheManager` (as `engine/sim.py` and
`fleet_sim.py` run them), on one fake clock, event-driven: the next event is the earliest
of the replicas' step ends, the next arrival, a starting replica becoming ready (the
cold-start model: `cold_start_s` from decision to ready) and the autoscaler's next tick
(every `interval_s`). At a tick the fleet is sampled as the live fleet samples itself
(`FleetSample`: ready and starting replicas, requests in flight, mean KV usage, and each
class's predicted wait computed as admission computes it, from the fleet's `QueueView`),
`Autoscaler.decide` answers, and the decision is applied: new replicas start; extra ones
stop taking requests (starting ones are cancelled first, then the newest ready ones drain)
and stop once they hold nothing. At zero ready replicas requests are held (the activator)
and routed as soon as one is ready.

Requests go to the ready replica with the least queued prompt tokens plus 16 per running
request (the router's load terms; these traces share no prefixes). Cost counts every
replica from its start decision until it stops (`replica_seconds`).
"""
from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from lockgate.engine.config import EngineConfig
from lockgate.engine.core.kv_cache import KVCacheManager
from lockgate.engine.core.request import Request
from lockgate.engine.core.scheduler import ScheduledBatch, Scheduler
from lockgate.engine.frontend.queue_view import QueueView
from lockgate.engine.messages import EngineCoreRequest
from lockgate.engine.sampling_params import SamplingParams
from lockgate.engine.sim import SimRequest, SimResult, StepCost, complete_step, prompt_ids
from lockgate.gateway.classes import ClassTable
from lockgate.lifecycle.autoscale_signals import class_loads
from lockgate.lifecycle.autoscale_types import AutoscaleConfig, Decision, FleetSample
from lockgate.lifecycle.autoscaler import Autoscaler
from lockgate.stats import percentile

RUNNING_COST_TOKENS = 16  # the router's weight of one running request, in prompt tokens


@dataclass(slots=True)
class SimSetup:
    """What a replica is on the simulator, and the fleet around it."""

    cost: StepCost = field(default_factory=lambda: StepCost(0.03, 1.5e-4))
    engine: EngineConfig = field(default_factory=lambda: EngineConfig(
        scheduling_policy="priority", block_size=16, max_num_seqs=64, max_prefill_tokens=512,
        enable_prefix_caching=False))
    num_blocks: int = 4096  # KV blocks per replica
    cold_start_s: float = 20.0  # decision -> ready
    classes: ClassTable = field(default_factory=ClassTable)
    bucket_s: float = 10.0  # the timeline's resolution
    seed: int = 0


@dataclass(slots=True)
class Bucket:
    t: float
    arrival_rate: float  # requests/s arriving in the bucket
    ready: float  # mean ready replicas over the bucket
    total: float  # mean replicas paid for (ready, starting and draining)
    ttft_p95: float | None  # of the requests arriving in the bucket, every class
    ttft_p95_interactive: float | None  # the first class's


@dataclass(slots=True)
class ClassOutcome:
    name: str
    ttft_target_s: float
    objective: float
    requests: int
    met: int  # TTFT within the target
    ttft_p95: float | None

    @property
    def attainment(self) -> float:
        return self.met / self.requests if self.requests else 1.0


@dataclass(slots=True)
class AutoscaleRun:
    policy: str
    classes: list[ClassOutcome]
    replica_seconds: float
    scale_events: int  # decisions that changed the count
    decisions: list[Decision]
    timeline: list[Bucket]
    end_s: float
    results: dict[str, SimResult]
    peak_replicas: int = 0

    @property
    def mean_in_flight(self) -> float:
        """Requests in flight on the fleet, averaged over the run (Little's law: time in system / span)."""
        spans = [r.finish_s - r.request.arrival_s for r in self.results.values() if r.finish_s is not None]
        return sum(spans) / self.end_s if self.end_s > 0 else 0.0

    def outcome(self, name: str) -> ClassOutcome:
        return next(c for c in self.classes if c.name == name)

    @property
    def meets_slos(self) -> bool:
        """Every class with requests kept its objective's share within its TTFT target."""
        return all(c.attainment >= c.objective for c in self.classes if c.requests)

    def to_json(self) -> dict[str, object]:
        return {"policy": self.policy, "replica_seconds": round(self.replica_seconds, 1),
                "scale_events": self.scale_events, "peak_replicas": self.peak_replicas,
                "end_s": round(self.end_s, 2), "meets_slos": self.meets_slos,
                "classes": {c.name: {"attainment": round(c.attainment, 5), "requests": c.requests, "met": c.met,
                                     "ttft_target_s": c.ttft_target_s, "objective": c.objective,
                                     "ttft_p95_s": c.ttft_p95} for c in self.classes}}


class _Replica:
    __slots__ = ("index", "kv", "sched", "inbox", "batch", "step_start", "step_end", "state", "ready_at",
                 "paid_from", "queued_tokens", "stalled")

    def __init__(self, index: int, setup: SimSetup, now: float, ready_at: float, clock) -> None:  # noqa: ANN001
        self.index = index
        self.kv = KVCacheManager(setup.num_blocks, setup.engine.block_size, setup.engine.enable_prefix_caching)
        self.sched = Scheduler(setup.engine, self.kv, clock=clock)
        self.inbox: list[Request] = []
        self.batch: ScheduledBatch | None = None
        self.step_start = 0.0
        self.step_end = math.inf
        self.state = "starting" if ready_at > now else "ready"  # starting | ready | draining
        self.ready_at = ready_at
        self.paid_from = now
        self.queued_tokens = 0  # prompt tokens routed here that have not produced a first token
        self.stalled = False

    def busy(self) -> bool:
        return bool(self.inbox) or self.batch is not None or self.sched.has_unfinished()

    def load(self) -> float:
        return self.queued_tokens + RUNNING_COST_TOKENS * len(self.sched.running)


def simulate_autoscale(requests: Sequence[SimRequest], config: AutoscaleConfig, setup: SimSetup | None = None,
                       initial: int | None = None, max_steps: int = 5_000_000) -> AutoscaleRun:
    """Run `requests` to completion through a fleet the autoscaler (`config`) sizes. `initial`:
    replicas ready at t=0 (default: max_replicas for `fixed`, else max(min_replicas, 1))."""
    setup = setup or SimSetup()
    if not requests:
        raise ValueError("the trace is empty")
    results = {r.request_id: SimResult(r) for r in requests}
    if len(results) != len(requests):
        raise ValueError("request ids must be unique")
    if initial is None:
        initial = config.max_replicas if config.policy == "fixed" else max(config.min_replicas, 1)
    initial = min(max(initial, 0), config.max_replicas)
    clock = [0.0]
    tick = lambda: clock[0]  # noqa: E731
    view = QueueView(clock=tick)
    scaler = Autoscaler(config)
    rng = random.Random(setup.seed)
    order = sorted(range(len(requests)), key=lambda i: requests[i].arrival_s)
    mean_prompt = sum(r.prompt_len for r in requests) / len(requests)
    aging = setup.engine.priority_aging_s if setup.engine.scheduling_policy == "priority" else 0.0
    reps: list[_Replica] = [_Replica(i, setup, 0.0, 0.0, tick) for i in range(initial)]
    next_index = initial
    replica_of: dict[str, _Replica] = {}
    held: list[int] = []  # request indices waiting for a ready replica
    in_flight = 0
    replica_seconds = 0.0
    decisions: list[Decision] = []
    # timeline accumulators: replica-time per bucket
    nb = int(max(r.arrival_s for r in requests) // setup.bucket_s) + 1
    ready_time = [0.0] * (nb + 1)
    total_time = [0.0] * (nb + 1)
    last_t = 0.0
    peak = initial

    def account(to: float) -> None:  # integrate the fleet's size from last_t to `to`
        nonlocal last_t
        if to <= last_t:
            return
        n_ready = sum(1 for r in reps if r.state == "ready")
        n_total = len(reps)
        t = last_t
        while t < to:
            b = min(int(t // setup.bucket_s), nb)
            end = min(to, (b + 1) * setup.bucket_s) if b < nb else to
            ready_time[b] += n_ready * (end - t)
            total_time[b] += n_total * (end - t)
            t = end
        last_t = to

    def on_first(req: Request, _t: float) -> None:
        view.leave(req.request_id, served=True)
        rep = replica_of[req.request_id]
        rep.queued_tokens -= len(req.prompt_token_ids)

    def on_finish(req: Request, _t: float) -> None:
        nonlocal in_flight
        in_flight -= 1

    def route(i: int) -> None:
        sr = requests[i]
        ready = [r for r in reps if r.state == "ready"]
        best = min(r.load() for r in ready)
        rep = rng.choice([r for r in ready if r.load() - best < RUNNING_COST_TOKENS])
        ids = prompt_ids(i, sr)
        core = EngineCoreRequest(sr.request_id, ids, SamplingParams(max_tokens=sr.output_len), sr.arrival_s,
                                 sr.priority, tenant=sr.tenant)
        rep.inbox.append(Request(core, [], sr.output_len))
        rep.queued_tokens += len(ids)
        rep.stalled = False
        replica_of[sr.request_id] = rep
        view.add(sr.request_id, sr.priority, 1, len(ids))

    def start_step(rep: _Replica, now: float) -> None:
        for req in rep.inbox:
            rep.sched.add(req)
        rep.inbox.clear()
        if not rep.sched.has_unfinished():
            return
        batch = rep.sched.schedule()
        if not batch.requests:
            rep.stalled = True
            return
        rep.batch, rep.step_start = batch, now
        rep.step_end = now + setup.cost(batch.total_tokens)

    arrivals_seen = [0]

    def sample(now: float) -> FleetSample:
        ready = [r for r in reps if r.state == "ready"]
        kv = sum(r.kv.usage for r in ready) / len(ready) if ready else 0.0
        arrived, arrivals_seen[0] = nxt - arrivals_seen[0], nxt  # no admission here: nothing refused
        return FleetSample(now, len(ready), sum(1 for r in reps if r.state == "starting"), in_flight - len(held), kv,
                           class_loads(view, setup.classes, mean_prompt, aging), held=len(held), arrived=arrived)

    def apply(d: Decision, now: float) -> None:
        nonlocal next_index, peak
        serving = [r for r in reps if r.state in ("ready", "starting")]
        if d.desired > len(serving):
            for _ in range(d.desired - len(serving)):
                reps.append(_Replica(next_index, setup, now, now + setup.cold_start_s, tick))
                next_index += 1
        elif d.desired < len(serving):
            extra = len(serving) - d.desired
            for r in sorted(serving, key=lambda r: (r.state == "ready", -r.index))[:extra]:
                r.state = "draining"  # starting ones first (nothing to drain), then the newest
        if d.changed:
            scaler.note_scaled(now)
        peak = max(peak, sum(1 for r in reps if r.state in ("ready", "starting")))

    def retire(now: float) -> None:
        nonlocal replica_seconds
        for r in [r for r in reps if r.state == "draining" and not r.busy()]:
            replica_seconds += now - r.paid_from
            reps.remove(r)

    nxt = 0
    next_tick = 0.0
    steps = 0
    now = 0.0
    while True:
        t_arr = requests[order[nxt]].arrival_s if nxt < len(order) else math.inf
        t_step = min((r.step_end for r in reps), default=math.inf)
        t_ready = min((r.ready_at for r in reps if r.state == "starting"), default=math.inf)
        pending = nxt < len(order) or in_flight > 0 or held
        t_tick = next_tick if pending else math.inf
        t_next = min(t_arr, t_step, t_ready, t_tick)
        if t_next == math.inf:
            break
        now = t_next
        account(now)
        clock[0] = now
        for rep in reps:
            if rep.step_end == now:
                batch = rep.batch
                assert batch is not None
                complete_step(rep.sched, batch, rep.step_start, now, results, [], None, on_first, on_finish)
                rep.batch, rep.step_end, rep.stalled = None, math.inf, False
                steps += 1
        for rep in reps:
            if rep.state == "starting" and rep.ready_at <= now:
                rep.state = "ready"
        if held and any(r.state == "ready" for r in reps):
            for i in held:
                route(i)
            held.clear()
        while nxt < len(order) and requests[order[nxt]].arrival_s <= now:
            i = order[nxt]
            nxt += 1
            sr = requests[i]
            if sr.prompt_len < 1 or sr.output_len < 1:
                raise ValueError(f"{sr.request_id}: prompt_len and output_len must be >= 1")
            in_flight += 1
            if any(r.state == "ready" for r in reps):
                route(i)
            else:
                held.append(i)
        if now >= next_tick and pending:
            d = scaler.decide(sample(now))
            decisions.append(d)
            apply(d, now)
            next_tick = now + config.interval_s
        for rep in reps:
            if rep.batch is None and not rep.stalled and rep.busy():
                start_step(rep, now)
        retire(now)
        if steps > max_steps:
            raise RuntimeError(f"simulation did not drain within {max_steps} steps")
    for rep in reps:
        if rep.sched.has_unfinished():
            raise RuntimeError(f"simulation stuck at {now:.3f}s on replica {rep.index}: requests can never be "
                               "scheduled (too few KV blocks or max_num_batched_tokens)")
        replica_seconds += now - rep.paid_from
    end = now
    return AutoscaleRun(config.policy, _outcomes(requests, results, setup.classes), replica_seconds,
                        sum(1 for d in decisions if d.changed), decisions,
                        _timeline(requests, results, setup, ready_time, total_time, nb), end, results, peak)


def _outcomes(requests: Sequence[SimRequest], results: dict[str, SimResult],
              classes: ClassTable) -> list[ClassOutcome]:
    out = []
    for cls in classes.classes:
        ttfts = [results[r.request_id].ttft for r in requests if classes.of_priority(r.priority) is cls]
        vals = [t for t in ttfts if t is not None]
        met = sum(1 for t in vals if t <= cls.ttft_s)
        out.append(ClassOutcome(cls.name, cls.ttft_s, cls.objective, len(ttfts), met,
                                percentile(vals, 95) if vals else None))
    return out


def _timeline(requests: Sequence[SimRequest], results: dict[str, SimResult], setup: SimSetup,
              ready_time: list[float], total_time: list[float], nb: int) -> list[Bucket]:
    b_s = setup.bucket_s
    ttfts: list[list[float]] = [[] for _ in range(nb)]
    first: list[list[float]] = [[] for _ in range(nb)]
    counts = [0] * nb
    for r in requests:
        b = min(int(r.arrival_s // b_s), nb - 1)
        counts[b] += 1
        t = results[r.request_id].ttft
        if t is not None:
            ttfts[b].append(t)
            if r.priority == 0:
                first[b].append(t)
    return [Bucket(b * b_s, counts[b] / b_s, ready_time[b] / b_s, total_time[b] / b_s,
                   percentile(ttfts[b], 95) if ttfts[b] else None,
                   percentile(first[b], 95) if first[b] else None) for b in range(nb)]


def compare(requests: Sequence[SimRequest], base: AutoscaleConfig, setup: SimSetup | None = None,
            policies: Sequence[str] = ("fixed", "hpa", "lockgate"), initial: int | None = None) -> dict[str, AutoscaleRun]:
    """The same trace under each policy, every other setting equal. `initial`: the autoscaled fleets'
    replicas at t=0 (a fleet that was already serving the trace's first load; the fixed one has max)."""
    out = {}
    for name in policies:
        out[name] = simulate_autoscale(requests, dataclasses.replace(base, policy=name), setup,
                                       initial=None if name == "fixed" else initial)
    return out
