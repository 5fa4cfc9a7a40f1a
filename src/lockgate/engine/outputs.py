"""The engine's public outputs: what `LLM.generate` and the API process's streams yield.

`RequestOutput` (one request, its `CompletionOutput`s and engine timelines),
`RequestTimes` and `Logprob`. The payloads that cross the socket between the
API process and the engine core are in `messages.py`.
"""
from __future__ import annotations

from dataclasses import dataclass, field


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
    # Speculative decoding: tokens proposed for this request and accepted (set when it finishes).
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

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
    rank: int | None = None  # 1-based rank in the vocabulary (prompt logprobs; None where not computed)


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
    # With `prompt_logprobs` (vLLM's shape): None for the first prompt token (no context), then per
    # position a dict token id -> Logprob holding the prompt token and the top alternatives. Set on
    # every output of the request once they are known (the same list each time): from the first
    # output on (with n > 1, from the first child's first output on).
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    # Engine timelines of the children that have started (shared, updated in place as tokens come).
    engine_times: list[RequestTimes] = field(default_factory=list)
    # A pooling request (`SamplingParams.embed`), once finished: its unit-norm embedding (float32 values).
    embedding: list[float] | None = None
