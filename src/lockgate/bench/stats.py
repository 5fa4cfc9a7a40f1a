"""Aggregates over request records: latency distributions, throughput, goodput, SLO, failures, groups, timeline.

Latency distributions are over completed requests (status ok); throughput counts
every output token a client received (cancelled streams included); goodput is
completed requests per second that met every SLO term (with no SLO: every
completed request).
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from lockgate.bench.record import CANCELLED, ERROR, OK, REJECTED, RequestRecord
from lockgate.bench.slo import SLOTerm
from lockgate.stats import percentile

PERCENTILES = (50, 90, 95, 99)


@dataclass(slots=True)
class Dist:
    """A latency distribution in seconds; values are None when there were no samples."""
    count: int
    mean: float | None
    p50: float | None
    p90: float | None
    p95: float | None
    p99: float | None
    min: float | None
    max: float | None


def dist(values: Iterable[float]) -> Dist:
    xs = sorted(values)
    if not xs:
        return Dist(0, None, None, None, None, None, None, None)
    p = [percentile(xs, q) for q in PERCENTILES]
    return Dist(len(xs), sum(xs) / len(xs), *p, xs[0], xs[-1])


@dataclass(slots=True)
class TermResult:
    term: str              # e.g. "ttft_p95<0.5"
    observed_s: float | None  # the run's percentile (inf when failures dominate; None: no samples)
    passed: bool


@dataclass(slots=True)
class Failure:
    status: str       # rejected | error
    http_status: int  # 0 when there was no HTTP answer
    code: str
    count: int
    example: str      # one error message, for the operator to read


@dataclass(slots=True)
class Group:
    """The numbers for a set of requests (the whole run, one tenant or one priority class)."""
    requests: int
    ok: int
    cancelled: int
    rejected: int
    errors: int
    error_rate: float          # (rejected + errors) / (requests - cancelled)
    request_rate: float        # completed requests / s
    output_token_rate: float   # output tokens received / s
    total_token_rate: float    # (prompt + output tokens) / s
    goodput: float             # completed requests within every SLO term / s
    goodput_fraction: float    # of the requests that were not cancelled
    prompt_tokens: int
    output_tokens: int
    ttft: Dist
    tpot: Dist
    itl: Dist
    e2e: Dist
    slo_passed: bool
    slo: list[TermResult] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)


@dataclass(slots=True)
class Bucket:
    """One time slice of the run: rates of what happened in it, latency of what was sent in it."""
    t_s: float
    sent_rate: float
    completed_rate: float
    output_token_rate: float
    ttft_p50_s: float | None
    e2e_p50_s: float | None
    e2e_p95_s: float | None


@dataclass(slots=True)
class Summary:
    duration_s: float
    overall: Group
    by_tenant: dict[str, Group]
    by_class: dict[str, Group]
    timeline: list[Bucket]


def check_slo(records: list[RequestRecord], terms: list[SLOTerm]) -> list[TermResult]:
    """Each term's percentile over the non-cancelled requests, failures as inf."""
    out = []
    for t in terms:
        vals = [v for r in records if r.status != CANCELLED and (v := r.metric(t)) is not None]
        obs = percentile(vals, t.percentile) if vals else None
        out.append(TermResult(str(t), obs, obs is not None and obs <= t.threshold_s))
    return out


def failures(records: list[RequestRecord]) -> list[Failure]:
    counts: Counter[tuple[str, int, str]] = Counter()
    example: dict[tuple[str, int, str], str] = {}
    for r in records:
        if r.status in (REJECTED, ERROR):
            k = (r.status, r.http_status, r.error_code)
            counts[k] += 1
            example.setdefault(k, r.error_message[:200])
    return [Failure(s, h, c, n, example[(s, h, c)]) for (s, h, c), n in counts.most_common()]


def group(records: list[RequestRecord], duration_s: float, terms: list[SLOTerm]) -> Group:
    dur = max(duration_s, 1e-9)
    ok = [r for r in records if r.status == OK]
    n_cancel = sum(r.status == CANCELLED for r in records)
    n_rej = sum(r.status == REJECTED for r in records)
    n_err = sum(r.status == ERROR for r in records)
    live = len(records) - n_cancel
    good = sum(r.meets(terms) for r in ok)
    prompt_toks = sum(r.prompt_tokens for r in records)
    out_toks = sum(r.output_tokens for r in records)
    slo = check_slo(records, terms)
    return Group(
        requests=len(records), ok=len(ok), cancelled=n_cancel, rejected=n_rej, errors=n_err,
        error_rate=(n_rej + n_err) / live if live else 0.0,
        request_rate=len(ok) / dur, output_token_rate=out_toks / dur,
        total_token_rate=(prompt_toks + out_toks) / dur,
        goodput=good / dur, goodput_fraction=good / live if live else 0.0,
        prompt_tokens=prompt_toks, output_tokens=out_toks,
        ttft=dist(r.ttft_s for r in ok if r.ttft_s is not None),
        tpot=dist(v for r in ok if (v := r.tpot_s) is not None),
        itl=dist(g for r in ok for g in r.itl_s),
        e2e=dist(r.e2e_s for r in ok if r.e2e_s is not None),
        slo_passed=all(t.passed for t in slo), slo=slo, failures=failures(records))


def _by(records: list[RequestRecord], key: Callable[[RequestRecord], str], duration_s: float,
        terms: list[SLOTerm]) -> dict[str, Group]:
    groups: dict[str, list[RequestRecord]] = {}
    for r in records:
        groups.setdefault(key(r), []).append(r)
    return {k: group(v, duration_s, terms) for k, v in sorted(groups.items())}


def bucket_width(duration_s: float) -> float:
    """About 40 slices per run, never under 0.5 s (shorter slices are mostly noise), on a 1-2-5 grid."""
    raw = max(duration_s / 40.0, 0.5)
    mag = 10 ** math.floor(math.log10(raw))
    return next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw - 1e-12)


def timeline(records: list[RequestRecord], duration_s: float) -> list[Bucket]:
    width = bucket_width(duration_s)
    n = max(1, math.ceil(duration_s / width - 1e-9))
    sent = [0] * n
    done = [0] * n
    toks = [0.0] * n
    ttft: list[list[float]] = [[] for _ in range(n)]
    e2e: list[list[float]] = [[] for _ in range(n)]

    def idx(t: float) -> int:
        return min(n - 1, max(0, int(t / width)))

    for r in records:
        i = idx(r.start_s)
        sent[i] += 1
        if r.status == OK and r.e2e_s is not None:
            done[idx(r.start_s + r.e2e_s)] += 1
            e2e[i].append(r.e2e_s)
        if r.status == OK and r.ttft_s is not None:
            ttft[i].append(r.ttft_s)
        times = r.token_times()
        per_chunk = r.output_tokens / len(times) if times else 0.0  # a chunk may carry several tokens
        for t in times:
            toks[idx(t)] += per_chunk

    def p(xs: list[float], q: float) -> float | None:
        return percentile(xs, q) if xs else None

    return [Bucket(round(i * width, 6), sent[i] / width, done[i] / width, toks[i] / width,
                   p(ttft[i], 50), p(e2e[i], 50), p(e2e[i], 95)) for i in range(n)]


def summarize(records: list[RequestRecord], duration_s: float, terms: list[SLOTerm]) -> Summary:
    return Summary(
        duration_s=duration_s,
        overall=group(records, duration_s, terms),
        by_tenant=_by(records, lambda r: r.tenant, duration_s, terms),
        by_class=_by(records, lambda r: r.priority_class or "-", duration_s, terms),
        timeline=timeline(records, duration_s))
