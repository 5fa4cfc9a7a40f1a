"""SLO parsing and the arithmetic of the report (percentiles, TPOT, goodput, SLO checks, groups, timeline)."""
from __future__ import annotations

import math

import pytest

from lockgate.bench.record import CANCELLED, ERROR, OK, REJECTED, RequestRecord
from lockgate.bench.slo import SLOError, SLOTerm, parse_slo
from lockgate.bench.stats import bucket_width, check_slo, dist, failures, summarize


def rec(i: int, ttft: float | None = 0.1, itl: list[float] | None = None, *, status: str = OK, out: int | None = None,
        start: float = 0.0, tenant: str = "default", cls: str = "", http: int = 200, code: str = "",
        prompt: int = 5) -> RequestRecord:
    itl = [0.02] * 4 if itl is None else itl
    e2e = None if ttft is None else ttft + sum(itl)
    r = RequestRecord(i, tenant, cls, start, start, status=status, http_status=http, error_code=code,
                      ttft_s=ttft, e2e_s=e2e, itl_s=list(itl), prompt_tokens=prompt,
                      output_tokens=(len(itl) + 1 if ttft is not None else 0) if out is None else out,
                      chunks=len(itl) + 1 if ttft is not None else 0, max_tokens=len(itl) + 1)
    return r


# ---- SLO parsing

def test_parse_slo_terms_units_and_operators() -> None:
    terms = parse_slo("ttft_p95<0.5, tpot_p99<50ms,itl_p90<=0.1,e2e_p50<2s,TTFT_P99.9<1e-1")
    assert [(t.metric, t.percentile, t.threshold_s) for t in terms] == [
        ("ttft", 95, 0.5), ("tpot", 99, 0.05), ("itl", 90, 0.1), ("e2e", 50, 2.0), ("ttft", 99.9, 0.1)]
    assert str(terms[1]) == "tpot_p99<0.05"


@pytest.mark.parametrize("bad, fragment", [
    ("", "empty"), ("ttft_p95<0.5,", "empty"), ("ttft<0.5", "bad SLO term"), ("latency_p95<1", "bad SLO term"),
    ("ttft_p95>0.5", "bad SLO term"), ("ttft_p95<abc", "bad SLO term"), ("ttft_p0<1", "percentile"),
    ("ttft_p101<1", "percentile"), ("ttft_p95<0", "positive"), ("ttft_p95<1,ttft_p95<2", "twice"),
    ("ttft_p95<1min", "bad SLO term"),
])
def test_parse_slo_rejects_bad_input(bad: str, fragment: str) -> None:
    with pytest.raises(SLOError, match=fragment):
        parse_slo(bad)


# ---- percentiles and distributions

def test_dist_fields() -> None:
    d = dist([0.4, 0.1, 0.3, 0.2])
    assert (d.count, d.min, d.max) == (4, 0.1, 0.4)
    assert d.mean == pytest.approx(0.25)
    assert d.p50 == pytest.approx(0.25) and d.p90 == pytest.approx(0.37) and d.p99 == pytest.approx(0.397)
    empty = dist([])
    assert empty.count == 0 and empty.p50 is None and empty.mean is None


def test_tpot_and_itl_per_request() -> None:
    r = rec(0, ttft=0.5, itl=[0.1, 0.2, 0.3])  # 4 tokens, e2e 1.1
    assert r.tpot_s == pytest.approx((1.1 - 0.5) / 3)
    assert r.metric(SLOTerm("itl", 50, 1.0)) == pytest.approx(0.2)
    assert r.metric(SLOTerm("e2e", 99, 1.0)) == pytest.approx(1.1)
    assert rec(1, ttft=0.5, itl=[], out=1).tpot_s is None  # one token: no TPOT
    # usage can say more tokens than chunks (a chunk with several tokens): TPOT divides by tokens
    assert rec(2, ttft=0.5, itl=[0.4], out=5).tpot_s == pytest.approx(0.1)
    assert rec(3, ttft=None, status=REJECTED, http=429).metric(SLOTerm("ttft", 50, 1)) == math.inf


# ---- goodput and SLO over a run

def test_goodput_counts_requests_within_every_term() -> None:
    terms = parse_slo("ttft_p90<0.3,tpot_p90<0.05")
    records = [
        rec(0, ttft=0.1, itl=[0.02] * 4),   # good
        rec(1, ttft=0.2, itl=[0.04] * 4),   # good
        rec(2, ttft=0.4, itl=[0.02] * 4),   # ttft too slow
        rec(3, ttft=0.1, itl=[0.09] * 4),   # tpot too slow
        rec(4, ttft=None, itl=[], status=REJECTED, http=429, code="queue_full"),
        rec(5, ttft=0.1, itl=[0.02], status=CANCELLED),  # cancelled: neither good nor counted against
    ]
    s = summarize(records, duration_s=2.0, terms=terms)
    g = s.overall
    assert (g.requests, g.ok, g.cancelled, g.rejected, g.errors) == (6, 4, 1, 1, 0)
    assert g.goodput == pytest.approx(2 / 2.0)
    assert g.goodput_fraction == pytest.approx(2 / 5)
    assert g.error_rate == pytest.approx(1 / 5)
    assert g.request_rate == pytest.approx(4 / 2.0)
    # throughput counts every token received, the cancelled stream's too
    assert g.output_tokens == 5 * 4 + 2 and g.output_token_rate == pytest.approx(22 / 2.0)
    assert g.total_token_rate == pytest.approx((22 + 6 * 5) / 2.0)
    # the run's SLO: ttft over [0.1, 0.2, 0.4, 0.1, inf] -> p90 is between 0.4 and inf: fails
    by = {t.term: t for t in g.slo}
    assert by["ttft_p90<0.3"].observed_s == math.inf and not by["ttft_p90<0.3"].passed
    assert not g.slo_passed
    # latency distributions are over completed requests only
    assert g.ttft.count == 4 and g.ttft.max == pytest.approx(0.4)


def test_no_slo_means_every_completed_request_is_good() -> None:
    s = summarize([rec(0), rec(1), rec(2, status=ERROR, ttft=None, itl=[], http=500, code="internal_error")], 1.0, [])
    assert s.overall.goodput == 2.0 and s.overall.slo_passed and s.overall.slo == []


def test_check_slo_passes_and_fails_at_the_threshold() -> None:
    records = [rec(i, ttft=0.01 * (i + 1)) for i in range(100)]  # ttft 0.01 .. 1.00
    [t] = check_slo(records, parse_slo("ttft_p95<0.96"))
    assert t.observed_s == pytest.approx(0.9505) and t.passed
    [t] = check_slo(records, parse_slo("ttft_p95<0.95"))
    assert not t.passed


def test_failures_grouped_by_status_and_code() -> None:
    records = [rec(i, ttft=None, itl=[], status=REJECTED, http=429, code="queue_full") for i in range(3)]
    records += [rec(9, ttft=None, itl=[], status=REJECTED, http=429, code="rate_limited"),
                rec(10, ttft=None, itl=[], status=ERROR, http=0, code="timeout"), rec(11)]
    f = failures(records)
    assert [(x.status, x.http_status, x.code, x.count) for x in f] == [
        ("rejected", 429, "queue_full", 3), ("rejected", 429, "rate_limited", 1), ("error", 0, "timeout", 1)]


def test_groups_by_tenant_and_class() -> None:
    records = [rec(i, tenant="a" if i % 3 else "b", cls="interactive" if i % 3 else "batch") for i in range(9)]
    s = summarize(records, 3.0, [])
    assert {k: g.requests for k, g in s.by_tenant.items()} == {"a": 6, "b": 3}
    assert {k: g.requests for k, g in s.by_class.items()} == {"batch": 3, "interactive": 6}
    assert s.by_tenant["a"].request_rate == pytest.approx(2.0)


def test_timeline_conserves_requests_and_tokens() -> None:
    records = [rec(i, ttft=0.05, itl=[0.1] * 9, start=i * 0.5) for i in range(20)]  # 10 s of sends
    dur = 20 * 0.5 + 1.0
    tl = summarize(records, dur, []).timeline
    w = bucket_width(dur)
    assert w == 0.5
    assert sum(b.sent_rate * w for b in tl) == pytest.approx(20)
    assert sum(b.completed_rate * w for b in tl) == pytest.approx(20)
    assert sum(b.output_token_rate * w for b in tl) == pytest.approx(20 * 10)
    assert [b.t_s for b in tl[:3]] == [0.0, 0.5, 1.0]
    assert bucket_width(100) == 5 and bucket_width(3600) == 100
