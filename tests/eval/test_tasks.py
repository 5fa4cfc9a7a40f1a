"""`lockgate eval --task`: the bundled tasks, and the multiple-choice log-likelihood mode on the
real engine (the default model, float32, a few items) checked against the model's own
teacher-forced log-probabilities."""
from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from lockgate import SamplingParams
from lockgate.cli import app
from lockgate.engine.loader import load_checkpoint
from lockgate.eval.loglikelihood import encode_pair, score
from lockgate.eval.offline import Side, load
from lockgate.eval.perplexity import token_logprobs
from lockgate.eval.task_runner import run_task
from lockgate.eval.tasks import GENERATE_UNTIL, MULTIPLE_CHOICE, load_task, parse_task, write_jsonl
from lockgate.eval.thresholds import Thresholds, judge_tasks


def test_bundled_tasks_and_their_file_format(tmp_path: Path) -> None:
    mc = load_task("lockgate_mc")
    assert mc.kind == MULTIPLE_CHOICE and len(mc) >= 30
    assert all(len(i.choices) == 4 and 0 <= i.gold < 4 for i in mc.items)
    assert {i.gold for i in mc.items} == {0, 1, 2, 3}
    qa = load_task("lockgate_qa")
    assert qa.kind == GENERATE_UNTIL and len(qa) == 20 and qa.max_gen_toks > 0
    assert len(mc.head(5)) == 5 and len(mc.head(None)) == len(mc)
    copy = load_task(str(write_jsonl(mc, tmp_path / "mine.jsonl")))
    assert copy.name == "mine" and copy.items == mc.items
    for bad, msg in [('{"context": "", "choices": ["a", "b"], "gold": 0}', "context"),
                     ('{"context": "c", "choices": ["a"], "gold": 0}', "choices"),
                     ('{"context": "c", "choices": ["a", "b"], "gold": 2}', "gold"),
                     ('{"context": "c", "choices": ["a", "b"], "gold": true}', "gold"),
                     ('{"question": "q", "answers": []}', "answers"),
                     ('{"text": "x"}', "expected"), ("[1]", "object"), ("{no", "not JSON"), ("", "no items")]:
        with pytest.raises(ValueError, match=msg):
            parse_task(bad, "t", "f")
    with pytest.raises(ValueError, match="neither a bundled task"):
        load_task(str(tmp_path / "missing.jsonl"))


def test_encode_pair_moves_trailing_space_to_the_continuation() -> None:
    tok = load_checkpoint(None).tokenizer
    ctx, cont = encode_pair(tok, "Question: What is 2 + 2?\nAnswer:", " 4")
    assert ctx == tok.encode("Question: What is 2 + 2?\nAnswer:", add_special_tokens=False)
    assert ctx + cont == tok.encode("Question: What is 2 + 2?\nAnswer: 4", add_special_tokens=False)
    assert encode_pair(tok, "Answer: ", "4") == encode_pair(tok, "Answer:", " 4")
    with pytest.raises(ValueError, match="context"):
        encode_pair(tok, "", "x")


def test_multiple_choice_on_the_engine_matches_teacher_forcing() -> None:
    llm = load(Side(dtype="float32", quantization="none"), num_threads=2)
    task = load_task("lockgate_mc").head(5)
    result = run_task(llm, task)
    assert result["requests"] == 20 and len(result["items"]) == 5
    for n, (item, row) in enumerate(zip(task.items, result["items"])):
        lls = row["loglikelihoods"]
        assert len(lls) == 4 and all(ll < 0 for ll in lls)
        assert row["pred"] == lls.index(max(lls))
        norm = [ll / len(c) for ll, c in zip(lls, item.choices)]
        assert row["pred_norm"] == norm.index(max(norm))
        # The same sums from a plain forward pass of the model over each joined sequence
        # (two items: a forward pass each costs as much as the whole batch above).
        for choice, ll in zip(item.choices, lls) if n < 2 else ():
            ctx, cont = encode_pair(llm.tokenizer, item.context, " " + choice)
            forced = token_logprobs(llm, ctx + cont)[len(ctx) - 1:]
            assert ll == pytest.approx(sum(forced), abs=2e-3)
    assert result["acc"] == sum(r["pred"] == r["gold"] for r in result["items"]) / 5
    assert result["acc_norm"] == sum(r["pred_norm"] == r["gold"] for r in result["items"]) / 5
    # A continuation that is the model's own greedy choice is flagged greedy, and scores higher
    # than an unlikely one.
    ctx = llm.tokenizer.encode("The capital of France is", add_special_tokens=False)
    nxt = llm.generate([ctx], SamplingParams(temperature=0, max_tokens=1))[0].outputs[0].token_ids
    good, bad = score(llm, [(ctx, list(nxt)), (ctx, llm.tokenizer.encode(" zebra", add_special_tokens=False))])
    assert good.greedy and not bad.greedy and good.loglikelihood > bad.loglikelihood


def test_task_verdict_and_bad_input_exit_2(tmp_path: Path) -> None:
    v = judge_tasks(Thresholds(min_accuracy=0.5, max_accuracy_drop=0.1), {"a": 0.6, "b": 0.4}, {"a": 0.8, "b": 0.4})
    assert [c["name"] for c in v["checks"] if not c["passed"]] == ["a.acc_vs_reference", "b.acc"]
    runner = CliRunner()
    for args in (["--task", "nope"], ["--task", "lockgate_mc", "--prompts", "x.jsonl"],
                 ["--task", "lockgate_mc", "--task", "lockgate_mc"], ["--task", "lockgate_mc", "--limit", "0"]):
        r = runner.invoke(app, ["eval", "--model", "default", *args])
        assert r.exit_code == 2 and "error:" in r.output, (args, r.output)
