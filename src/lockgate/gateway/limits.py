"""Rate limits per tenant and per key: requests/min, tokens/min, concurrent requests.

Requests and tokens per minute are token buckets (capacity = the per-minute
limit, refilled continuously), which is what OpenAI's `x-ratelimit-*` headers
describe: the limit, what remains after this request's unit was taken (the refill since then
counts from the next take, so quick requests read 599, 598, 597 as OpenAI's do), and how long
until the bucket is full.
A request unit is charged for every call on an inference route as soon as its
key is known (`charge`), refused or not, so malformed, oversized or forbidden
calls cost the caller its rate like any other; prompt tokens are taken at
admission; completion tokens as they stream, which may drive the bucket below
zero (the next request then waits). Check and take happen with no await
between them, so concurrent requests cannot overshoot.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from lockgate.errors import APIError
from lockgate.store.models import Limits


@dataclass(slots=True)
class TokenBucket:
    capacity: float
    level: float
    updated: float

    @classmethod
    def full(cls, capacity: int, now: float) -> TokenBucket:
        return cls(float(capacity), float(capacity), now)

    @property
    def rate(self) -> float:  # per second
        return self.capacity / 60.0

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
            self.updated = now

    def wait_s(self, amount: float, now: float) -> float:
        """Seconds until `amount` can be taken (0: now)."""
        self.refill(now)
        missing = amount - self.level
        return 0.0 if missing <= 0 else missing / self.rate

    def reset_s(self, now: float) -> float:
        """Seconds until the bucket is full again."""
        self.refill(now)
        return max(0.0, (self.capacity - self.level) / self.rate)

    def remaining(self) -> int:
        """What the latest take left, refill since then not counted (it counts from the next take):
        as OpenAI's headers, a burst of requests reads 599, 598, 597 against rpm=600, not 600 each
        time because the few milliseconds a request took refilled its own unit."""
        return max(0, int(self.level))

    def reset_from(self, now: float) -> float:
        """Seconds from `now` until the bucket is full again, without touching its level."""
        return max(0.0, (self.capacity - self.level) / self.rate - max(0.0, now - self.updated))


@dataclass(slots=True)
class LimitState:
    """The live counters of one tenant or key."""

    limits: Limits
    requests: TokenBucket | None
    tokens: TokenBucket | None
    inflight: int = 0
    label: str = "tenant"  # for messages: "tenant" | "key"


def _fmt(seconds: float) -> str:
    """OpenAI's reset format: '20ms', '1.5s', '6m0s'."""
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    if seconds < 60:
        return f"{seconds:.3g}s"
    m, s = divmod(int(math.ceil(seconds)), 60)
    return f"{m}m{s}s"


class RateLimiter:
    def __init__(self) -> None:
        self._states: dict[str, LimitState] = {}

    def state(self, scope_id: str, limits: Limits, label: str, now: float) -> LimitState:
        """The counters for a tenant ('t:<id>') or key ('k:<id>'). When its limits change the buckets
        are rebuilt in place: requests in flight keep releasing into the same object."""
        st = self._states.get(scope_id)
        if st is not None and st.limits == limits:
            return st
        lim = Limits(limits.rpm, limits.tpm, limits.max_concurrency, limits.max_tokens)
        requests = TokenBucket.full(lim.rpm, now) if lim.rpm is not None else None
        tokens = TokenBucket.full(lim.tpm, now) if lim.tpm is not None else None
        if st is None:
            st = self._states[scope_id] = LimitState(lim, requests, tokens, label=label)
        else:
            st.limits, st.requests, st.tokens = lim, requests, tokens
        return st

    @staticmethod
    def charge(states: list[LimitState], now: float) -> None:
        """One request unit from every bucket, or 429 with Retry-After and nothing taken."""
        for st in states:
            if st.requests is not None:
                wait = st.requests.wait_s(1, now)
                if wait > 0:
                    raise _limited(f"{st.label} rate limit reached: {st.limits.rpm} requests per minute", wait,
                                   states, now)
        for st in states:
            if st.requests is not None:
                st.requests.level -= 1

    def check(self, states: list[LimitState], prompt_tokens: int, now: float) -> None:
        """429 with Retry-After when concurrency or tokens per minute would be exceeded; takes nothing
        (the request unit was charged on arrival)."""
        for st in states:
            lim = st.limits
            if lim.max_concurrency is not None and st.inflight >= lim.max_concurrency:
                raise _limited(f"{st.label} concurrency limit reached: {st.inflight} of {lim.max_concurrency} "
                               "requests in flight", 1.0, states, now)
            if st.tokens is not None:
                if prompt_tokens > st.tokens.capacity:
                    raise _limited(f"the request's {prompt_tokens} prompt tokens exceed the {st.label} limit of "
                                   f"{lim.tpm} tokens per minute", 60.0, states, now)
                wait = st.tokens.wait_s(prompt_tokens, now)
                if wait > 0:
                    raise _limited(f"{st.label} rate limit reached: {lim.tpm} tokens per minute", wait, states, now)

    @staticmethod
    def take(states: list[LimitState], prompt_tokens: int) -> None:
        for st in states:
            st.inflight += 1
            if st.tokens is not None:
                st.tokens.level -= prompt_tokens

    @staticmethod
    def release(states: list[LimitState]) -> None:
        for st in states:
            st.inflight -= 1

    @staticmethod
    def consume_tokens(states: list[LimitState], n: int) -> None:
        """Completion tokens as they stream (may go below zero: later requests wait)."""
        for st in states:
            if st.tokens is not None:
                st.tokens.level -= n

    @staticmethod
    def headers(states: list[LimitState], now: float) -> dict[str, str]:
        """x-ratelimit-* for the tightest request and token limits (none when unlimited)."""
        out: dict[str, str] = {}
        for kind, buckets in (("requests", [s.requests for s in states]), ("tokens", [s.tokens for s in states])):
            live = [b for b in buckets if b is not None]
            if not live:
                continue
            # No refill here: the level is what this request's own charge (or a later one's) left.
            tight = min(live, key=lambda b: b.level)
            out[f"x-ratelimit-limit-{kind}"] = str(int(tight.capacity))
            out[f"x-ratelimit-remaining-{kind}"] = str(tight.remaining())
            out[f"x-ratelimit-reset-{kind}"] = _fmt(tight.reset_from(now))
        return out


def _limited(message: str, wait_s: float, states: list[LimitState], now: float) -> APIError:
    retry = max(1, math.ceil(wait_s))
    headers = {"Retry-After": str(retry), **RateLimiter.headers(states, now)}
    return APIError(429, f"{message}; retry after {retry} s", code="rate_limit_exceeded", headers=headers)
