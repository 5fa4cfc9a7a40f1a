"""Observability: per-request records, SLO tracking, request logs and traces.

Prometheus metric definitions live in `lockgate.observability.metrics`; everything here
is fed from the one place a request ends (the guard middleware, after the
request's lease is released), never from the engine's hot loop.
"""
