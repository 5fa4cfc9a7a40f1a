"""`RequestGrammar`: one request's grammar state in the core (its compile, then its own matcher).

It belongs to the request (`Request.grammar`), not to a step: a request preempted by
recompute keeps its matcher, which has consumed exactly the request's output tokens
(those stay in the request and are recomputed, not sampled again), so decoding goes
on from the same grammar state. Each of `n` children has its own.
"""
from __future__ import annotations

from llguidance import LLMatcher

from lockgate.engine.structured.compiler import CompileJob


class RequestGrammar:
    __slots__ = ("job", "matcher", "eos_token_ids")

    def __init__(self, job: CompileJob, eos_token_ids: set[int]) -> None:
        self.job = job
        self.matcher: LLMatcher | None = None
        self.eos_token_ids = eos_token_ids

    @property
    def ready(self) -> bool:
        """Compiled and matched (the scheduler's question: may this request run?)."""
        if self.matcher is None:
            compiled = self.job.compiled if self.job.done else None
            if compiled is None:
                return False
            self.matcher = compiled.template.deep_copy()
        return True

    @property
    def error(self) -> str | None:
        return self.job.error if self.job.done else None

    @property
    def complete(self) -> bool:
        """The grammar is satisfied and allows nothing but EOS: the next token is EOS."""
        return self.matcher is not None and self.matcher.is_stopped()

    def accept(self, token: int) -> str | None:
        """Advance with a sampled token: "stop" when the request is done (EOS after a complete
        grammar), None to go on; ValueError when the grammar rejects the token."""
        m = self.matcher
        assert m is not None
        if not m.consume_token(token):
            raise ValueError(
                "structured_outputs: the grammar rejected the sampled token (other sampling settings, such "
                "as allowed_token_ids or bad_words, may exclude every token it allows)")
        if m.is_stopped() and token in self.eos_token_ids:
            return "stop"
        return None
