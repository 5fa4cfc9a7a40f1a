"""Wire messages between the API process and the engine-core process, and their payloads.

Every message is a tagged msgspec Struct, encoded with msgpack: the receiving
side decodes into exactly these types (no pickle, nothing executable crosses a
socket). The payloads (`EngineCoreRequest`, `EngineCoreOutput`, `TokenLogprob`,
`EngineStats`) are plain dataclasses that msgspec encodes directly; the offline
`LLMEngine` passes the same types between its parts in one process.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import msgspec

from lockgate.engine.config import EngineConfig, ModelConfig
from lockgate.engine.spec.stats import SpecStats
from lockgate.engine.sampling_params import SamplingParams
from lockgate.engine.step_stats import HistogramCounts
from lockgate.engine.structured.stats import StructuredStats

# ---- payloads -----------------------------------------------------------------------


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
    """Logprob of the sampled (or, for prompt logprobs, the prompt's) token and the top-N
    alternatives (token id -> logprob), best first."""

    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)
    rank: int | None = None  # the token's rank in the vocabulary, 1-based (prompt logprobs)


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
    # First output only, for requests with `prompt_logprobs`: one entry per prompt position
    # 1..n-1 (prompt token i's logprob given the tokens before it, its rank, the top alternatives).
    prompt_logprobs: list[TokenLogprob] | None = None
    # The finishing output of a pooling request (`SamplingParams.embed`): the mean of the prompt's
    # final-normed hidden states, L2-normalized, as little-endian float32 bytes.
    embedding: bytes | None = None
    # Speculative decoding, on a request's finishing output: tokens proposed for it, and accepted.
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0


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
    # Structured outputs (cumulative): compiles, cache lookups, mask time; None before the first
    # constrained request (and from a core that predates the field).
    structured: StructuredStats | None = None
    # Speculative decoding (cumulative); None from a core without it.
    spec: SpecStats | None = None


def check_tenant(tenant: object, tenant_weight: object) -> None:
    """The fair-share fields of a request (checked on both sides: they cross a socket)."""
    if not isinstance(tenant, str):
        raise ValueError(f"tenant must be a string, got {type(tenant).__name__}")
    if not (isinstance(tenant_weight, (int, float)) and not isinstance(tenant_weight, bool)
            and math.isfinite(tenant_weight) and tenant_weight > 0):
        raise ValueError(f"tenant_weight must be a finite number > 0, got {tenant_weight!r}")



# ---- API process -> engine core ---------------------------------------------------


class AddRequests(msgspec.Struct, tag="add", omit_defaults=True):
    """New requests; n > 1 arrives here already fanned out into child requests."""

    requests: list[EngineCoreRequest]
    # Who sent them (their outputs go back there): 0, the core's starter on its own socket pair; an
    # attached frontend's id on the attach socket (`--api-workers`: core/frontends.py).
    frontend: int = 0


class AbortRequests(msgspec.Struct, tag="abort", omit_defaults=True):
    request_ids: list[str]
    frontend: int = 0


class Shutdown(msgspec.Struct, tag="shutdown"):
    pass


class Attach(msgspec.Struct, tag="attach"):
    """Another API process attaches to a running core (on its attach socket): the core connects a
    PUSH socket to `output` for this frontend's outputs, answers `Ready` there, and watches `pid`
    (the frontend's process: its requests are aborted when it dies)."""

    frontend: int
    output: str
    pid: int


class Detach(msgspec.Struct, tag="detach"):
    """An attached frontend leaves: its unfinished requests are aborted, its socket closed."""

    frontend: int


ClientMessage = AddRequests | AbortRequests | Shutdown | Attach | Detach

# ---- engine core -> API process ----------------------------------------------------


class Ready(msgspec.Struct, tag="ready"):
    """Sent once, after the model is loaded: what the frontend needs to validate requests."""

    pid: int
    max_model_len: int
    model_config: ModelConfig
    num_total_blocks: int
    block_size: int
    stats: EngineStats
    # Unix time minus monotonic time in the core: turns the core's timestamps into wall time (traces).
    clock_offset: float = 0.0
    # Cold start, on the core's clock: its imports up to loading (started_s), then the model's load and
    # KV-cache allocation (load_s).
    started_s: float = 0.0
    load_s: float = 0.0
    # The weight precision that runs: "int4", "int8" or "none" (float; also a fake core's).
    quantization: str = "none"


class PeerLoad(msgspec.Struct, array_like=True):
    """A shared core's load from its other frontends (`--api-workers`), in every `StepOutputs` it sends
    while several API processes are attached: what they have queued, in flight, and cumulative counts
    of their requests' arrivals and first outputs since the core started (a receiver takes deltas)."""

    frontends: int  # attached frontends besides the receiver (the core's starter waits for them to leave)
    in_flight: int  # their requests in the core, not finished
    queued: dict[int, tuple[int, int]]  # priority -> (requests, prompt tokens) with no output yet
    departed: tuple[int, int]  # cumulative (requests, prompt tokens) that got their first output
    arrived: dict[int, tuple[int, int]]  # cumulative per priority (requests, prompt tokens)


class StepOutputs(msgspec.Struct, tag="outputs", omit_defaults=True):
    """Token deltas of one step (possibly none) plus the engine state after it.

    The core also sends an empty one after handling inputs and as a heartbeat
    (every second when idle, every half second when its steps produce no output),
    so the frontend's view of the queue is never stale for long and its stall
    watchdog knows the core still makes progress.
    """

    outputs: list[EngineCoreOutput]
    stats: EngineStats
    # When the step that produced `outputs` sampled them (the core's monotonic clock): one stamp
    # per message, from which the frontend takes each request's first and last token times.
    timestamp: float = 0.0
    peers: PeerLoad | None = None  # a shared core: the other frontends' load (None: one frontend)


class RequestFailed(msgspec.Struct, tag="failed"):
    """The core refused a request (validation it alone can do); the request never ran."""

    request_id: str
    message: str


class EngineFailed(msgspec.Struct, tag="fatal"):
    """The core hit an unrecoverable error (at start-up or in a step) and is exiting."""

    message: str


CoreMessage = Ready | StepOutputs | RequestFailed | EngineFailed


def encode_config(config: EngineConfig) -> bytes:
    return msgspec.json.encode(config)


def decode_config(data: bytes | str) -> EngineConfig:
    return msgspec.json.decode(data, type=EngineConfig)
