"""Request records: the SLO verdict, tenant labels, the JSON request log."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

from lockgate.engine.outputs import RequestTimes
from lockgate.gateway.classes import PriorityClass
from lockgate.observability.labels import TenantLabels
from lockgate.observability.record import RequestRecord
from lockgate.observability.request_log import LOGGER_NAME, RequestLogger

CLS = PriorityClass("interactive", 0, ttft_s=0.5, tpot_s=0.1, max_queued=8)


def _done(ttft: float, decode: float, tokens: int) -> RequestRecord:
    r = RequestRecord("r", "/v1/completions", cls=CLS, started=100.0)
    r.first_token, r.last_token, r.max_choice_tokens = 100.0 + ttft, 100.0 + ttft + decode, tokens
    r.completed, r.finish_reasons, r.status = True, ["length"], 200
    return r


def test_good_means_completed_within_both_targets() -> None:
    assert _done(0.4, 0.85, 10).slo_good() is True  # TPOT 0.094
    assert _done(0.6, 0.0, 1).slo_good() is False  # TTFT over
    assert _done(0.1, 1.0, 10).slo_good() is False  # TPOT 0.111 over
    one = _done(0.1, 0.0, 1)
    assert one.tpot_s is None and one.slo_good() is True  # one token: no TPOT to miss


@pytest.mark.parametrize(("status", "code", "error", "verdict"), [
    (429, "slo_unattainable", None, False),   # shed for capacity: bad
    (429, "queue_full", None, False),
    (503, "engine_unavailable", None, False),
    (200, None, "engine_dead", False),        # failed mid-stream (status already sent)
    (500, "internal_error", "internal", False),
    (429, "rate_limit_exceeded", None, None),  # the tenant's own limit: not the server's SLO
    (429, "budget_exceeded", None, None),
    (400, "invalid_value", None, None),
    (499, None, "client_disconnected", None),
    (200, None, "client_disconnected", None),
])
def test_failures_and_refusals(status: int, code: str | None, error: str | None, verdict: bool | None) -> None:
    r = RequestRecord("r", "/v1/completions", cls=CLS)
    r.status, r.code, r.error = status, code, error
    assert r.slo_good() is verdict


def test_no_class_no_verdict_and_ledger_reasons() -> None:
    r = RequestRecord("r", "/v1/chat/completions")
    r.status, r.code = 400, "invalid_value"
    assert r.slo_good() is None and r.finish_reason == "rejected" and r.class_name == "none"
    r.status, r.outcome = 500, "internal"
    assert r.finish_reason == "error"
    assert _done(0.1, 0.1, 2).finish_reason == "length"
    replay = RequestRecord("r", "/v1/completions")
    replay.status, replay.meter = 200, SimpleNamespace(skip=True, cost_usd=1.0)  # type: ignore[assignment]
    assert replay.finish_reason == "replayed" and replay.cost_usd is None  # billed by the original


def test_queue_time_is_the_first_engine_request_to_start() -> None:
    r = RequestRecord("r", "/v1/completions")
    assert r.queue_s is None
    r.engine_times = [RequestTimes("r#0", 1.0, 1.25, 1.5, 2.0), RequestTimes("r#1", 1.0, 1.75, 2.0, 2.5)]
    assert r.queue_s == 0.25


def test_tenant_labels_are_capped() -> None:
    labels = TenantLabels(cap=2)
    assert labels.label(None) == "none"
    assert [labels.label(t) for t in ("a", "b", "c", "a", "d", "b")] == ["a", "b", "other", "a", "other", "b"]
    assert len(labels) == 2
    assert TenantLabels(cap=0).label("a") == "other"
    with pytest.raises(ValueError):
        TenantLabels(cap=-1)


def _record() -> RequestRecord:
    r = _done(0.2, 0.3, 4)
    r.tenant_id, r.tenant_name, r.key_id, r.model = "ten_1", "acme", "key_1", "m"
    r.prompt_tokens, r.completion_tokens, r.cached_tokens, r.ended = 7, 4, 2, 100.6
    r.prompt = "the secret prompt"
    return r


def test_request_log_lines_parse_and_hold_no_prompt_by_default(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    logger = RequestLogger("json", str(path))
    try:
        logger.log(_record())
    finally:
        logger.close()
    line = path.read_text().strip()
    assert "secret" not in line
    row = json.loads(line)
    assert row["request_id"] == "r" and row["tenant_id"] == "ten_1" and row["tenant"] == "acme"
    assert row["key_id"] == "key_1" and row["class"] == "interactive" and row["finish_reason"] == "length"
    assert (row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"]) == (7, 4, 2)
    assert row["ttft_s"] == pytest.approx(0.2) and row["e2e_s"] == pytest.approx(0.6) and row["slo_good"] is True
    assert row["tpot_s"] == pytest.approx(0.1) and "prompt" not in row
    assert not logging.getLogger(LOGGER_NAME).handlers  # closed: nothing left attached


def test_request_log_prompts_and_off(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    logger = RequestLogger("json", str(path), log_prompts=True)
    logger.log(_record())
    logger.close()
    assert json.loads(path.read_text())["prompt"] == "the secret prompt"
    off = RequestLogger("off", str(tmp_path / "never.jsonl"))
    off.log(_record())
    assert not (tmp_path / "never.jsonl").exists()
    with pytest.raises(ValueError, match="request log"):
        RequestLogger("text")
    with pytest.raises(ValueError, match="cannot open"):
        RequestLogger("json", str(tmp_path / "no" / "such" / "dir.jsonl"))
