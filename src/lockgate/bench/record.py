"""What the client measured for one request, and the per-request latency metrics derived from it."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from lockgate.bench.slo import SLOTerm
from lockgate.stats import percentile

# status values
OK, CANCELLED, REJECTED, ERROR = "ok", "cancelled", "rejected", "error"
# HTTP statuses that mean "the server shed this request" rather than "it broke".
REJECT_STATUSES = frozenset({429, 503})


@dataclass(slots=True)
class RequestRecord:
    index: int
    tenant: str
    priority_class: str      # "" when none was sent
    scheduled_s: float       # planned send time, seconds from the phase start
    start_s: float           # actual send time, seconds from the phase start
    status: str = ERROR      # OK | CANCELLED | REJECTED | ERROR
    http_status: int = 0     # 0: no HTTP answer (connection error, timeout)
    error_code: str = ""     # the OpenAI error `code` (or our own: timeout, connection_error, ...)
    error_message: str = ""
    ttft_s: float | None = None   # send -> first non-empty content chunk
    e2e_s: float | None = None    # send -> end of stream (or the client's close, when cancelled)
    itl_s: list[float] = field(default_factory=list)  # gaps between content chunks
    prompt_tokens: int = 0    # from the usage chunk; 0 when the server sent none
    output_tokens: int = 0    # usage.completion_tokens, else the number of content chunks
    chunks: int = 0           # content chunks received
    max_tokens: int = 0       # what was asked for
    cancel_after: int = 0     # >0: the client planned to close the stream after this many chunks

    @property
    def tpot_s(self) -> float | None:
        """Mean time per output token after the first (None with fewer than 2 tokens)."""
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def metric(self, term: SLOTerm) -> float | None:
        """This request's value for an SLO term; inf for failed requests, None when it has no value."""
        if self.status in (REJECTED, ERROR):
            return math.inf
        if term.metric == "ttft":
            return self.ttft_s
        if term.metric == "tpot":
            return self.tpot_s
        if term.metric == "e2e":
            return self.e2e_s
        return percentile(self.itl_s, term.percentile) if self.itl_s else None

    def meets(self, terms: list[SLOTerm]) -> bool:
        """Completed and within every term (a metric a request cannot have, e.g. TPOT of 1 token, is met)."""
        if self.status != OK:
            return False
        for t in terms:
            v = self.metric(t)
            if v is not None and not v <= t.threshold_s:
                return False
        return True

    def token_times(self) -> list[float]:
        """Arrival times of content chunks, seconds from the phase start."""
        if self.ttft_s is None:
            return []
        t = self.start_s + self.ttft_s
        out = [t]
        for gap in self.itl_s:
            t += gap
            out.append(t)
        return out

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["tpot_s"] = self.tpot_s
        return d
