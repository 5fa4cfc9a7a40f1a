"""A request's state inside the engine core (scheduler, KV cache and runner share it)."""
from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any

from lockgate.engine.messages import EngineCoreRequest, TokenLogprob
from lockgate.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch

    from lockgate.engine.structured.matcher import RequestGrammar


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Request:
    """Token ids (prompt then output), how many of them have KV in the cache, and its blocks.

    Prefill and decode are the same thing here: each step computes
    `num_tokens - num_computed_tokens` tokens (or a chunk of them); when the
    computed count reaches `num_tokens`, the step samples one more token.
    """

    __slots__ = (
        "request_id", "prompt_token_ids", "output_token_ids", "params", "arrival_time",
        "priority", "cache_salt", "share_prefix_with", "status", "num_computed_tokens",
        "block_ids", "block_hashes", "num_cached_tokens", "generator", "eos_token_ids",
        "max_tokens", "stop_token_ids", "num_preemptions", "tenant", "tenant_weight",
        "enqueue_time", "seq", "prompt_logprobs", "num_prompt_logprobs", "grammar",
        "pooled", "num_pooled", "embedding", "spec_token_ids", "spec_accepted", "num_draft_tokens",
        "num_accepted_tokens",
    )

    def __init__(self, req: EngineCoreRequest, eos_token_ids: list[int], max_tokens: int) -> None:
        self.request_id = req.request_id
        self.prompt_token_ids = list(req.prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params: SamplingParams = req.params
        self.arrival_time = req.arrival_time
        self.priority = req.priority
        self.cache_salt = req.cache_salt
        self.share_prefix_with = req.share_prefix_with
        self.status = RequestStatus.WAITING
        self.num_computed_tokens = 0
        self.block_ids: list[int] = []
        self.block_hashes: list[bytes] = []  # hashes of full blocks, chained from the salt
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at admission
        self.generator: torch.Generator | None = None
        self.eos_token_ids = set() if req.params.ignore_eos else set(eos_token_ids)
        self.stop_token_ids = set(req.params.stop_token_ids or ())
        self.max_tokens = max_tokens
        self.num_preemptions = 0
        self.tenant = req.tenant
        self.tenant_weight = req.tenant_weight
        # Set by the scheduler on `add`, from its own clock: aging counts from here (a preempted
        # request keeps it), and `seq` breaks ties between equal arrival times.
        self.enqueue_time = 0.0
        self.seq = 0
        # Prompt logprobs (only when asked): entries computed but not yet sent, and how many
        # positions have one (sent or not). Kept across preemption, so a recompute neither
        # computes nor sends them twice; the first output carries them out.
        self.prompt_logprobs: list[TokenLogprob] | None = [] if req.params.prompt_logprobs is not None else None
        self.num_prompt_logprobs = 0
        # Structured outputs: the compile, then this request's own matcher (engine/structured/). It
        # survives preemption: the matcher has consumed exactly `output_token_ids`, which a recompute
        # keeps, so decoding resumes from the same grammar state.
        self.grammar: RequestGrammar | None = None
        # Pooling (`params.embed`): the float32 sum of the hidden states of prompt positions
        # [0, num_pooled) (the runner's tensor or array), kept across preemption like prompt logprobs,
        # so a recompute adds no position twice; then the final vector, as little-endian float32 bytes.
        self.pooled: Any = None
        self.num_pooled = 0
        self.embedding: bytes | None = None
        # Speculative decoding: this step's proposals (positions num_tokens.. of the step's extra
        # rows), how many of them the step accepted, and the request's totals (its ledger entry).
        self.spec_token_ids: list[int] = []
        self.spec_accepted = 0
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0

    @property
    def grammar_pending(self) -> bool:
        """A constrained request whose grammar is still compiling: not scheduled yet."""
        return self.grammar is not None and not self.grammar.ready

    def prompt_logprob_span(self, start: int, end: int) -> tuple[int, int]:
        """The positions in [start, end) still owing a prompt logprob (position p scores prompt
        token p + 1): an empty span (lo >= hi) for requests that did not ask or owe nothing."""
        if self.prompt_logprobs is None:
            return 0, 0
        return max(start, self.num_prompt_logprobs), min(end, len(self.prompt_token_ids) - 1)

    def pool_span(self, start: int, end: int) -> tuple[int, int]:
        """The prompt positions in [start, end) not yet pooled: an empty span (lo >= hi) for
        requests that do not pool or owe nothing."""
        if not self.params.embed:
            return 0, 0
        return max(start, self.num_pooled), min(end, len(self.prompt_token_ids))

    @property
    def prompt_logprobs_done(self) -> bool:
        return self.num_prompt_logprobs >= len(self.prompt_token_ids) - 1

    def take_prompt_logprobs(self) -> list[TokenLogprob] | None:
        """The entries computed since the last call (the first output takes them all)."""
        out = self.prompt_logprobs
        if out is not None:
            self.prompt_logprobs = []
        return out

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output without building the concatenation; positions
        past the known tokens are this step's proposals (speculative decoding)."""
        n = self.num_tokens
        if end > n:
            return self.token_ids(start, n) + self.spec_token_ids[max(0, start - n):end - n]
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    @property
    def is_prefill_done(self) -> bool:
        return self.num_computed_tokens >= self.num_prompt_tokens

    @property
    def is_decode(self) -> bool:
        """One token left and the prompt done: the step computes its last token and samples."""
        return self.num_computed_tokens >= self.num_prompt_tokens and self.num_tokens - self.num_computed_tokens == 1

    def sort_key(self) -> tuple[int, float, int]:
        """Lower is more important: priority value first, then arrival (fcfs policy)."""
        return (self.priority, self.arrival_time, self.seq)
