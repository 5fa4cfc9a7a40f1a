"""Gateway policies in isolation: token buckets, concurrency, budgets under a race, key lookup."""
from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import pytest

from lockgate.gateway.auth import KeyRing
from lockgate.gateway.budget import BudgetBook, period_end, period_start
from lockgate.gateway.limits import RateLimiter
from lockgate.server.errors import APIError
from lockgate.store.models import ApiKey, Limits, Price, Tenant


def _tenant(**kw: object) -> Tenant:
    return Tenant(id="ten_a", name="a", **kw)  # type: ignore[arg-type]


def test_requests_per_minute_bucket_refills_continuously() -> None:
    lim = RateLimiter()
    st = lim.state("t:a", Limits(rpm=3), "tenant", now=0.0)
    for _ in range(3):
        lim.charge([st], now=0.0)  # a request unit is charged on arrival, refused or not
        lim.check([st], 10, now=0.0)
        lim.take([st], 10)
        lim.release([st])
    with pytest.raises(APIError) as e:
        lim.charge([st], now=0.0)
    assert e.value.status == 429 and e.value.code == "rate_limit_exceeded"
    assert e.value.headers["Retry-After"] == "20"  # one request per 20 s at 3 rpm
    assert e.value.headers["x-ratelimit-remaining-requests"] == "0"
    lim.check([st], 10, now=0.0)  # admission itself no longer looks at requests per minute
    lim.charge([st], now=20.0)  # refilled one


def test_charge_takes_from_tenant_and_key_or_from_neither() -> None:
    lim = RateLimiter()
    tenant = lim.state("t:a", Limits(rpm=5), "tenant", now=0.0)
    key = lim.state("k:a", Limits(rpm=1), "key", now=0.0)
    lim.charge([tenant, key], now=0.0)
    with pytest.raises(APIError) as e:
        lim.charge([tenant, key], now=0.0)
    assert "key rate limit reached: 1 requests per minute" in e.value.message
    assert tenant.requests is not None and tenant.requests.level == 4  # the refused call took nothing


def test_tokens_per_minute_counts_prompt_then_streamed_tokens() -> None:
    lim = RateLimiter()
    st = lim.state("t:a", Limits(tpm=100), "tenant", now=0.0)
    lim.check([st], 60, now=0.0)
    lim.take([st], 60)
    lim.consume_tokens([st], 50)  # completion tokens may overdraw
    assert st.tokens is not None and st.tokens.level == -10
    with pytest.raises(APIError) as e:
        lim.check([st], 1, now=0.0)
    assert "tokens per minute" in e.value.message
    h = lim.headers([st], now=0.0)
    assert h["x-ratelimit-limit-tokens"] == "100" and h["x-ratelimit-remaining-tokens"] == "0"
    assert h["x-ratelimit-reset-tokens"] == "1m6s"  # 110 tokens at 100/min
    with pytest.raises(APIError) as e:
        lim.check([st], 101, now=1000.0)  # can never fit
    assert "exceed" in e.value.message


def test_concurrency_is_released() -> None:
    lim = RateLimiter()
    tenant = lim.state("t:a", Limits(max_concurrency=2), "tenant", now=0.0)
    key = lim.state("k:a", Limits(max_concurrency=1), "key", now=0.0)
    lim.check([tenant, key], 1, now=0.0)
    lim.take([tenant, key], 1)
    with pytest.raises(APIError) as e:
        lim.check([tenant, key], 1, now=0.0)
    assert "key concurrency" in e.value.message
    lim.release([tenant, key])
    lim.check([tenant, key], 1, now=0.0)
    assert tenant.inflight == 0 and key.inflight == 0


def test_changed_limits_rebuild_buckets_but_keep_in_flight() -> None:
    lim = RateLimiter()
    st = lim.state("t:a", Limits(rpm=1, max_concurrency=5), "tenant", now=0.0)
    lim.take([st], 0)
    st2 = lim.state("t:a", Limits(rpm=10, max_concurrency=5), "tenant", now=0.0)
    assert st2.inflight == 1 and st2.requests is not None and st2.requests.level == 10
    lim.release([st])  # a request admitted under the old limits releases into the live counters
    assert lim.state("t:a", Limits(rpm=10, max_concurrency=5), "tenant", now=0.0).inflight == 0


def test_budget_race_admits_exactly_what_fits() -> None:
    tenant = _tenant(budget_usd=1.0, budget_period="total", prices={"*": Price(prompt=0.0, completion=1e6)})
    book = BudgetBook()
    book.load(tenant.id, "total", None, 0.0)
    worst = tenant.price_for("m").cost(10, 0.25)  # type: ignore[arg-type]
    admitted = 0
    for _ in range(20):  # 20 concurrent requests, each may cost a quarter of the budget
        try:
            book.reserve(tenant, 0.25)
            admitted += 1
        except APIError as e:
            assert e.status == 429 and e.code == "budget_exceeded" and e.type == "insufficient_quota"
    assert admitted == 4 and worst >= 0
    for _ in range(4):
        book.settle(tenant.id, 0.25, 0.1, at=0.0)  # the real cost is less than the worst case
    assert book.remaining(tenant) == pytest.approx(0.6)
    book.reserve(tenant, 0.6)
    with pytest.raises(APIError):
        book.reserve(tenant, 0.01)


def test_budget_periods_are_utc_days_and_months() -> None:
    t = datetime(2026, 12, 31, 23, 59, tzinfo=UTC).timestamp()
    day = period_start("day", t)
    month = period_start("month", t)
    assert day == datetime(2026, 12, 31, tzinfo=UTC).timestamp()
    assert month == datetime(2026, 12, 1, tzinfo=UTC).timestamp()
    assert period_end("month", month) == datetime(2027, 1, 1, tzinfo=UTC).timestamp()
    assert period_end("day", day) == datetime(2027, 1, 1, tzinfo=UTC).timestamp()
    assert period_start("total", t) is None


def test_price_cost_uses_the_cached_rate() -> None:
    p = Price(prompt=2.0, completion=4.0, cached_prompt=1.0)
    assert p.cost(1_000_000, 500_000, cached_tokens=400_000) == pytest.approx(1.2 + 0.4 + 2.0)
    assert Price(prompt=2.0).cost(10, 0, cached_tokens=10) == pytest.approx(2e-5)


def _key(secret: str, **kw: object) -> ApiKey:
    return ApiKey(id="key_1", tenant_id="ten_a", name="k", prefix=secret[:6],
                  key_hash=hashlib.sha256(secret.encode()).hexdigest(), **kw)  # type: ignore[arg-type]


def test_key_ring_authenticates_and_refuses_alike() -> None:
    ring = KeyRing(admin_key="root-secret")
    ring.load([_tenant()], [_key("lg-good"), ApiKey(id="key_2", tenant_id="ten_a", name="r", prefix="lg-rev",
                                                     key_hash=hashlib.sha256(b"lg-revoked").hexdigest(),
                                                     revoked_at=1.0),
                            ApiKey(id="key_3", tenant_id="ten_a", name="e", prefix="lg-exp",
                                   key_hash=hashlib.sha256(b"lg-expired").hexdigest(), expires_at=10.0)])
    p = ring.authenticate(b"Bearer lg-good", now=100.0)
    assert p.tenant is not None and p.tenant.id == "ten_a" and p.can_infer and not p.is_admin
    admin = ring.authenticate(b"Bearer root-secret")
    assert admin.is_admin and not admin.can_infer and admin.tenant is None
    for bad in (None, b"", b"Bearer", b"Bearer ", b"Basic lg-good", b"Bearer lg-goo", b"Bearer lg-good2",
                b"Bearer lg-revoked", b"Bearer " + b"x" * 10_000):
        with pytest.raises(APIError) as e:
            ring.authenticate(bad, now=100.0)
        assert e.value.status == 401 and e.value.code == "invalid_api_key"
        assert e.value.message == "invalid or missing API key (send `Authorization: Bearer <key>`)"
    with pytest.raises(APIError):
        ring.authenticate(b"Bearer lg-expired", now=100.0)
    assert ring.authenticate(b"Bearer lg-expired", now=5.0).key is not None
    assert ring.keyed


def test_open_mode_without_admin_key_or_tenants() -> None:
    ring = KeyRing(admin_key=None)
    assert not ring.keyed
    ring.load([_tenant()], [])
    assert ring.keyed
