"""Tracing: off unless configured; on, an in-process app (fake engine) yields the request's spans
(http, admission, queue, prefill, decode, stream) with the right parents and times."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from lockgate.engine.config import EngineConfig
from lockgate.engine.outputs import RequestTimes
from lockgate.observability import tracing
from lockgate.observability.record import RequestRecord
from lockgate.observability.tracing import RequestTracer, build_tracer
from lockgate.server.app import build_app
from lockgate.server.config import ServerConfig

OTEL_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED")


@pytest.fixture
def no_otel_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in OTEL_VARS:
        monkeypatch.delenv(name, raising=False)


def test_off_unless_configured(no_otel_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    assert build_tracer(None) is None
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    tracer = build_tracer(None)
    assert isinstance(tracer, RequestTracer)
    tracer.shutdown()
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert build_tracer("http://127.0.0.1:4318") is None


def test_option_endpoint_gets_the_traces_path(no_otel_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str | None] = []

    import opentelemetry.exporter.otlp.proto.http.trace_exporter as otlp

    class Exporter(otlp.OTLPSpanExporter):
        def __init__(self, endpoint: str | None = None, **kw: Any) -> None:
            seen.append(endpoint)
            super().__init__(endpoint=endpoint, **kw)

    monkeypatch.setattr(otlp, "OTLPSpanExporter", Exporter)
    for given in ("http://collector:4318", "http://collector:4318/", "http://collector:4318/v1/traces"):
        t = build_tracer(given)
        assert t is not None
        t.shutdown()
    assert seen == ["http://collector:4318/v1/traces"] * 3


def _memory_tracer() -> tuple[RequestTracer, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return RequestTracer(provider), exporter


def test_spans_from_fake_engine_timings() -> None:
    tracer, exporter = _memory_tracer()
    span = tracer.start_http("POST", "/v1/completions", {b"traceparent": (
        b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")})
    rec = RequestRecord("cmpl-1", "/v1/completions", started=10.0, stream=True)
    rec.admitted, rec.ended, rec.response_started, rec.response_ended = 10.01, 11.0, 10.2, 10.9
    rec.engine_times = [RequestTimes("cmpl-1", 20.0, 20.05, 20.15, 20.85, clock_offset=1000.0)]
    tracer.end_http(span, "POST", "/v1/completions", 200, rec)
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert set(spans) == {"POST /v1/completions", "admission", "queue", "prefill", "decode", "stream"}
    root = spans["POST /v1/completions"]
    assert root.context.trace_id == 0x0af7651916cd43dd8448eb211c80319c  # the client's trace continues
    assert root.parent is not None and root.parent.span_id == 0xb7ad6b7169203331
    for name in ("admission", "queue", "prefill", "decode", "stream"):
        assert spans[name].parent.span_id == root.context.span_id, name
    q, p, d = spans["queue"], spans["prefill"], spans["decode"]
    assert q.start_time == int(1020.0 * 1e9) and q.end_time == p.start_time == int(1020.05 * 1e9)
    assert p.end_time == d.start_time and d.end_time == int(1020.85 * 1e9)
    assert q.attributes["lockgate.request_id"] == "cmpl-1"
    assert spans["admission"].end_time - spans["admission"].start_time == pytest.approx(0.01e9, rel=1e-3)
    assert root.attributes["http.response.status_code"] == 200 and root.attributes["http.route"] == "/v1/completions"


@pytest.fixture(scope="module")
def app_client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, InMemorySpanExporter]]:
    data = tmp_path_factory.mktemp("tracing")
    app = build_app(EngineConfig(load_format="fake", fake_step_delay_s=0.005, max_model_len=256),
                    ServerConfig(data_dir=str(data), request_log="off", allowed_hosts=["testserver"]))
    tracer, exporter = _memory_tracer()
    app.state.lockgate.observer.tracer = tracer  # as --otel-endpoint would, with an in-memory exporter
    with TestClient(app) as client:
        yield client, exporter


def _by_trace(exporter: InMemorySpanExporter, root_name: str) -> tuple[Any, list[Any]]:
    spans = exporter.get_finished_spans()
    root = next(s for s in spans if s.name == root_name)
    kids = [s for s in spans if s.parent is not None and s.parent.span_id == root.context.span_id]
    return root, kids


def test_app_traces_a_completion_with_n_2(app_client: tuple[TestClient, InMemorySpanExporter]) -> None:
    client, exporter = app_client
    exporter.clear()
    r = client.post("/v1/completions", json={"prompt": "trace me", "max_tokens": 3, "n": 2})
    assert r.status_code == 200, r.text
    rid = r.json()["id"]
    root, kids = _by_trace(exporter, "POST /v1/completions")
    assert root.attributes["lockgate.request_id"] == rid and root.attributes["gen_ai.usage.output_tokens"] == 6
    names = sorted(k.name for k in kids)
    assert names == ["admission", "decode", "decode", "prefill", "prefill", "queue", "queue"]  # one per choice
    engine_ids = {k.attributes["lockgate.request_id"] for k in kids if k.name == "queue"}
    assert engine_ids == {f"{rid}#0", f"{rid}#1"}
    admission = next(k for k in kids if k.name == "admission")
    assert root.start_time <= admission.start_time <= admission.end_time
    for k in kids:
        assert root.start_time - 5e6 <= k.start_time <= k.end_time <= root.end_time + 5e6, k.name  # 5 ms skew
    for eid in engine_ids:
        q, p, d = (next(k for k in kids if k.name == n and k.attributes["lockgate.request_id"] == eid)
                   for n in ("queue", "prefill", "decode"))
        assert q.end_time == p.start_time and p.end_time == d.start_time and admission.end_time <= q.start_time


def test_app_traces_a_stream_and_skips_probes(app_client: tuple[TestClient, InMemorySpanExporter]) -> None:
    client, exporter = app_client
    exporter.clear()
    assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200
    assert exporter.get_finished_spans() == ()  # probes and scrapes are not traced
    with client.stream("POST", "/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}) as r:
        body = "".join(r.iter_text())
    assert body.rstrip().endswith("[DONE]")
    root, kids = _by_trace(exporter, "POST /v1/chat/completions")
    assert sorted(k.name for k in kids) == ["admission", "decode", "prefill", "queue", "stream"]
    stream = next(k for k in kids if k.name == "stream")
    prefill = next(k for k in kids if k.name == "prefill")
    assert stream.end_time > stream.start_time and stream.end_time >= prefill.end_time - 5e6
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": -1})  # a 400: admission only
    assert r.status_code == 400
    root, kids = _by_trace(exporter, "POST /v1/completions")
    assert root.attributes["http.response.status_code"] == 400 and [k.name for k in kids] == ["admission"]


def test_tracing_module_imports_no_otel_at_import_time() -> None:
    # The module itself holds no OpenTelemetry objects: they exist only once a tracer is built.
    assert not any(name.startswith("opentelemetry") for name in vars(tracing))
