"""The per-request shortcuts in observability write exactly what the library paths would."""
from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Histogram, generate_latest

from lockgate.observability.metrics import _LATENCY_BUCKETS, ServerMetrics, observe
from lockgate.observability.record import RequestRecord
from lockgate.observability.request_log import LOGGER_NAME, RequestLogger


@pytest.fixture(autouse=True)
def _request_logger_as_it_was():
    """RequestLogger makes its logger non-propagating for good; pytest then attaches its capture handlers
    to it in every later test (test_records checks that nothing is left attached)."""
    logger = logging.getLogger(LOGGER_NAME)
    propagate = logger.propagate
    yield
    logger.propagate = propagate


def _page(registry: CollectorRegistry) -> list[str]:
    return [ln for ln in generate_latest(registry).decode().splitlines() if "_created" not in ln]


def test_observe_counts_as_histogram_observe() -> None:
    a, b = CollectorRegistry(), CollectorRegistry()
    ha = Histogram("h", "d", ["x"], buckets=_LATENCY_BUCKETS, registry=a)
    hb = Histogram("h", "d", ["x"], buckets=_LATENCY_BUCKETS, registry=b)
    rng = random.Random(0)
    values = [*_LATENCY_BUCKETS, 0.0, -1.0, 1e-9, 1e9, float("nan"),
              *(rng.random() * 20 for _ in range(500)), *(rng.choice(_LATENCY_BUCKETS) for _ in range(100))]
    for v in values:
        ha.labels("q").observe(v)
        observe(hb.labels("q"), v)
    assert _page(a) == _page(b)


def test_cached_children_are_the_library_children() -> None:
    m = ServerMetrics("m", lambda: None)  # type: ignore[arg-type, return-value]
    c = m.request_children(("m", "t", "c"))
    assert c.get(m.ttft) is m.ttft.labels("m", "t", "c") and c.get(m.ttft) is c.get(m.ttft)
    assert c.get(m.request_success, "stop") is m.request_success.labels("m", "t", "c", "stop")
    assert m.child(m.http_errors, "429", "x") is m.http_errors.labels("429", "x")
    m.http_response("/v1/completions", 200)
    m.http_response("/v1/completions", 200)
    assert m.http_responses.labels("/v1/completions", "200")._value.get() == 2


def _record() -> RequestRecord:
    r = RequestRecord("r1", "/v1/completions", tenant_id="t", tenant_name="ünï", key_id="k")
    r.model, r.status, r.prompt_tokens, r.ended = "m", 200, 7, r.started + 0.000005
    r.prompt = "say \u2028 hi"
    return r


def test_request_log_line_is_the_logging_line(tmp_path: Path) -> None:
    fast, slow = tmp_path / "fast.jsonl", tmp_path / "slow.jsonl"
    rec = _record()
    logger = RequestLogger("json", str(fast), log_prompts=True)
    try:
        logger.log(rec)
    finally:
        logger.close()
    logger = RequestLogger("json", str(slow), log_prompts=True)
    logger.logger.addFilter(lambda _r: True)  # anything attached: the line goes through logging
    try:
        logger.log(rec)
    finally:
        logger.logger.filters.clear()
        logger.close()
    a, b = fast.read_text(encoding="utf-8"), slow.read_text(encoding="utf-8")
    assert a.endswith("\n") and a.count("\n") == 1
    assert json.loads(a) | {"ts": ""} == json.loads(b) | {"ts": ""}
    assert json.loads(a)["tenant"] == "ünï" and json.loads(a)["prompt"] == "say \u2028 hi"


def test_request_log_reaches_other_handlers(tmp_path: Path) -> None:
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    logger = RequestLogger("json", str(tmp_path / "r.jsonl"))
    extra = Keep()
    logging.getLogger(LOGGER_NAME).addHandler(extra)
    try:
        logger.log(_record())
    finally:
        logging.getLogger(LOGGER_NAME).removeHandler(extra)
        logger.close()
    assert len(seen) == 1 and json.loads(seen[0])["request_id"] == "r1"
    assert (tmp_path / "r.jsonl").read_text().strip() == seen[0]


def test_request_log_lone_surrogate_is_escaped(tmp_path: Path) -> None:
    logger = RequestLogger("json", str(tmp_path / "r.jsonl"), log_prompts=True)
    rec = _record()
    rec.prompt = "bad \ud800 text"
    try:
        logger.log(rec)
    finally:
        logger.close()
    assert json.loads((tmp_path / "r.jsonl").read_text())["prompt"] == "bad \ud800 text"
