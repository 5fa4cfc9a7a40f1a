"""A core's speculative-decoding counters (cumulative), shipped in `EngineStats` like the step
histograms and summed across versions and restarts by the API process. Named after vLLM's
`spec_decode_*` metrics: proposals made, tokens proposed, tokens accepted, accepted per position."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class SpecStats:
    num_drafts: int = 0  # (request, step) pairs that carried proposals
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    # accepted_per_pos[j]: proposals at position j (0-based) that were accepted
    accepted_per_pos: list[int] = field(default_factory=list)
    # Steps with decodes where the cost curve (or disable_by_batch_size) gave no proposal row.
    num_steps_off: int = 0

    def record(self, proposed: int, accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += proposed
        self.num_accepted_tokens += accepted
        if len(self.accepted_per_pos) < proposed:
            self.accepted_per_pos.extend([0] * (proposed - len(self.accepted_per_pos)))
        for j in range(accepted):
            self.accepted_per_pos[j] += 1

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per verify step of a request that proposed: its accepted proposals plus the one drawn."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    def plus(self, other: SpecStats | None) -> SpecStats:
        """Both counts summed (a restarted core's, another version's); None adds nothing."""
        if other is None:
            return self
        a, b = self.accepted_per_pos, other.accepted_per_pos
        per = [x + y for x, y in zip(a, b)] + (a if len(a) > len(b) else b)[min(len(a), len(b)):]
        return SpecStats(self.num_drafts + other.num_drafts, self.num_draft_tokens + other.num_draft_tokens,
                         self.num_accepted_tokens + other.num_accepted_tokens, per,
                         self.num_steps_off + other.num_steps_off)
