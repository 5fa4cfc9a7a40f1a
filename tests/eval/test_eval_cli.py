"""`lockgate eval`: the quality gate between two precisions of the default model, offline.

Real model runs (float32 and int8, one thread each, a few prompts and questions) for the
report and the exit codes; bad input is refused before any model loads.
"""
from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from lockgate.cli import app
from lockgate.eval.data import load_passage, load_prompts, load_questions, parse_prompts
from lockgate.eval.offline import parse_side

QUICK = ["--limit", "3", "--max-tokens", "8", "--num-threads", "1"]


class _Eval:
    """`lockgate eval ARGS` started in its own process; `result()` waits for it."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "lockgate.cli", "eval", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self._done: subprocess.CompletedProcess[str] | None = None

    def result(self) -> subprocess.CompletedProcess[str]:
        if self._done is None:
            try:
                out, err = self.proc.communicate(timeout=600)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise
            self._done = subprocess.CompletedProcess(self.proc.args, self.proc.returncode, out, err)
        return self._done


@pytest.fixture(scope="module")
def evals(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The module's model runs, started together: each runs on one thread, so on a 2-core machine
    the two take about as long as the longer one alone."""
    out = tmp_path_factory.mktemp("eval") / "report.json"
    runs = {
        "pass": _Eval("--model", "default:int8", "--against", "default:float32", *QUICK, "--output", str(out)),
        "fail": _Eval("--model", "default:int8", "--limit", "1", "--max-tokens", "4", "--num-threads", "1",
                      "--max-perplexity", "1.5"),
    }
    yield {"out": out, **runs}
    for run in runs.values():
        if run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()


def test_bundled_sets_and_side_syntax(tmp_path: Path) -> None:
    assert len(load_prompts()) >= 16 and len(load_questions()) >= 20 and len(load_passage().split()) > 300
    assert parse_side("default:float32").dtype == "float32"
    # No quantization tag: the stored precision; beside a float dtype, that float precision.
    f32 = parse_side("default:float32")
    assert (f32.quantization, f32.label) == ("none", "default:float32")
    plain = parse_side("default")
    assert (plain.dtype, plain.quantization, plain.label) == ("auto", "auto", "default:auto")
    mixed = parse_side("default:float32,auto")
    assert (mixed.quantization, mixed.label) == ("auto", "default:float32,auto")
    assert parse_side("default", dtype="float32").quantization == "none"
    assert parse_side("default", quantization="none").label == "default:auto,none"
    with pytest.raises(ValueError, match="quantization must be int8, int4, none or auto, got 'fp8'"):
        parse_side("default", quantization="fp8")
    with pytest.raises(ValueError, match="need a quantization"):
        parse_side("default:none,native")
    s = parse_side("default:bfloat16,int8")
    assert (s.path, s.dtype, s.quantization) == ("default", "bfloat16", "int8")
    assert parse_side("default", quantization="int4").quantization == "int4"
    k = parse_side("default:int8,native")
    assert (k.quantization, k.kernels, k.label) == ("int8", "native", "default:auto,int8,native")
    assert parse_side("default:int4").kernels == "auto"
    with pytest.raises(ValueError, match="need a quantization"):
        parse_side("default:torch")
    with pytest.raises(ValueError, match="says dtype"):
        parse_side("default:float32", dtype="bfloat16")
    with pytest.raises(ValueError, match="does not exist"):
        parse_side(str(tmp_path / "nope:int8"))
    assert [p.text for p in parse_prompts('"plain"\n{"prompt": "x"}\n', "f")] == ["plain", "x"]
    for bad in ('{"prompt": ""}', "[1]", "{nope", '{"messages": [{"role": 1}]}'):
        with pytest.raises(ValueError, match="f:1"):
            parse_prompts(bad, "f")


def test_bad_input_exits_2_before_loading_anything(tmp_path: Path) -> None:
    runner = CliRunner()
    bad = tmp_path / "p.jsonl"
    bad.write_text("{not json\n")
    for args in (["--model", str(tmp_path / "missing")], ["--model", "default", "--prompts", str(bad)],
                 ["--model", "default:int8", "--quantization", "int4"], ["--model", "default", "--min-agreement", "2"],
                 ["--model", "default", "--against-dtype", "float32"], ["--model", "default", "--limit", "0"]):
        r = runner.invoke(app, ["eval", *args])
        assert r.exit_code == 2, (args, r.output)
        assert "error:" in r.output


@pytest.mark.slow
def test_int8_against_float32_passes_with_a_full_report(evals: dict[str, Any]) -> None:
    out = evals["out"]
    r = evals["pass"].result()
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report == json.loads(r.stdout)
    assert report["passed"] is True and report["failures"] == []
    assert report["model"]["quantization"] == "int8" and report["against"]["dtype"] == "float32"
    assert report["results"]["ran"]["quantization"] == "int8"  # what each side's engine ran
    assert report["against_results"]["ran"]["quantization"] == "none"
    assert report["settings"]["prompts"] == 3 and report["settings"]["questions"] == 3
    for side in ("results", "against_results"):
        res = report[side]
        assert res["questions"] == 3 and 0 <= res["correct"] <= 3 and 1 < res["perplexity"] < 200
        assert res["perplexity_tokens"] > 300
    agree = report["agreement"]
    assert 0.6 <= agree["token_agreement"] <= 1.0 and 0 <= agree["first_32_match_rate"] <= 1
    assert {c["name"] for c in report["checks"]} == {"accuracy", "token_agreement", "accuracy_vs_reference",
                                                     "perplexity_vs_reference"}
    # The two perplexities are of one text under nearly the same weights.
    assert report["results"]["perplexity"] == pytest.approx(report["against_results"]["perplexity"], rel=0.1)


@pytest.mark.slow
def test_a_failing_check_exits_1(evals: dict[str, Any]) -> None:
    r = evals["fail"].result()
    assert r.returncode == 1, r.stderr[-3000:]
    report = json.loads(r.stdout)
    assert report["passed"] is False and report["against"] is None
    assert [c["name"] for c in report["checks"] if not c["passed"]] == ["perplexity"]
    assert "FAIL" in r.stderr
