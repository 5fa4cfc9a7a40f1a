"""Prometheus metrics, named like vLLM's (`lockgate:` instead of `vllm:`).

Engine gauges are read from the client's latest engine state at scrape time;
per-request counters and histograms are fed by `RequestTracker`.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lockgate.engine.client import EngineState
from lockgate.engine.outputs import RequestOutput

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
                1.0, 2.5, 5.0, 10.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000)


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


class ServerMetrics:
    def __init__(self, model_name: str, state: Callable[[], EngineState]) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        r, lbl = self.registry, ["model_name"]
        self.prompt_tokens = Counter("lockgate:prompt_tokens", "Prompt tokens processed.", lbl, registry=r)
        self.generation_tokens = Counter("lockgate:generation_tokens", "Tokens generated.", lbl, registry=r)
        self.request_success = Counter("lockgate:request_success", "Requests that finished, by finish reason.",
                                       lbl + ["finished_reason"], registry=r)
        self.request_failure = Counter("lockgate:request_failure", "Requests that ended in an error, by cause.",
                                       lbl + ["reason"], registry=r)
        self.requests_rejected = Counter("lockgate:requests_rejected",
                                         "Requests refused before admission, by reason and priority class.",
                                         lbl + ["reason", "class"], registry=r)
        self.ttft = Histogram("lockgate:time_to_first_token_seconds", "Time to the first token.", lbl,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("lockgate:time_per_output_token_seconds", "Time between output tokens.", lbl,
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("lockgate:e2e_request_latency_seconds", "Request latency, arrival to last token.",
                             lbl, buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_hist = Histogram("lockgate:request_prompt_tokens", "Prompt tokens per request.", lbl,
                                     buckets=_TOKEN_BUCKETS, registry=r)
        self.generation_hist = Histogram("lockgate:request_generation_tokens", "Generated tokens per request.",
                                         lbl, buckets=_TOKEN_BUCKETS, registry=r)
        self.http_responses = Counter("lockgate:http_responses", "HTTP responses by route and status code.",
                                      ["route", "status"], registry=r)
        self.http_errors = Counter("lockgate:http_errors", "Error responses by status and error code.",
                                   ["status", "code"], registry=r)
        r.register(_EngineCollector(state, model_name))
        # Smoothed time to first token: the Retry-After hint for a full queue.
        self.ttft_ema_s = 1.0

    def reject(self, reason: str, cls: str = "none") -> None:
        # Class names come from the server's config, never from client input: bounded cardinality.
        self.requests_rejected.labels(self.model_name, reason, cls).inc()

    def http_response(self, route: str, status: int) -> None:
        self.http_responses.labels(route, str(status)).inc()

    def error(self, status: int, code: str | None) -> None:
        # Codes come from our own raise sites, never from client input: bounded cardinality.
        self.http_errors.labels(str(status), code or "none").inc()

    def fail(self, reason: str) -> None:
        self.request_failure.labels(self.model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def tracker(self, num_prompt_tokens: int) -> RequestTracker:
        return RequestTracker(self, num_prompt_tokens)


class RequestTracker:
    """Timing and token counts of one HTTP request (all its prompts and choices)."""

    __slots__ = ("m", "arrival", "first_token", "last_token", "num_prompt_tokens", "num_generated", "done",
                 "on_tokens", "on_finish")

    def __init__(self, metrics: ServerMetrics, num_prompt_tokens: int) -> None:
        self.m = metrics
        self.arrival = time.monotonic()
        self.first_token: float | None = None
        self.last_token = self.arrival
        self.num_prompt_tokens = num_prompt_tokens
        self.num_generated = 0
        self.done = False
        # Hooks for the usage meter (gating.py): tokens as they stream, and how the request ended.
        self.on_tokens: Callable[[int, int], None] | None = None
        self.on_finish: Callable[[list[str | None] | None, str | None], None] | None = None

    def on_output(self, out: RequestOutput) -> None:
        new = sum(len(c.delta_token_ids) for c in out.outputs)
        if self.on_tokens is not None:
            self.on_tokens(new, out.num_cached_tokens)
        if not new:
            return
        now = time.monotonic()
        name = self.m.model_name
        if self.first_token is None:
            self.first_token = now
            ttft = now - self.arrival
            self.m.ttft.labels(name).observe(ttft)
            self.m.ttft_ema_s = 0.9 * self.m.ttft_ema_s + 0.1 * ttft
        else:
            self.m.itl.labels(name).observe((now - self.last_token) / new)
        self.last_token = now
        self.num_generated += new

    def finish(self, finish_reasons: list[str | None] | None, error: str | None = None) -> None:
        """Record once: `error` set -> a failure; otherwise success by finish reason."""
        if self.done:
            return
        self.done = True
        if self.on_finish is not None:
            self.on_finish(finish_reasons, error)
        m, name = self.m, self.m.model_name
        m.prompt_tokens.labels(name).inc(self.num_prompt_tokens)
        m.generation_tokens.labels(name).inc(self.num_generated)
        if error is not None:
            m.fail(error)
            return
        m.e2e.labels(name).observe(time.monotonic() - self.arrival)
        m.prompt_hist.labels(name).observe(self.num_prompt_tokens)
        m.generation_hist.labels(name).observe(self.num_generated)
        for reason in finish_reasons or ["stop"]:
            m.request_success.labels(name, reason or "stop").inc()
