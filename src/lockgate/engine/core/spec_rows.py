"""A step's sampling rows with speculative proposals, and their verification.

A request with k proposals samples k + 1 rows: row j is position num_tokens - 1 + j, whose
context holds the first j proposals, so its penalties, bans and min_tokens see them as if they
had been sampled. Every row is drawn exactly as a one-row decode step would draw that position
(greedy: the argmax; random: the exponential race with the row's own noise, a seeded request's
from its generator in position order), and proposal j is accepted while it equals row j's
draw. The first row that disagrees gives its own draw, all k accepted give row k's as well.

This is the rejection rule of Leviathan et al. (2023) for proposals that are single tokens (an
n-gram, a greedy draft): proposal d is kept with probability p(d), and when it is not the token
comes from p without d, renormalised, which is what a draw from p conditioned on "not d" is.
The output distribution is the target's, and because each position's draw uses the noise that
position would use anyway, a seeded request gives the same tokens with speculation as without,
whatever was proposed and whatever else ran in the step. A seeded generator that drew rows past
the first rejection is rewound to just after the rows kept.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lockgate.engine.core.request import Request
from lockgate.engine.messages import TokenLogprob
from lockgate.engine.sampling_params import SamplingParams


@dataclass(slots=True)
class SpecRows:
    """Per sampling row: its request, params, prompt, output so far (proposals included) and generator."""

    requests: list[Request] = field(default_factory=list)
    params: list[SamplingParams] = field(default_factory=list)
    prompts: list[list[int]] = field(default_factory=list)
    outputs: list[list[int]] = field(default_factory=list)
    generators: list[torch.Generator | None] = field(default_factory=list)
    # Seeded random requests with proposals: their generator's state before the step's draws.
    saved: dict[int, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def lay_out(cls, reqs: list[Request], counts: list[int], device: torch.device) -> SpecRows:
        rows = cls()
        for r, count in zip(reqs, counts):
            if r.params.seed is not None and r.generator is None:
                r.generator = torch.Generator(device=device).manual_seed(r.params.seed)
            if count > 1 and r.generator is not None and not r.params.is_greedy:
                rows.saved[id(r)] = r.generator.get_state()
            for j in range(count):
                rows.requests.append(r)
                rows.params.append(r.params)
                rows.prompts.append(r.prompt_token_ids)
                rows.outputs.append(r.output_token_ids + r.spec_token_ids[:j] if j else r.output_token_ids)
                rows.generators.append(r.generator)
        return rows

    def verify(self, reqs: list[Request], counts: list[int], tokens: list[int],
               lps: list[TokenLogprob | None], vocab_size: int
               ) -> list[tuple[Request, list[int], list[TokenLogprob | None]]]:
        """Each request's new tokens: its accepted proposals and one draw (`spec_accepted` set)."""
        out = []
        row = 0
        for r, count in zip(reqs, counts):
            toks = tokens[row:row + count]
            kept = 1
            if count > 1:
                drafts = r.spec_token_ids
                a = 0
                while a < count - 1 and toks[a] == drafts[a]:
                    a += 1
                r.spec_accepted = a
                kept = a + 1
                state = self.saved.get(id(r))
                if state is not None and kept < count:
                    _rewind(r.generator, state, kept, vocab_size)
            out.append((r, toks[:kept], lps[row:row + kept]))
            row += count
        return out


def _rewind(gen: torch.Generator | None, state: torch.Tensor, draws: int, vocab_size: int) -> None:
    """Put `gen` where `draws` one-row draws from `state` leave it (the sampler's noise rows are
    float32 uniforms over the vocabulary, one row per position)."""
    assert gen is not None
    gen.set_state(state)
    scratch = torch.empty(vocab_size, dtype=torch.float32, device=gen.device)
    for _ in range(draws):
        scratch.uniform_(generator=gen)
