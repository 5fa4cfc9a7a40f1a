"""The pure parts of benchmarks/structured.py: its cases, answer parsing, validity, the decode window."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest

from lockgate.engine.structured.grammar import validate
from lockgate.engine.structured_params import StructuredOutputs

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "structured.py"


def _script():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("structured_bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["structured_bench"] = mod
    spec.loader.exec_module(mod)
    return mod


bench = _script()


def test_cases_are_valid_schemas_the_grammar_engine_takes() -> None:
    assert 8 <= len(bench.CASES) <= 20
    assert len({c.name for c in bench.CASES}) == len(bench.CASES)
    for case in bench.CASES:
        jsonschema.Draft202012Validator.check_schema(case.schema)
        validate(StructuredOutputs(json=case.schema_json()))  # raises if llguidance refuses it
        assert case.schema_json() in case.prompt() and case.source in case.prompt()


def test_parse_json_allows_a_code_fence_and_nothing_else() -> None:
    assert bench.parse_json(' ```json\n{"a": 1}\n``` ') == {"a": 1}
    assert bench.parse_json('{"a": [1, 2]}\n') == {"a": [1, 2]}
    for bad in ('Here it is: {"a": 1}', '{"a": 1', "", "```\n{'a': 1}\n```"):
        with pytest.raises(ValueError):
            bench.parse_json(bad)


def test_validity_counts_parsed_valid_and_cut_answers() -> None:
    case = next(c for c in bench.CASES if c.name == "prescription")
    good = {"medication": "Amoxicillin", "dose_mg": 500, "frequency": "twice_daily", "route": "oral",
            "duration_days": 7}
    v = bench.Validity()
    v.add(case, bench.Answer(text=json.dumps(good), finish_reason="stop"))
    v.add(case, bench.Answer(text=json.dumps({**good, "duration_days": 400}), finish_reason="stop"))  # > maximum
    v.add(case, bench.Answer(text=json.dumps({**good, "route": "nasal"}), finish_reason="stop"))  # not in enum
    v.add(case, bench.Answer(text=json.dumps(good)[:30], finish_reason="length"))
    assert (v.answers, v.parsed, v.valid, v.cut) == (4, 3, 1, 1)
    assert v.pct(v.valid) == "25%"


def test_window_rate_counts_only_while_every_stream_decodes() -> None:
    # Stream a: tokens at 0..10 s; stream b starts at 2 s, ends at 8 s. Window (2, 8]: a has 6 chunks
    # of 1 token, b 6 of 2 tokens each (the server merged pairs): 18 tokens over 6 s.
    a = bench.Answer(tokens=11, chunk_times=[float(t) for t in range(11)])
    b = bench.Answer(tokens=14, chunk_times=[float(t) for t in range(2, 9)])
    rate, seconds = bench.window_rate([a, b])
    assert seconds == 6.0 and rate == pytest.approx((6 + 6 * 2) / 6)
    # A stream that ended before another began: no window.
    c = bench.Answer(tokens=3, chunk_times=[0.0, 0.5, 1.0])
    assert bench.window_rate([a, bench.Answer(tokens=2, chunk_times=[5.0, 6.0]), c]) is None
    assert bench.window_rate([a, bench.Answer(tokens=1, chunk_times=[3.0])]) is None


def test_answer_rates() -> None:
    a = bench.Answer(tokens=5, chunk_times=[1.0, 2.0, 3.0], start=0.5)
    assert a.ttft == 0.5 and a.decode_rate == 2.0
    assert bench.Answer().decode_rate is None
    # The server counts the EOS that ended an answer; it sends no text.
    eos = bench.Answer(tokens=4, chunk_times=[0.0, 1.0, 2.0], finish_reason="stop")
    assert eos.emitted == 3 and eos.decode_rate == 1.0
    assert bench.Answer(tokens=4, chunk_times=[0.0, 1.0, 2.0], finish_reason="length").emitted == 4


def test_bad_arguments_are_a_usage_error() -> None:
    r = subprocess.run([sys.executable, str(SCRIPT), "--streams", "0"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--streams" in r.stderr and "Traceback" not in r.stderr
