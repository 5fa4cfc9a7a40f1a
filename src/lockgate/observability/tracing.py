"""OpenTelemetry traces of inference requests, only when an exporter is configured.

`--otel-endpoint URL` (an OTLP/HTTP collector, e.g. `http://collector:4318`) or
the standard `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`
turn tracing on; otherwise `build_tracer` returns None, OpenTelemetry is never
imported and no request does any tracer work.

Each HTTP request is one server span (`METHOD route`, continuing a W3C
`traceparent` when the client sends one). An inference request adds children:
`admission` (arrival to hand-off to the engine), per engine request `queue`,
`prefill` and `decode` (the engine core's own timestamps, placed with explicit
start and end times and carrying `lockgate.request_id`), and `stream` (the
streamed answer, first to last byte).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

from lockgate.observability.record import RequestRecord

log = logging.getLogger("lockgate.server")

_TRACES_PATH = "/v1/traces"


def configured_endpoint(endpoint: str | None) -> str | None:
    """The collector to export to: the option, else the standard variables; None: tracing off."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    return (endpoint or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None)


def build_tracer(endpoint: str | None, service_name: str = "lockgate") -> RequestTracer | None:
    """An OTLP/HTTP-exporting tracer, or None when nothing is configured."""
    if configured_endpoint(endpoint) is None:
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    name = os.environ.get("OTEL_SERVICE_NAME") or service_name
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    # The option is a base URL like the standard variable; the variables are left to the exporter.
    url = None
    if endpoint:
        url = endpoint if endpoint.rstrip("/").endswith(_TRACES_PATH) else endpoint.rstrip("/") + _TRACES_PATH
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
    log.info("tracing: exporting spans over OTLP/HTTP to %s", url or configured_endpoint(None))
    return RequestTracer(provider)


class RequestTracer:
    """Spans for one server; `provider` is an OpenTelemetry SDK `TracerProvider` (tests pass one
    with an in-memory exporter). The global tracer provider is left alone."""

    def __init__(self, provider: Any) -> None:
        from opentelemetry import trace
        from opentelemetry.propagate import extract
        from opentelemetry.trace import SpanKind, Status, StatusCode

        import lockgate

        self.provider = provider
        self.tracer = provider.get_tracer("lockgate", lockgate.__version__)
        self._trace, self._extract = trace, extract
        self._server, self._status, self._error = SpanKind.SERVER, Status, StatusCode.ERROR
        # API monotonic -> Unix nanoseconds (spans take wall-clock times).
        self._offset = time.time() - time.monotonic()

    def _ns(self, monotonic_s: float, offset: float | None = None) -> int:
        return int((monotonic_s + (self._offset if offset is None else offset)) * 1e9)

    def start_http(self, method: str, path: str, headers: dict[bytes, bytes]) -> Any:
        """The request's server span, started now (a client's `traceparent` is continued)."""
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in headers.items()
                   if k in (b"traceparent", b"tracestate")}
        parent = self._extract(carrier) if carrier else None
        return self.tracer.start_span(f"{method} {path}", context=parent, kind=self._server,
                                      attributes={"http.request.method": method, "url.path": path})

    def end_http(self, span: Any, method: str, route: str | None, status: int,
                 record: RequestRecord | None) -> None:
        """Children from the request's record (explicit times), then the server span itself."""
        if route is not None:
            span.update_name(f"{method} {route}")
            span.set_attribute("http.route", route)
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_status(self._status(self._error))
        if record is not None:
            self._children(span, record)
        span.end()

    def _children(self, span: Any, r: RequestRecord) -> None:
        span.set_attributes({
            "lockgate.request_id": r.request_id, "lockgate.tenant": r.tenant, "lockgate.class": r.class_name,
            "lockgate.model": r.model, "lockgate.finish_reason": r.finish_reason,
            "gen_ai.usage.input_tokens": r.prompt_tokens, "gen_ai.usage.output_tokens": r.completion_tokens,
        })
        if r.error is not None and r.error != "client_disconnected":
            span.set_status(self._status(self._error, r.error))
        ctx = self._trace.set_span_in_context(span)
        end = r.admitted if r.admitted is not None else (r.ended or time.monotonic())
        attrs: dict[str, Any] = {"lockgate.request_id": r.request_id, "lockgate.class": r.class_name}
        if r.admitted is None and r.code is not None:
            attrs["lockgate.rejected"] = r.code
        self._span("admission", ctx, self._ns(r.started), self._ns(end), attrs)
        for t in r.engine_times:
            attrs = {"lockgate.request_id": t.request_id, "lockgate.parent_request_id": r.request_id}
            off = t.clock_offset
            self._span("queue", ctx, self._ns(t.queued, off), self._ns(t.scheduled, off), attrs)
            self._span("prefill", ctx, self._ns(t.scheduled, off), self._ns(t.first_token, off), attrs)
            self._span("decode", ctx, self._ns(t.first_token, off), self._ns(t.last_token, off), attrs)
        if r.stream and r.response_started is not None:
            self._span("stream", ctx, self._ns(r.response_started), self._ns(r.response_ended or time.monotonic()),
                       {"lockgate.request_id": r.request_id, "gen_ai.usage.output_tokens": r.completion_tokens})

    def _span(self, name: str, ctx: Any, start_ns: int, end_ns: int, attrs: dict[str, Any]) -> None:
        s = self.tracer.start_span(name, context=ctx, start_time=start_ns, attributes=attrs)
        s.end(end_time=max(start_ns, end_ns))

    def shutdown(self) -> None:
        """Flush what is batched (server shutdown)."""
        try:
            self.provider.shutdown()
        except Exception:  # noqa: BLE001 - a collector that is down must not block the exit
            log.exception("flushing traces failed")
