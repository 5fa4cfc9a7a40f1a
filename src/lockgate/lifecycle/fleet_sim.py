"""A fleet on the simulator: N replicas, each the real `Scheduler` and `KVCacheManager` on its own
fake clock (`engine/sim.py` runs one), and a router choosing the replica of every request.

Event-driven: the next event is the earliest of the replicas' step ends and the next
arrival. At a time t: every step ending at t completes (tokens sampled, first tokens
and finishes reported to the router's tickets, the replica's KV cache diffed into
`blocks_stored`/`blocks_removed` and its usage into `set_kv_usage`), then every request
arriving at or before t is routed (block hashes of its prompt salted with its tenant,
as the API process computes them) into its replica's inbox, then every idle replica
with work takes its inbox (a core drains its inputs between steps) and starts a step
costing `cost(tokens)` on its own clock. The router's index is exact, one step late:
evictions made while a step is scheduled reach it when that step ends.

`router` is a `RouterConfig` (a `Router` is built on the simulation's clock, seeded),
a `Router` (used as it is, on its own clock), or a plain policy for comparison:
`round_robin()`, `random_pick(seed)`, any `(request, num_replicas) -> replica`.
"""
from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from lockgate.engine.config import EngineConfig
from lockgate.engine.core.kv_cache import KVCacheManager
from lockgate.engine.core.request import Request
from lockgate.engine.core.scheduler import ScheduledBatch, Scheduler
from lockgate.engine.messages import EngineCoreRequest
from lockgate.engine.prefix_hash import prompt_block_hashes
from lockgate.engine.sampling_params import SamplingParams
from lockgate.engine.sim import SimReport, SimRequest, SimResult, SimStep, StepCost, complete_step, prompt_ids
from lockgate.lifecycle.router import Decision, Router, RouterConfig, Ticket

Policy = Callable[[SimRequest, int], int]  # (request, number of replicas) -> replica index


def round_robin() -> Policy:
    count = 0

    def pick(req: SimRequest, num_replicas: int) -> int:
        nonlocal count
        count += 1
        return (count - 1) % num_replicas

    return pick


def random_pick(seed: int = 0) -> Policy:
    rng = random.Random(seed)
    return lambda req, num_replicas: rng.randrange(num_replicas)


@dataclass(slots=True)
class ReplicaStats:
    index: int
    num_requests: int = 0
    num_steps: int = 0
    busy_s: float = 0.0
    num_preemptions: int = 0
    prefix_queries: int = 0  # prompt tokens looked up in its prefix cache
    prefix_hits: int = 0  # of those, served from it
    cached_blocks: int = 0  # blocks in its prefix cache at the end
    steps: list[SimStep] = field(default_factory=list)  # with record_steps

    @property
    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0


@dataclass(slots=True)
class FleetReport(SimReport):
    replica_of: dict[str, int] = field(default_factory=dict)  # request id -> replica
    decisions: dict[str, Decision] = field(default_factory=dict)  # request id -> the router's decision
    cached_tokens: dict[str, int] = field(default_factory=dict)  # request id -> prompt tokens it found cached
    replicas: list[ReplicaStats] = field(default_factory=list)
    router: Router | None = None

    @property
    def prefix_hit_rate(self) -> float:
        """Prompt tokens served from the replicas' prefix caches, over all prompt tokens looked up."""
        q = sum(r.prefix_queries for r in self.replicas)
        return sum(r.prefix_hits for r in self.replicas) / q if q else 0.0

    def hit_rate(self, where: Callable[[SimRequest], bool] | None = None) -> float:
        """The selected requests' prompt tokens found cached at admission, over their prompt tokens."""
        sel = [r for r in self.select(where) if r.request.request_id in self.cached_tokens]
        total = sum(len(r.request.prompt_token_ids) if r.request.prompt_token_ids is not None
                    else r.request.prompt_len for r in sel)
        return sum(self.cached_tokens[r.request.request_id] for r in sel) / total if total else 0.0

    def replica_counts(self, where: Callable[[SimRequest], bool] | None = None) -> Counter[int]:
        """How many of the selected requests each replica served."""
        return Counter(self.replica_of[r.request.request_id] for r in self.select(where)
                       if r.request.request_id in self.replica_of)


class _Replica:
    __slots__ = ("index", "now", "sched", "kv", "inbox", "batch", "decoding", "step_start", "step_end", "cached",
                 "stalled", "stats")

    def __init__(self, index: int, config: EngineConfig, num_blocks: int) -> None:
        self.index = index
        self.now = 0.0
        self.kv = KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.sched = Scheduler(config, self.kv, clock=lambda: self.now)
        self.inbox: list[Request] = []
        self.batch: ScheduledBatch | None = None
        self.decoding: list[str] = []
        self.step_start = 0.0
        self.step_end = math.inf
        self.cached: set[bytes] = set()  # the prefix cache's keys as the router last heard them
        self.stalled = False  # its waiting requests cannot start until something changes
        self.stats = ReplicaStats(index)


def simulate_fleet(requests: Sequence[SimRequest], config: EngineConfig, num_replicas: int, num_blocks: int,
                   cost: StepCost, router: Router | RouterConfig | Policy, *, seed: int = 0,
                   max_steps: int = 1_000_000, record_steps: bool = False) -> FleetReport:
    """Run `requests` to completion on `num_replicas` replicas of `num_blocks` KV blocks each."""
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
    clock = [0.0]
    if isinstance(router, RouterConfig):
        router = Router(router, rng=random.Random(seed), clock=lambda: clock[0])
    policy: Policy | None = None
    if isinstance(router, Router):
        if router.config.block_size != config.block_size:
            raise ValueError(f"router block_size {router.config.block_size} != engine block_size "
                             f"{config.block_size}")
        if not router.replicas:
            for i in range(num_replicas):
                router.add_replica(i, routable=True)
        elif router.replicas != list(range(num_replicas)):
            raise ValueError(f"router replicas {router.replicas} != 0..{num_replicas - 1}")
    else:
        policy, router = router, None

    reps = [_Replica(i, config, num_blocks) for i in range(num_replicas)]
    results = {r.request_id: SimResult(r) for r in requests}
    if len(results) != len(requests):
        raise ValueError("request ids must be unique")
    order = sorted(range(len(requests)), key=lambda i: requests[i].arrival_s)  # stable
    report = FleetReport(results, [], 0.0, 0, router=router, replicas=[r.stats for r in reps])
    tickets: dict[str, Ticket] = {}
    bs = config.block_size
    nxt = 0
    steps = 0

    def first_token(req: Request, _now: float) -> None:
        report.cached_tokens[req.request_id] = req.num_cached_tokens
        ticket = tickets.get(req.request_id)
        if ticket is not None:
            ticket.started()

    def finished(req: Request, _now: float) -> None:
        ticket = tickets.pop(req.request_id, None)
        if ticket is not None:
            ticket.end()

    def finish_step(rep: _Replica) -> None:
        batch, now = rep.batch, rep.step_end
        assert batch is not None
        rep.now = now
        complete_step(rep.sched, batch, rep.step_start, now, results, rep.decoding,
                      rep.stats.steps if record_steps else None, first_token, finished)
        if router is not None:  # the replica's KV events since the last step ended, exactly
            keys = rep.kv.cached.keys()
            removed = rep.cached - keys
            stored = keys - rep.cached
            if removed:
                router.blocks_removed(rep.index, removed)
            if stored:
                router.blocks_stored(rep.index, stored)
            rep.cached = set(keys)
            router.set_kv_usage(rep.index, rep.kv.usage)
        rep.batch, rep.step_end = None, math.inf
        rep.stalled = False

    def start_step(rep: _Replica, now: float) -> None:
        rep.now = now
        for req in rep.inbox:
            rep.sched.add(req)
        rep.inbox.clear()
        if not rep.sched.has_unfinished():
            return
        rep.decoding = [r.request_id for r in rep.sched.running if r.is_decode] if record_steps else []
        batch = rep.sched.schedule()
        if not batch.requests:
            rep.stalled = True
            return
        rep.batch = batch
        rep.step_start = now
        dt = cost(batch.total_tokens)
        rep.step_end = now + dt
        rep.stats.num_steps += 1
        rep.stats.busy_s += dt

    def arrive(i: int, now: float) -> None:
        sr = requests[i]
        if sr.prompt_len < 1 or sr.output_len < 1:
            raise ValueError(f"{sr.request_id}: prompt_len and output_len must be >= 1")
        ids = prompt_ids(i, sr)
        if router is not None:
            hashes = prompt_block_hashes(ids, bs, sr.tenant)
            decision, ticket = router.route(hashes, len(ids), tenant=sr.tenant)
            index = decision.replica
            report.decisions[sr.request_id] = decision
            tickets[sr.request_id] = ticket
        else:
            assert policy is not None
            index = policy(sr, num_replicas)
            if not 0 <= index < num_replicas:
                raise ValueError(f"policy chose replica {index} of {num_replicas}")
        report.replica_of[sr.request_id] = index
        core = EngineCoreRequest(sr.request_id, ids, SamplingParams(max_tokens=sr.output_len), sr.arrival_s,
                                 sr.priority, cache_salt=sr.tenant or None, tenant=sr.tenant,
                                 tenant_weight=sr.tenant_weight)
        reps[index].inbox.append(Request(core, [], sr.output_len))
        reps[index].stats.num_requests += 1
        reps[index].stalled = False

    while True:
        t_arr = requests[order[nxt]].arrival_s if nxt < len(order) else math.inf
        t_step = min(r.step_end for r in reps)
        now = min(t_arr, t_step)
        if now == math.inf:
            break
        clock[0] = now
        for rep in reps:
            if rep.step_end == now:
                finish_step(rep)
                steps += 1
        while nxt < len(order) and requests[order[nxt]].arrival_s <= now:
            arrive(order[nxt], now)
            nxt += 1
        for rep in reps:
            if rep.batch is None and not rep.stalled:
                start_step(rep, now)
        if steps > max_steps:
            raise RuntimeError(f"simulation did not drain within {max_steps} steps")
    for rep in reps:
        if rep.sched.has_unfinished():
            raise RuntimeError(f"simulation stuck at {rep.now:.3f}s on replica {rep.index}: "
                               f"{len(rep.sched.waiting)} waiting requests can never be scheduled "
                               f"(too few KV blocks or max_num_batched_tokens)")
        rep.stats.prefix_queries = rep.kv.prefix_queries
        rep.stats.prefix_hits = rep.kv.prefix_hits
        rep.stats.num_preemptions = rep.sched.num_preemptions
        rep.stats.cached_blocks = len(rep.kv.cached)
    report.end_s = max((r.now for r in reps), default=0.0)
    report.num_preemptions = sum(r.stats.num_preemptions for r in reps)
    if record_steps:
        report.steps = sorted((s for r in reps for s in r.stats.steps), key=lambda s: (s.end_s, s.start_s))
    return report
