"""Messages between engine core and its users, and the public output types.

Core messages are plain dataclasses that msgspec encodes directly, so the same
types cross the ZeroMQ socket between the API process and the engine process.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lockgate.engine.sampling_params import SamplingParams
from lockgate.engine.step_stats import HistogramCounts


@dataclass(slots=True)
class EngineCoreRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float
    priority: int = 0  # lower value is served first under the priority policy
    cache_salt: str | None = None  # joins the prefix-cache hash chain (per tenant)
    # For n > 1 the frontend fans out to child requests; siblings wait until this one has
    # its prompt in the cache, so all n share the prompt's KV blocks.
    share_prefix_with: str | None = None
    # Fair share between tenants (priority policy): service is charged to `tenant`, divided by
    # `tenant_weight` (> 0; a tenant of weight 2 gets twice the share of one of weight 1).
    tenant: str = ""
    tenant_weight: float = 1.0


@dataclass(slots=True)
class TokenLogprob:
    """Logprob of the sampled token and the top-N alternatives (token id -> logprob)."""

    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass(slots=True)
class EngineCoreOutput:
    """What one step produced for one request: new token ids only (deltas)."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # None | "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (first output only)
    # First output only: (entered the core, first scheduled), on the core's monotonic clock.
    start_times: tuple[float, float] | None = None


@dataclass(slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_waiting_tokens: int
    num_free_blocks: int
    num_total_blocks: int
    kv_cache_usage: float  # fraction of blocks referenced by live requests
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of those, tokens found
    num_preemptions: int
    # Cumulative since the core started (step_stats.py buckets): seconds per step, tokens per step.
    step_seconds: HistogramCounts | None = None
    iteration_tokens: HistogramCounts | None = None


@dataclass(slots=True)
class RequestTimes:
    """One engine request's timeline on the engine core's monotonic clock (seconds).

    Intervals between these are taken on one clock (the core's); `clock_offset`
    turns them into Unix time for traces.
    """

    request_id: str  # the engine request (a child id when n > 1)
    queued: float  # entered the engine core
    scheduled: float  # first ran in a step
    first_token: float  # end of the step that sampled its first token
    last_token: float  # end of the step that sampled its latest token
    clock_offset: float = 0.0  # Unix time = core time + clock_offset

    @property
    def queue_s(self) -> float:
        return self.scheduled - self.queued

    @property
    def prefill_s(self) -> float:
        return self.first_token - self.scheduled

    @property
    def decode_s(self) -> float:
        return self.last_token - self.first_token

    @property
    def inference_s(self) -> float:
        return self.last_token - self.scheduled


@dataclass(slots=True)
class Logprob:
    logprob: float
    decoded_token: str | None = None


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str  # cumulative
    token_ids: list[int]  # cumulative
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None  # per position: token id -> logprob
    # Deltas since the previous RequestOutput for this request (what streaming sends).
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    # Engine timelines of the children that have started (shared, updated in place as tokens come).
    engine_times: list[RequestTimes] = field(default_factory=list)
