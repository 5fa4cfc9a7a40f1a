"""Prometheus metrics, named like vLLM's (`lockgate:` instead of `vllm:`).

Engine gauges and per-step histograms are read from the client's latest engine
state at scrape time (the core aggregates them; nothing is observed in its
loop); SLO gauges from the SLO tracker; per-request counters and histograms are
fed by `RequestTracker`. Request-level metrics carry `tenant` (bounded: see
`observability/labels.py`) and `class` labels besides `model_name`.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from lockgate.engine.frontend.supervisor import EngineState
from lockgate.engine.outputs import RequestOutput, RequestTimes
from lockgate.engine.step_stats import ITERATION_TOKENS_BUCKETS, STEP_SECONDS_BUCKETS, HistogramCounts
from lockgate.observability.record import RequestRecord
from lockgate.observability.slo import WINDOWS, SloTracker

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                1.0, 2.5, 5.0, 10.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)
REQUEST_LABELS = ["model_name", "tenant", "class"]


def _histogram(name: str, doc: str, model: str, h: HistogramCounts | None,
               bounds: tuple[float, ...]) -> HistogramMetricFamily:
    fam = HistogramMetricFamily(name, doc, labels=["model_name"])
    h = h or HistogramCounts()
    fam.add_metric([model], [(floatToGoString(b), n) for b, n in h.cumulative(bounds)], sum_value=h.sum)
    return fam


class _EngineCollector(Collector):
    def __init__(self, state: Callable[[], EngineState], model_name: str) -> None:
        self.state = state
        self.model_name = model_name

    def collect(self) -> Iterable[Metric]:
        s = self.state()
        m = self.model_name

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric([m], value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric([m], value)
            return c

        yield gauge("lockgate:num_requests_running", "Requests running in the engine (in the batch).",
                    s.num_running)
        yield gauge("lockgate:num_requests_waiting", "Requests waiting in the engine's queue.", s.num_waiting)
        yield gauge("lockgate:num_waiting_tokens", "Prompt tokens of the requests waiting in the engine.",
                    s.num_waiting_tokens)
        yield gauge("lockgate:kv_cache_usage_perc", "Fraction of KV-cache blocks held by live requests (0-1).",
                    s.kv_cache_usage)
        yield gauge("lockgate:kv_cache_free_blocks", "KV-cache blocks not held by any live request.",
                    s.num_free_blocks)
        yield gauge("lockgate:kv_cache_total_blocks", "KV-cache blocks in the pool.", s.num_total_blocks)
        yield gauge("lockgate:num_requests_queued", "Accepted requests with no output yet (the bounded queue).",
                    s.num_queued_requests)
        yield gauge("lockgate:num_tokens_queued", "Prompt tokens of the accepted requests with no output yet.",
                    s.num_queued_tokens)
        yield gauge("lockgate:num_requests_in_flight", "Requests between acceptance and their last output.",
                    s.num_in_flight)
        yield gauge("lockgate:engine_healthy", "1 while the engine-core process is up and serving.",
                    1.0 if s.healthy else 0.0)
        yield counter("lockgate:num_preemptions", "Requests preempted (KV blocks ran out).", s.num_preemptions)
        yield counter("lockgate:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      s.prefix_cache_queries)
        yield counter("lockgate:prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                      s.prefix_cache_hits)
        yield counter("lockgate:engine_restarts", "Engine-core processes restarted after dying.",
                      s.num_restarts)
        yield counter("lockgate:engine_stalls", "Engine cores killed by the watchdog after making no progress.",
                      s.num_stalls)
        yield _histogram("lockgate:engine_step_seconds", "Duration of an engine step (schedule, model, sampling).",
                         m, s.step_seconds, STEP_SECONDS_BUCKETS)
        yield _histogram("lockgate:iteration_tokens_total",
                         "Tokens per engine step: prompt tokens computed plus tokens sampled.",
                         m, s.iteration_tokens, ITERATION_TOKENS_BUCKETS)


class _SloCollector(Collector):
    """Burn rates, attainment and error budget per class, from the SLO tracker at scrape time."""

    def __init__(self, slo: SloTracker) -> None:
        self.slo = slo

    def collect(self) -> Iterable[Metric]:
        burn = GaugeMetricFamily("lockgate:slo_burn_rate", "Error-budget burn rate per class and window "
                                 "(error rate / (1 - objective); 1 spends the budget over the period).",
                                 labels=["class", "window"])
        attain = GaugeMetricFamily("lockgate:slo_attainment", "Fraction of a class's requests over the SLO "
                                   "period that met its TTFT and TPOT targets (NaN: none yet).", labels=["class"])
        budget = GaugeMetricFamily("lockgate:slo_error_budget_remaining", "Fraction of the error budget left "
                                   "over the SLO period (negative: overspent).", labels=["class"])
        objective = GaugeMetricFamily("lockgate:slo_objective", "Target fraction of good requests per class.",
                                      labels=["class"])
        events = CounterMetricFamily("lockgate:slo_requests", "SLO events per class since start, good or bad.",
                                     labels=["class", "outcome"])
        for rep in self.slo.reports():
            for window in WINDOWS:
                burn.add_metric([rep.name, window], rep.burn_rates[window])
            attain.add_metric([rep.name], math.nan if rep.attainment is None else rep.attainment)
            budget.add_metric([rep.name], rep.error_budget_remaining)
            objective.add_metric([rep.name], rep.objective)
            total, good = self.slo.totals[rep.name]
            events.add_metric([rep.name, "good"], good)
            events.add_metric([rep.name, "bad"], total - good)
        yield from (burn, attain, budget, objective, events)


class ServerMetrics:
    def __init__(self, model_name: str, state: Callable[[], EngineState]) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        r, lbl, req = self.registry, ["model_name"], REQUEST_LABELS

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, req, buckets=buckets, registry=r)

        self.prompt_tokens = Counter("lockgate:prompt_tokens", "Prompt tokens processed.", req, registry=r)
        self.generation_tokens = Counter("lockgate:generation_tokens", "Tokens generated.", req, registry=r)
        self.request_success = Counter("lockgate:request_success", "Requests that finished, by finish reason.",
                                       req + ["finished_reason"], registry=r)
        self.request_failure = Counter("lockgate:request_failure", "Requests that ended in an error, by cause.",
                                       req + ["reason"], registry=r)
        self.requests_rejected = Counter("lockgate:requests_rejected",
                                         "Requests refused before admission, by reason and priority class.",
                                         lbl + ["reason", "class"], registry=r)
        self.cost = Counter("lockgate:cost_usd", "Cost billed to tenants (USD, the usage ledger's prices).",
                            req, registry=r)
        self.ttft = hist("lockgate:time_to_first_token_seconds", "Time to the first token.", _LATENCY_BUCKETS)
        self.itl = hist("lockgate:time_per_output_token_seconds",
                        "Time between output tokens (the same samples as inter_token_latency_seconds).", _ITL_BUCKETS)
        self.inter_token = hist("lockgate:inter_token_latency_seconds", "Time between output tokens.", _ITL_BUCKETS)
        self.e2e = hist("lockgate:e2e_request_latency_seconds", "Request latency, arrival to last token.",
                        _LATENCY_BUCKETS)
        self.queue_time = hist("lockgate:request_queue_time_seconds",
                               "Engine queue wait: entry in the engine core to first scheduled.", _LATENCY_BUCKETS)
        self.prefill_time = hist("lockgate:request_prefill_time_seconds",
                                 "First scheduled to first token (engine clock).", _LATENCY_BUCKETS)
        self.decode_time = hist("lockgate:request_decode_time_seconds",
                                "First token to last token (engine clock; completed requests).", _LATENCY_BUCKETS)
        self.inference_time = hist("lockgate:request_inference_time_seconds",
                                   "First scheduled to last token (engine clock; completed requests).",
                                   _LATENCY_BUCKETS)
        self.prompt_hist = hist("lockgate:request_prompt_tokens", "Prompt tokens per request.", _TOKEN_BUCKETS)
        self.generation_hist = hist("lockgate:request_generation_tokens", "Generated tokens per request.",
                                    _TOKEN_BUCKETS)
        self.max_generation_hist = hist("lockgate:request_max_num_generation_tokens",
                                        "Tokens of a request's longest choice (n > 1: the most any choice made).",
                                        _TOKEN_BUCKETS)
        self.http_responses = Counter("lockgate:http_responses", "HTTP responses by route and status code.",
                                      ["route", "status"], registry=r)
        self.http_errors = Counter("lockgate:http_errors", "Error responses by status and error code.",
                                   ["status", "code"], registry=r)
        self.max_queued = Gauge("lockgate:max_queued_requests", "The waiting queue's bound "
                                "(--max-queued-requests): num_requests_queued over it is saturation.",
                                lbl, registry=r)
        r.register(_EngineCollector(state, model_name))
        # Smoothed time to first token: the Retry-After hint for a full queue.
        self.ttft_ema_s = 1.0

    def register_slo(self, slo: SloTracker) -> None:
        self.registry.register(_SloCollector(slo))

    def reject(self, reason: str, cls: str = "none") -> None:
        # Class names come from the server's config, never from client input: bounded cardinality.
        self.requests_rejected.labels(self.model_name, reason, cls).inc()

    def http_response(self, route: str, status: int) -> None:
        self.http_responses.labels(route, str(status)).inc()

    def error(self, status: int, code: str | None) -> None:
        # Codes come from our own raise sites, never from client input: bounded cardinality.
        self.http_errors.labels(str(status), code or "none").inc()

    def fail(self, reason: str, tenant: str = "none", cls: str = "none") -> None:
        self.request_failure.labels(self.model_name, tenant, cls, reason).inc()

    def charge(self, record: RequestRecord) -> None:
        """The settled cost of a keyed request (after its usage row was computed)."""
        cost = record.cost_usd
        if cost is not None:
            self.cost.labels(self.model_name, record.tenant, record.class_name).inc(cost)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def tracker(self, num_prompt_tokens: int, record: RequestRecord | None = None) -> RequestTracker:
        return RequestTracker(self, num_prompt_tokens, record)


class RequestTracker:
    """One HTTP request's metrics (all its prompts and choices); its tokens and their times are
    taken once, by its `RequestRecord`."""

    __slots__ = ("m", "record", "labels", "arrival", "num_prompt_tokens", "done", "on_tokens", "on_finish",
                 "_times", "_cached", "_itl", "_inter")

    def __init__(self, metrics: ServerMetrics, num_prompt_tokens: int, record: RequestRecord | None = None) -> None:
        self.m = metrics
        self.record = record if record is not None else RequestRecord("", "")
        r = self.record
        self.labels = (metrics.model_name, r.tenant, r.class_name)
        self.arrival = r.started  # TTFT from the request's arrival (as the ledger's and what a client sees)
        self.num_prompt_tokens = num_prompt_tokens
        self.done = False
        # Hooks for the request pipeline: tokens as they stream (the usage meter), how the request ended.
        self.on_tokens: Callable[[int, int], None] | None = None
        self.on_finish: Callable[[list[str | None] | None, str | None], None] | None = None
        self._times: dict[str, list[RequestTimes]] = {}  # per engine stream: its children's timelines
        self._cached: dict[str, int] = {}  # per engine stream: prompt tokens from the prefix cache
        self._itl = metrics.itl.labels(*self.labels)  # bound once: observed per output
        self._inter = metrics.inter_token.labels(*self.labels)

    @property
    def num_generated(self) -> int:
        return self.record.completion_tokens

    def on_output(self, out: RequestOutput) -> None:
        r = self.record
        now = time.monotonic()
        previous = r.last_token
        new = r.observe(out, now)
        if self.on_tokens is not None:
            self.on_tokens(new, out.num_cached_tokens)
        if out.request_id not in self._times:
            self._times[out.request_id] = out.engine_times  # the stream's list, filled in place
        if out.num_cached_tokens:
            self._cached[out.request_id] = out.num_cached_tokens
        if not new:
            return
        if previous is None:
            ttft = now - self.arrival
            self.m.ttft.labels(*self.labels).observe(ttft)
            self.m.ttft_ema_s = 0.9 * self.m.ttft_ema_s + 0.1 * ttft
        else:
            gap = (now - previous) / new
            self._itl.observe(gap)
            self._inter.observe(gap)

    def finish(self, finish_reasons: list[str | None] | None, error: str | None = None) -> None:
        """Record once: `error` set -> a failure; otherwise success by finish reason."""
        if self.done:
            return
        self.done = True
        r = self.record
        r.completed, r.error, r.finish_reasons = error is None, error, finish_reasons
        r.engine_times = [t for ts in self._times.values() for t in ts]
        r.prompt_tokens = self.num_prompt_tokens
        r.cached_tokens = sum(self._cached.values())
        if self.on_finish is not None:
            self.on_finish(finish_reasons, error)
        m, lbl = self.m, self.labels
        m.prompt_tokens.labels(*lbl).inc(self.num_prompt_tokens)
        m.generation_tokens.labels(*lbl).inc(self.num_generated)
        for t in r.engine_times:  # every engine request that started, however it ended
            m.queue_time.labels(*lbl).observe(t.queue_s)
            m.prefill_time.labels(*lbl).observe(t.prefill_s)
        if error is not None:
            m.fail(error, r.tenant, r.class_name)
            return
        m.e2e.labels(*lbl).observe(time.monotonic() - self.arrival)
        m.prompt_hist.labels(*lbl).observe(self.num_prompt_tokens)
        m.generation_hist.labels(*lbl).observe(self.num_generated)
        m.max_generation_hist.labels(*lbl).observe(r.max_choice_tokens)
        for t in r.engine_times:
            m.decode_time.labels(*lbl).observe(t.decode_s)
            m.inference_time.labels(*lbl).observe(t.inference_s)
        for reason in finish_reasons or ["stop"]:
            m.request_success.labels(*lbl, reason or "stop").inc()
