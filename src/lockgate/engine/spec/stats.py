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
    # proposed_per_pos[j]: proposals made at position j (the acceptance rate per position's denominator)
    proposed_per_pos: list[int] = field(default_factory=list)

    def record(self, proposed: int, accepted: int) -> None:
        self.num_drafts += 1
        self.num_draft_tokens += proposed
        self.num_accepted_tokens += accepted
        for per in (self.accepted_per_pos, self.proposed_per_pos):
            if len(per) < proposed:
                per.extend([0] * (proposed - len(per)))
        for j in range(proposed):
            self.proposed_per_pos[j] += 1
        for j in range(accepted):
            self.accepted_per_pos[j] += 1

    def acceptance_per_pos(self) -> list[float]:
        return [a / p if p else 0.0 for a, p in zip(self.accepted_per_pos, self.proposed_per_pos)]

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
        return SpecStats(self.num_drafts + other.num_drafts, self.num_draft_tokens + other.num_draft_tokens,
                         self.num_accepted_tokens + other.num_accepted_tokens,
                         _sum(self.accepted_per_pos, other.accepted_per_pos),
                         self.num_steps_off + other.num_steps_off,
                         _sum(self.proposed_per_pos, other.proposed_per_pos))


def _sum(a: list[int], b: list[int]) -> list[int]:
    return [x + y for x, y in zip(a, b)] + (a if len(a) > len(b) else b)[min(len(a), len(b)):]
