"""Plain records the store keeps: tenants, API keys, usage rows, reservations, audit records.

Times are Unix seconds (float). Money is USD numbers at the edges (prices are USD per 1M tokens);
the ledger stores and sums integer nano-USD (money.py), so totals are exact.
`None` in a limit means unlimited.
"""
from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field

from lockgate.store.money import cost_nano, usd

BUDGET_PERIODS = ("day", "month", "total")
SCOPES = ("inference", "admin", "metrics")
# Why a request ended, as the ledger records it.
FINISH_REASONS = ("stop", "length", "abort", "error", "rejected", "interrupted")


def name_key(name: str) -> str:
    """What makes two tenant names the same: NFKC (fullwidth, ligatures, compatibility forms) and case."""
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", name).casefold()).strip()


@dataclass(slots=True)
class Price:
    prompt: float = 0.0  # USD per 1M prompt tokens
    completion: float = 0.0  # USD per 1M completion tokens
    cached_prompt: float | None = None  # USD per 1M prompt tokens served from the prefix cache; None: = prompt
    cache_hit: float = 0.0  # USD per request answered from the response cache (its whole cost)

    def cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> float:
        """USD, from the exact nano-USD amount (store/money.py)."""
        return usd(self.cost_nano(prompt_tokens, completion_tokens, cached_tokens))

    def cost_nano(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> int:
        cached_rate = self.prompt if self.cached_prompt is None else self.cached_prompt
        cached = min(max(0, cached_tokens), max(0, prompt_tokens))
        return cost_nano(self.prompt, self.completion, cached_rate, max(0, prompt_tokens) - cached, cached,
                         max(0, completion_tokens))


@dataclass(slots=True)
class Limits:
    """Per tenant and per key; None = unlimited."""

    rpm: int | None = None  # requests per minute
    tpm: int | None = None  # tokens per minute (prompt at admission, completion as it streams)
    max_concurrency: int | None = None  # requests in flight
    max_tokens: int | None = None  # cap on a request's max_tokens


@dataclass(slots=True)
class Tenant:
    id: str
    name: str
    models: list[str] = field(default_factory=lambda: ["*"])  # "*": every model
    limits: Limits = field(default_factory=Limits)
    priority: str = "standard"  # a priority class name (gateway/classes.py)
    weight: float = 1.0  # fair share between tenants of a class: service is divided by it
    budget_usd: float | None = None
    budget_period: str = "month"  # one of BUDGET_PERIODS
    prices: dict[str, Price] = field(default_factory=dict)  # model name or "*" -> price
    created_at: float = 0.0
    updated_at: float = 0.0
    alert_thresholds: list[float] = field(default_factory=list)  # % of budget, each alerted once per period
    hedge: bool = False  # its safe non-streaming requests may be hedged (lifecycle/hedge.py)
    alert_webhook: str | None = None  # the tenant's own alert receiver (besides the server's --alert-webhook)

    def price_for(self, model: str) -> Price:
        return self.prices.get(model) or self.prices.get("*") or Price()

    def allows_model(self, model: str) -> bool:
        return "*" in self.models or model in self.models


@dataclass(slots=True)
class ApiKey:
    id: str
    tenant_id: str | None  # None: a global key (admin or metrics scope), bound to no tenant
    name: str
    prefix: str  # the key's first characters, for display ("lg-AbCd…")
    key_hash: str  # hex SHA-256 of the whole key; the key itself is never stored
    scopes: list[str] = field(default_factory=lambda: ["inference"])
    limits: Limits = field(default_factory=Limits)
    expires_at: float | None = None
    revoked_at: float | None = None
    created_at: float = 0.0
    budget_usd: float | None = None  # the key's own budget; its tenant's holds too (the stricter wins)
    budget_period: str = "month"  # one of BUDGET_PERIODS
    alert_thresholds: list[float] = field(default_factory=list)  # % of the key's budget


@dataclass(slots=True)
class Reservation:
    """A request's hold on its tenant's budget, on disk before its first token is sent."""

    request_id: str
    tenant_id: str
    key_id: str | None
    model: str
    reserved_usd: float  # worst case: prompt + max_tokens at the tenant's prices
    prompt_tokens: int
    completion_tokens: int = 0  # checkpointed while streaming (at least every second)
    cached_tokens: int = 0
    created_at: float = 0.0
    updated_at: float = 0.0
    model_version: str | None = None  # the version of `model` that served it (None: before versions)
    instance_id: str | None = None  # the gateway instance holding it (shared stores; None: single process)


@dataclass(slots=True)
class UsageRecord:
    """One row per request, written exactly once (keyed by request id)."""

    request_id: str
    tenant_id: str | None
    key_id: str | None
    model: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    queue_time_s: float | None
    ttft_s: float | None
    e2e_s: float | None
    finish_reason: str  # one of FINISH_REASONS
    status: int  # HTTP status
    cost_usd: float
    created_at: float = 0.0
    model_version: str | None = None  # the version of `model` that served it (None: before versions)
    replica: str | None = None  # the replica(s) that served it, NAME@VERSION/INDEX (None: never submitted)
    user: str | None = None  # the request's OpenAI `user` field: the tenant's own end user
    priority_class: str | None = None  # the priority class it ran in (gateway/classes.py)
    cache: str | None = None  # 'hit': answered from the response cache (gateway policies)
    attempts: str | None = None  # JSON list of the fallback attempts before the model that served
    hedged: bool = False  # a hedge copy was sent (the loser is never billed)
    router: str | None = None  # NAME/RULE of the router model that chose `model`
    spec_draft_tokens: int = 0  # tokens speculative decoding proposed for it (0: no speculation)
    spec_accepted_tokens: int = 0  # of those, the tokens verification accepted


@dataclass(slots=True)
class AuditRecord:
    id: int  # 1, 2, ... in append order
    ts: float
    actor: str  # key id, "admin-key", "cli", "system"
    action: str  # "tenant.create", "key.revoke", "bootstrap", ...
    target: str | None  # tenant or key id
    details: dict  # the change (never a secret)
    prev_hash: str
    hash: str  # SHA-256 over (prev_hash, id, ts, actor, action, target, details as canonical JSON)


@dataclass(slots=True)
class IdempotencyRecord:
    tenant_id: str
    key: str  # the client's Idempotency-Key
    body_hash: str  # SHA-256 of the request body
    request_id: str
    status: int | None  # None while the first request is still running
    response: bytes | None  # the stored response body (JSON), replayed to retries
    created_at: float = 0.0


@dataclass(slots=True)
class UsageQuery:
    """Which usage rows to read (every filter ANDed; None: any) and how to total them."""

    tenant_id: str | None = None
    model: str | None = None
    since: float | None = None  # inclusive
    until: float | None = None  # exclusive
    group_by: str = "request"  # "request" (the rows), or fields of store/usage_query.py, comma-separated
    limit: int = 1000
    key_id: str | None = None
    version: str | None = None  # NAME@VERSION, or VERSION of any model
    user: str | None = None  # the request's OpenAI `user` field
    outcome: str | None = None  # a finish reason (FINISH_REASONS), "ok" or "error"


@dataclass(slots=True)
class RefusalCount:
    """How many of a tenant's requests were refused before admission, per key, status, code and hour."""

    tenant_id: str
    key_id: str  # "" when the request had no key id
    status: int  # HTTP status answered; 0: the client left before an answer
    code: str  # OpenAI error code ("" when none)
    bucket: float  # the hour's start, Unix seconds
    count: int
