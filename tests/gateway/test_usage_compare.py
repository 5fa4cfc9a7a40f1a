"""gateway/usage_compare.py: two ledger slices side by side (pure: no store, no clock)."""
from __future__ import annotations

import math

import pytest

from lockgate.gateway.usage_compare import MAX_SAMPLES, Side, change, compare, summarize, tpot


def test_tpot_is_the_time_per_token_after_the_first() -> None:
    assert tpot(0.5, 2.5, 5) == pytest.approx(0.5)  # 2 s for 4 tokens after the first
    assert tpot(0.5, 2.5, 1) is None and tpot(0.5, None, 9) is None and tpot(0.5, 2.5, 0) is None
    assert tpot(1.0, 0.9, 3) == 0.0  # clock skew never gives a negative time


def test_change_is_relative_and_undefined_from_zero() -> None:
    assert change(100, 70) == pytest.approx(-0.3)
    assert change(2, 3) == pytest.approx(0.5)
    assert change(0, 0) == 0.0
    assert change(0, 5) is None and change(None, 1) is None and change(1, None) is None


def test_summary_figures_from_known_rows() -> None:
    # 4 timed rows: ttft 0.1..0.4 s; tpot 0.01, 0.02, undefined (1 token), 0.04
    side = Side("A", {}, requests=5, prompt_tokens=3000, completion_tokens=1000, cost_nusd=7_000_000,
                errors=1, timings=[(0.1, 0.1 + 0.01 * 10, 11), (0.2, 0.2 + 0.02 * 4, 5), (0.3, 0.9, 1),
                                   (0.4, 0.4 + 0.04 * 2, 3)])
    s = summarize(side)
    assert s["cost_usd"] == 0.007 and s["cost_nusd"] == 7_000_000
    assert s["cost_per_1k_tokens_usd"] == pytest.approx(0.007 * 1000 / 4000)
    assert s["error_rate"] == pytest.approx(0.2)
    assert s["ttft_s"]["p50"] == pytest.approx(0.25)
    assert s["ttft_s"]["p99"] == pytest.approx(0.3 + 0.1 * 0.97)  # linear between closest ranks
    assert s["tpot_s"]["p50"] == pytest.approx(0.02)
    assert s["timed_requests"] == 4 and s["capped"] is False


def test_empty_side_has_no_ratios_and_no_percentiles() -> None:
    s = summarize(Side("empty", {}))
    assert s["requests"] == 0 and s["cost_per_1k_tokens_usd"] is None and s["error_rate"] is None
    assert s["ttft_s"] == {"p50": None, "p95": None, "p99": None}


def test_compare_reports_the_change_b_vs_a() -> None:
    a = Side("m@v1", {"version": "m@v1"}, requests=100, prompt_tokens=10_000, completion_tokens=10_000,
             cost_nusd=2_000_000_000, errors=2, timings=[(0.2, 1.2, 11)] * 10)
    b = Side("m@v2", {"version": "m@v2"}, requests=100, prompt_tokens=10_000, completion_tokens=10_000,
             cost_nusd=1_400_000_000, errors=1, timings=[(0.1, 0.6, 11)] * 10)
    out = compare(a, b)
    assert out["a"]["label"] == "m@v1" and out["b"]["filters"] == {"version": "m@v2"}
    ch = out["change"]
    assert ch["cost_usd"] == pytest.approx(-0.3) and ch["cost_per_1k_tokens_usd"] == pytest.approx(-0.3)
    assert ch["requests"] == 0.0 and ch["error_rate"] == pytest.approx(-0.5)
    assert ch["ttft_s"]["p95"] == pytest.approx(-0.5) and ch["tpot_s"]["p50"] == pytest.approx(-0.5)
    assert "note" not in out and out["max_samples"] == MAX_SAMPLES
    assert all(not isinstance(v, float) or math.isfinite(v) for v in ch.values())


def test_a_capped_side_says_so() -> None:
    out = compare(Side("a", {}, requests=1, timings=[(0.1, None, 1)], capped=True), Side("b", {}))
    assert out["a"]["capped"] is True and str(MAX_SAMPLES) in out["note"]
    assert out["change"]["requests"] == -1.0  # 1 -> 0 is -100% (0 -> 1 would be undefined)
