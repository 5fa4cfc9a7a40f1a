"""A scheduler-level simulator: the real `Scheduler` and `KVCacheManager` on a fake clock.

No model and no torch work: a step costs `StepCost.base_s + per_token_s * tokens
computed`, the clock advances by that, and the tokens the step sampled are
emitted at the new time. Deterministic, so scheduling policies (fair share,
priority classes, aging, the prefill cap) and admission control can be tested
and compared on latency distributions (TTFT, TPOT) in milliseconds of CPU time.

The loop: requests whose arrival time has come are offered to the optional
admission hook (`SimAdmission.on_arrival`; False rejects them for good) and
added; when nothing can run the clock jumps to the next arrival; otherwise one
step is scheduled and run. A request finishes with `output_len` tokens (no EOS).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from lockgate.engine.config import EngineConfig
from lockgate.engine.core.kv_cache import KVCacheManager
from lockgate.engine.core.request import Request, RequestStatus
from lockgate.engine.core.scheduler import ScheduledBatch, Scheduler
from lockgate.engine.messages import EngineCoreRequest
from lockgate.engine.sampling_params import SamplingParams
from lockgate.stats import percentile


@dataclass(slots=True)
class SimRequest:
    request_id: str
    tenant: str = ""
    tenant_weight: float = 1.0
    priority: int = 0
    prompt_len: int = 16
    output_len: int = 16
    arrival_s: float = 0.0
    # None: synthetic ids, distinct per request (no prefix-cache hits). Give ids to share prefixes.
    prompt_token_ids: list[int] | None = None


@dataclass(slots=True)
class StepCost:
    """Step time = base_s + per_token_s * tokens computed in the step (prefill and decode)."""

    base_s: float
    per_token_s: float = 0.0

    def __call__(self, num_tokens: int) -> float:
        return self.base_s + self.per_token_s * num_tokens


class SimAdmission(Protocol):
    def on_arrival(self, req: SimRequest, now: float) -> bool: ...  # False: rejected, never added
    def on_first_token(self, req: SimRequest, now: float) -> None: ...
    def on_finish(self, req: SimRequest, now: float) -> None: ...


@dataclass(slots=True)
class SimResult:
    request: SimRequest
    admitted: bool = True
    first_token_s: float | None = None
    finish_s: float | None = None
    token_times: list[float] = field(default_factory=list)
    num_preemptions: int = 0

    @property
    def ttft(self) -> float | None:
        """Time to first token, from arrival."""
        return None if self.first_token_s is None else self.first_token_s - self.request.arrival_s

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (None with fewer than two tokens)."""
        if self.finish_s is None or self.first_token_s is None or len(self.token_times) < 2:
            return None
        return (self.finish_s - self.first_token_s) / (len(self.token_times) - 1)


@dataclass(slots=True)
class SimStep:
    start_s: float
    end_s: float
    tokens: dict[str, int]  # request id -> tokens computed in the step
    sampled: list[str]  # request ids that got an output token at end_s
    decoding: list[str]  # running requests that were waiting for their next token at start_s
    preempted: list[str]
    num_prefill_tokens: int


@dataclass(slots=True)
class SimReport:
    results: dict[str, SimResult]
    steps: list[SimStep]
    end_s: float
    num_preemptions: int

    def select(self, where: Callable[[SimRequest], bool] | None = None) -> list[SimResult]:
        return [r for r in self.results.values() if where is None or where(r.request)]

    def ttfts(self, where: Callable[[SimRequest], bool] | None = None) -> list[float]:
        return [r.ttft for r in self.select(where) if r.ttft is not None]

    def tpots(self, where: Callable[[SimRequest], bool] | None = None) -> list[float]:
        return [r.tpot for r in self.select(where) if r.tpot is not None]

    def ttft_percentile(self, q: float, where: Callable[[SimRequest], bool] | None = None) -> float:
        return percentile(self.ttfts(where), q)

    def tpot_percentile(self, q: float, where: Callable[[SimRequest], bool] | None = None) -> float:
        return percentile(self.tpots(where), q)

    def all_finished(self) -> bool:
        return all(r.finish_s is not None for r in self.results.values() if r.admitted)


def prompt_ids(index: int, req: SimRequest) -> list[int]:
    """Request `index`'s prompt: its own ids, or synthetic ones unique to it (no prefix shared)."""
    if req.prompt_token_ids is not None:
        return list(req.prompt_token_ids)
    # The first token is unique per request: the hash chain makes every block distinct.
    return [100_000 + index] + [7] * (req.prompt_len - 1)


def complete_step(sched: Scheduler, batch: ScheduledBatch, start: float, now: float,
                  results: dict[str, SimResult], decoding: list[str], steps: list[SimStep] | None,
                  on_first: Callable[[Request, float], None] | None = None,
                  on_finish: Callable[[Request, float], None] | None = None) -> None:
    """The step that ran from `start` ends at `now`: every request whose computed tokens reached
    its length samples a token at `now` (its first: `on_first`; its last: finished, `on_finish`),
    preemptions are counted, and the step is appended to `steps` (None: not recorded).
    `decoding`: the running requests that were waiting for their next token at `start`."""
    sched.after_step(batch)
    sampled: list[str] = []
    for req in batch.requests:
        if req.num_computed_tokens != req.num_tokens:
            continue  # a prefill chunk short of the end samples nothing
        req.output_token_ids.append(1)
        res = results[req.request_id]
        res.token_times.append(now)
        sampled.append(req.request_id)
        if res.first_token_s is None:
            res.first_token_s = now
            if on_first is not None:
                on_first(req, now)
        if req.num_output_tokens >= res.request.output_len:
            res.finish_s = now
            res.num_preemptions = req.num_preemptions
            sched.finish(req)
            if on_finish is not None:
                on_finish(req, now)
    for req in batch.preempted:
        if req.status != RequestStatus.FINISHED:
            results[req.request_id].num_preemptions = req.num_preemptions
    if steps is not None:
        dec = set(decoding)
        prefill = sum(n for r, n in zip(batch.requests, batch.num_tokens) if r.request_id not in dec)
        steps.append(SimStep(start, now, {r.request_id: n for r, n in zip(batch.requests, batch.num_tokens)},
                             sampled, decoding, [r.request_id for r in batch.preempted], prefill))


def simulate(requests: Sequence[SimRequest], config: EngineConfig, num_blocks: int, cost: StepCost,
             admission: SimAdmission | None = None, max_steps: int = 1_000_000,
             record_steps: bool = True) -> SimReport:
    """Run `requests` to completion (drained) and report what each one saw."""
    now = 0.0
    sched = Scheduler(config, KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching),
                      clock=lambda: now)
    order = sorted(range(len(requests)), key=lambda i: requests[i].arrival_s)  # stable: ties keep input order
    results = {r.request_id: SimResult(r) for r in requests}
    if len(results) != len(requests):
        raise ValueError("request ids must be unique")
    sim_of: dict[str, SimRequest] = {}
    steps: list[SimStep] = []
    on_first = on_finish = None
    if admission is not None:
        hooks = admission

        def on_first(req: Request, t: float) -> None:
            hooks.on_first_token(sim_of[req.request_id], t)

        def on_finish(req: Request, t: float) -> None:
            hooks.on_finish(sim_of[req.request_id], t)

    nxt = 0
    for _ in range(max_steps):
        while nxt < len(order) and requests[order[nxt]].arrival_s <= now:
            i = order[nxt]
            nxt += 1
            sr = requests[i]
            if sr.prompt_len < 1 or sr.output_len < 1:
                raise ValueError(f"{sr.request_id}: prompt_len and output_len must be >= 1")
            if admission is not None and not admission.on_arrival(sr, now):
                results[sr.request_id].admitted = False
                continue
            core = EngineCoreRequest(sr.request_id, prompt_ids(i, sr), SamplingParams(max_tokens=sr.output_len),
                                     sr.arrival_s, sr.priority, tenant=sr.tenant, tenant_weight=sr.tenant_weight)
            sched.add(Request(core, [], sr.output_len))
            sim_of[sr.request_id] = sr
        decoding = [r.request_id for r in sched.running if r.is_decode] if record_steps else []
        batch = sched.schedule()
        if not batch.requests:
            if nxt < len(order):
                now = max(now, requests[order[nxt]].arrival_s)
                continue
            if sched.has_unfinished():
                raise RuntimeError(f"simulation stuck at {now:.3f}s: {len(sched.waiting)} waiting requests "
                                   f"can never be scheduled (too few KV blocks or max_num_batched_tokens)")
            break
        start = now
        now = start + cost(batch.total_tokens)
        complete_step(sched, batch, start, now, results, decoding, steps if record_steps else None,
                      on_first, on_finish)
    else:
        raise RuntimeError(f"simulation did not drain within {max_steps} steps")
    return SimReport(results, steps, now, sched.num_preemptions)
