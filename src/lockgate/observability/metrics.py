"""Prometheus metrics, named like vLLM's (`lockgate:` instead of `vllm:`).

Engine gauges and per-step histograms are read from the client's latest engine
state at scrape time (the core aggregates them; nothing is observed in its
loop); SLO gauges from the SLO tracker; per-request counters and histograms are
fed by `RequestTracker`. Request-level metrics carry `tenant` (bounded: see
`observability/labels.py`) and `class` labels besides `model_name`.

Several API workers (`--api-workers N`): `workers` is set, and the page merges every worker's
metrics (worker_metrics.py); the registry keeps the scrape-time collectors apart for that.
"""
from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from lockgate.engine.frontend.supervisor import EngineState
from lockgate.engine.outputs import RequestOutput, RequestTimes
from lockgate.engine.step_stats import ITERATION_TOKENS_BUCKETS, STEP_SECONDS_BUCKETS, HistogramCounts
from lockgate.engine.spec.stats import SpecStats
from lockgate.engine.structured.stats import COMPILE_RESULTS, MASK_SECONDS_BUCKETS, StructuredStats
from lockgate.observability.record import RequestRecord
from lockgate.observability.slo import WINDOWS, SloTracker
from lockgate.observability.worker_metrics import WorkerMetrics

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                1.0, 2.5, 5.0, 10.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)
REQUEST_LABELS = ["model_name", "tenant", "class"]
_Child = Any  # a labelled metric's child (prometheus_client types them as the metric itself)


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
        yield from _structured(m, s.structured or StructuredStats())
        yield from _speculative(m, s.spec or SpecStats())


def _speculative(m: str, st: SpecStats) -> Iterable[Metric]:
    """Speculative decoding, named as vLLM's spec_decode_* metrics (rates are PromQL ratios of these:
    acceptance = accepted / draft tokens; mean accepted length = 1 + accepted / drafts)."""
    for name, doc, value in (
            ("lockgate:spec_decode_num_drafts", "Verify steps of a request that carried proposals.", st.num_drafts),
            ("lockgate:spec_decode_num_draft_tokens", "Tokens proposed by speculative decoding.",
             st.num_draft_tokens),
            ("lockgate:spec_decode_num_accepted_tokens", "Proposed tokens the model accepted.",
             st.num_accepted_tokens),
            ("lockgate:spec_decode_steps_off", "Steps whose proposals the step cost plan left out (a batch too "
             "big, or acceptance too low, for extra rows to pay).", st.num_steps_off)):
        c = CounterMetricFamily(name, doc, labels=["model_name"])
        c.add_metric([m], value)
        yield c
    per = CounterMetricFamily("lockgate:spec_decode_num_accepted_tokens_per_pos", "Accepted proposals by their "
                              "position in the step's proposals (0: the first).", labels=["model_name", "position"])
    for pos, n in enumerate(st.accepted_per_pos):
        per.add_metric([m, str(pos)], n)
    yield per
    made = CounterMetricFamily("lockgate:spec_decode_num_draft_tokens_per_pos", "Proposals made at each position "
                               "(the acceptance rate per position is accepted / these).",
                               labels=["model_name", "position"])
    for pos, n in enumerate(st.proposed_per_pos):
        made.add_metric([m, str(pos)], n)
    yield made


def _structured(m: str, st: StructuredStats) -> Iterable[Metric]:
    """Structured outputs: grammar compiles by result, compile time, cache lookups, bitmask time."""
    compiles = CounterMetricFamily("lockgate:structured_compiles", "Grammar compiles by result: ok, error (did "
                                   "not compile), timeout (over the limit), rejected (tenant's queue full or "
                                   "known too slow).", labels=["model_name", "result"])
    for result, n in zip(COMPILE_RESULTS, st.compiles()):
        compiles.add_metric([m, result], n)
    yield compiles
    for name, doc, value in (
            ("lockgate:structured_compile_seconds", "Seconds the compile workers spent compiling grammars.",
             st.compile_seconds),
            ("lockgate:structured_cache_hits", "Constrained requests whose grammar was in the compiled cache.",
             st.cache_hits),
            ("lockgate:structured_cache_misses", "Constrained requests whose grammar was not in the cache.",
             st.cache_misses)):
        c = CounterMetricFamily(name, doc, labels=["model_name"])
        c.add_metric([m], value)
        yield c
    yield _histogram("lockgate:structured_mask_seconds", "Seconds an engine step spent filling the token bitmasks "
                     "of its constrained rows (steps with at least one).", m, st.mask_seconds, MASK_SECONDS_BUCKETS)


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


class _Registry(CollectorRegistry):
    """Keeps the collectors computed at scrape time apart from the metrics requests feed."""

    def __init__(self) -> None:
        super().__init__()
        self.scrape_time: list[Collector] = []

    def register(self, collector: Collector) -> None:
        super().register(collector)
        if not isinstance(collector, MetricWrapperBase):
            self.scrape_time.append(collector)

    def unregister(self, collector: Collector) -> None:
        super().unregister(collector)
        if collector in self.scrape_time:
            self.scrape_time.remove(collector)


class ServerMetrics:
    def __init__(self, model_name: str, state: Callable[[], EngineState]) -> None:
        self.model_name = model_name
        self.registry = _Registry()
        self.workers: WorkerMetrics | None = None  # several API workers: the page merges them all
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
                                lbl, registry=r, multiprocess_mode="max")  # the same in every worker
        # The response cache (gateway/response_cache.py): lookups by tenant; each worker's own cache summed.
        self.cache_hits = Counter("lockgate:response_cache_hits", "Requests answered from the response cache.",
                                  lbl + ["tenant"], registry=r)
        self.cache_misses = Counter("lockgate:response_cache_misses", "Cacheable requests not found in the "
                                    "response cache (run, then stored).", lbl + ["tenant"], registry=r)
        self.cache_bytes = Gauge("lockgate:response_cache_bytes", "Bytes held by the response cache (answers "
                                 "plus per-entry overhead; every API worker's summed).", lbl, registry=r,
                                 multiprocess_mode="livesum")
        self.cache_entries = Gauge("lockgate:response_cache_entries", "Entries in the response cache (every "
                                   "API worker's summed).", lbl, registry=r, multiprocess_mode="livesum")
        # The embedding cache (gateway/embedding_cache.py): inputs found and not found, by tenant (hit
        # rate: hits / (hits + misses)); the vectors' bytes (shared through the store: the table's).
        self.embedding_cache_hits = Counter("lockgate:embedding_cache_hits", "Embedding inputs answered from the "
                                            "embedding cache.", lbl + ["tenant"], registry=r)
        self.embedding_cache_misses = Counter("lockgate:embedding_cache_misses", "Embedding inputs not in the "
                                              "embedding cache (computed, then stored).", lbl + ["tenant"], registry=r)
        self.embedding_cache_bytes = Gauge("lockgate:embedding_cache_bytes", "Bytes of vectors in the embedding "
                                           "cache (the store's, as the latest write saw it, when shared).", lbl,
                                           registry=r, multiprocess_mode="livemostrecent")
        r.register(_EngineCollector(state, model_name))
        # Smoothed time to first token: the Retry-After hint for a full queue.
        self.ttft_ema_s = 1.0
        # Labelled children by their label values, each looked up once: prometheus_client's labels()
        # validates and locks on every call, and a request makes about twenty (bounded: the same
        # label sets the metrics hold anyway).
        self._children: dict[tuple[object, ...], _Child] = {}
        self._responses: dict[tuple[str, int], _Child] = {}
        self._request_children: dict[tuple[str, str, str], RequestChildren] = {}

    def child(self, metric: MetricWrapperBase, *values: str) -> _Child:
        """`metric.labels(*values)`, cached."""
        key = (metric, *values)
        c = self._children.get(key)
        if c is None:
            c = self._children[key] = metric.labels(*values)
        return c

    def request_children(self, labels: tuple[str, str, str]) -> RequestChildren:
        """The request metrics' children of one (model, tenant, class)."""
        rc = self._request_children.get(labels)
        if rc is None:
            rc = self._request_children[labels] = RequestChildren(labels)
        return rc

    def register_slo(self, slo: SloTracker) -> None:
        self.registry.register(_SloCollector(slo))

    def reject(self, reason: str, cls: str = "none") -> None:
        # Class names come from the server's config, never from client input: bounded cardinality.
        self.child(self.requests_rejected, self.model_name, reason, cls).inc()

    def http_response(self, route: str, status: int) -> None:
        c = self._responses.get((route, status))  # every response: keyed without building strings
        if c is None:
            c = self._responses[(route, status)] = self.http_responses.labels(route, str(status))
        c.inc()

    def error(self, status: int, code: str | None) -> None:
        # Codes come from our own raise sites, never from client input: bounded cardinality.
        self.child(self.http_errors, str(status), code or "none").inc()

    def fail(self, reason: str, tenant: str = "none", cls: str = "none") -> None:
        self.child(self.request_failure, self.model_name, tenant, cls, reason).inc()

    def response_cache(self, hit: bool, tenant: str, entries: int, nbytes: int) -> None:
        """A response-cache lookup (`tenant`: the bounded label) and the cache's size after it."""
        self.child(self.cache_hits if hit else self.cache_misses, self.model_name, tenant).inc()
        self.cache_size(entries, nbytes)

    def cache_size(self, entries: int, nbytes: int) -> None:
        self.child(self.cache_entries, self.model_name).set(entries)
        self.child(self.cache_bytes, self.model_name).set(nbytes)

    def embedding_cache(self, hits: int, misses: int, tenant: str, nbytes: int) -> None:
        """One /v1/embeddings request's inputs found (`hits`) and not found in the embedding cache, and
        the cache's bytes after it (`tenant`: the bounded label)."""
        if hits:
            self.child(self.embedding_cache_hits, self.model_name, tenant).inc(hits)
        if misses:
            self.child(self.embedding_cache_misses, self.model_name, tenant).inc(misses)
        self.child(self.embedding_cache_bytes, self.model_name).set(nbytes)

    def charge(self, record: RequestRecord) -> None:
        """The settled cost of a keyed request (after its usage row was computed)."""
        cost = record.cost_usd
        if cost is not None:
            self.request_children((self.model_name, record.tenant, record.class_name)).get(self.cost).inc(cost)

    def render(self) -> bytes:
        if self.workers is not None:
            return self.workers.render(self.scrape_time_families())
        return generate_latest(self.registry)

    def scrape_time_families(self) -> list[Metric]:
        """What the scrape-time collectors say now (several API workers merge these themselves)."""
        return [fam for c in self.registry.scrape_time for fam in c.collect()]

    def tracker(self, num_prompt_tokens: int, record: RequestRecord | None = None) -> RequestTracker:
        return RequestTracker(self, num_prompt_tokens, record)


def observe(child: _Child, value: float) -> None:
    """`Histogram.observe` on a labelled child, minus its per-call checks: the sum, then the first bucket
    whose bound holds the value, found by bisection (prometheus_client scans the bounds one by one).
    The same two counts; a NaN, or a prometheus_client laid out otherwise, takes the library's path."""
    bounds = getattr(child, "_upper_bounds", None)
    if bounds is None or math.isnan(value):
        child.observe(value)
        return
    child._sum.inc(value)
    child._buckets[bisect_left(bounds, value)].inc(1)


class RequestChildren:
    """The children of the request metrics for one (model, tenant, class), each made on first use
    (as `labels()` would make it: a series appears with its first sample)."""

    __slots__ = ("labels", "_c")

    def __init__(self, labels: tuple[str, str, str]) -> None:
        self.labels = labels
        self._c: dict[object, _Child] = {}

    def get(self, metric: MetricWrapperBase, *extra: str) -> _Child:
        key = (metric, *extra) if extra else metric
        c = self._c.get(key)
        if c is None:
            c = self._c[key] = metric.labels(*self.labels, *extra)
        return c


class RequestTracker:
    """One HTTP request's metrics (all its prompts and choices); its tokens and their times are
    taken once, by its `RequestRecord`."""

    __slots__ = ("m", "record", "labels", "arrival", "num_prompt_tokens", "done", "on_tokens", "on_finish",
                 "_times", "_cached", "_itl", "_inter", "_c")

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
        self._c = c = metrics.request_children(self.labels)
        self._itl = c.get(metrics.itl)  # bound once: observed per output
        self._inter = c.get(metrics.inter_token)

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
            observe(self._c.get(self.m.ttft), ttft)
            self.m.ttft_ema_s = 0.9 * self.m.ttft_ema_s + 0.1 * ttft
        else:
            gap = (now - previous) / new
            observe(self._itl, gap)
            observe(self._inter, gap)

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
        m, c = self.m, self._c
        c.get(m.prompt_tokens).inc(self.num_prompt_tokens)
        c.get(m.generation_tokens).inc(self.num_generated)
        for t in r.engine_times:  # every engine request that started, however it ended
            observe(c.get(m.queue_time), t.queue_s)
            observe(c.get(m.prefill_time), t.prefill_s)
        if error is not None:
            m.fail(error, r.tenant, r.class_name)
            return
        observe(c.get(m.e2e), time.monotonic() - self.arrival)
        observe(c.get(m.prompt_hist), self.num_prompt_tokens)
        observe(c.get(m.generation_hist), self.num_generated)
        observe(c.get(m.max_generation_hist), r.max_choice_tokens)
        for t in r.engine_times:
            observe(c.get(m.decode_time), t.decode_s)
            observe(c.get(m.inference_time), t.inference_s)
        for reason in finish_reasons or ["stop"]:
            c.get(m.request_success, reason or "stop").inc()
