"""`x-ratelimit-remaining-*` count down as OpenAI's do: the value after this request's unit was
taken, not a bucket that the request's own few milliseconds refilled."""
from __future__ import annotations

from lockgate.gateway.limits import RateLimiter
from lockgate.store.models import Limits


def _sequential(rpm: int, duration_s: float) -> list[str]:
    """Three requests one after the other, each answered `duration_s` after it arrived."""
    lim = RateLimiter()
    st = lim.state("t:a", Limits(rpm=rpm), "tenant", now=0.0)
    seen, t = [], 0.0
    for _ in range(3):
        lim.charge([st], now=t)
        t += duration_s
        seen.append(lim.headers([st], now=t)["x-ratelimit-remaining-requests"])
    return seen


def test_quick_requests_count_down() -> None:
    assert _sequential(600, 0.02) == ["599", "598", "597"]  # 10 units a second refill 0.2 per call


def test_a_slow_request_never_reads_the_full_limit() -> None:
    # 150 ms at 10 units a second refills 1.5: the headers read 600 after every request before;
    # the bucket does refill between calls, so each reads the one unit it took.
    assert _sequential(600, 0.15) == ["599", "599", "599"]


def test_reset_counts_from_the_latest_take_and_headers_change_nothing() -> None:
    lim = RateLimiter()
    st = lim.state("t:a", Limits(rpm=60, tpm=600), "tenant", now=0.0)
    lim.charge([st], now=0.0)
    lim.take([st], 300)
    h = lim.headers([st], now=0.5)
    assert h["x-ratelimit-remaining-requests"] == "59" and h["x-ratelimit-reset-requests"] == "500ms"
    assert h["x-ratelimit-remaining-tokens"] == "300" and h["x-ratelimit-reset-tokens"] == "29.5s"
    assert st.requests is not None and st.requests.level == 59  # reading headers refills nothing
    lim.charge([st], now=30.0)  # the next take counts the refill: full again, then one unit off
    assert lim.headers([st], now=30.0)["x-ratelimit-remaining-requests"] == "59"
