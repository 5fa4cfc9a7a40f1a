"""`lockgate eval`: a quality gate between two models (or two precisions of one), offline.

    lockgate eval --model default:int8 --against default:float32
    lockgate eval --model ./new-ckpt --against ./old-ckpt --prompts mine.jsonl --output report.json
    lockgate eval --model default:float32 --task lockgate_mc --task lockgate_qa
    lockgate export-tokenizer --model default ./smollm2-tokenizer

Measures greedy agreement with the reference over a prompt set, perplexity on a bundled
text and accuracy on a bundled question set; or, with `--task`, tasks as lm-evaluation-harness
runs them (multiple choice by log-likelihood, generate-until); prints a JSON report; exits 0
when every check passes, 1 when one fails, 2 on bad input.

`export-tokenizer` writes the tokenizer lockgate serves a model with (rebuilt from a GGUF's
metadata for the default model) as a Hugging Face tokenizer directory, for client tools.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from lockgate.eval import data, scoring
from lockgate.eval.tasks import BUNDLED, Task, load_task
from lockgate.eval.thresholds import Thresholds, judge, judge_tasks

if TYPE_CHECKING:  # the offline engine imports torch: only when a command runs
    from lockgate.eval.offline import Side


def eval_command(
    model: Annotated[str, typer.Option("--model", "-m", help="PATH[:TAGS]: a checkpoint or 'default'; TAGS: a dtype, int8|int4|none|auto and its kernels native|torch (e.g. default:int8, default:bfloat16, default:int8,native). No quantization tag: the stored precision (the default model: int4), or, beside a float dtype, that float precision (default:float32 is the dequantized reference)")],  # noqa: E501
    against: Annotated[Optional[str], typer.Option(help="The reference, same syntax (e.g. default:float32); without it only absolute thresholds apply")] = None,  # noqa: E501
    dtype: Annotated[Optional[str], typer.Option(help="--model's dtype (auto | float32 | bfloat16 | float16)")] = None,
    quantization: Annotated[Optional[str], typer.Option(help="--model's quantization (int8 | int4 | none | auto: as stored)")] = None,
    against_dtype: Annotated[Optional[str], typer.Option(help="--against's dtype")] = None,
    against_quantization: Annotated[Optional[str], typer.Option(help="--against's quantization")] = None,  # noqa: E501
    prompts: Annotated[Optional[str], typer.Option(help="JSONL prompts for agreement ({\"prompt\": ...} or {\"messages\": [...]}); default: the bundled set")] = None,  # noqa: E501
    max_tokens: Annotated[int, typer.Option(help="Greedy tokens per prompt")] = 32,
    limit: Annotated[Optional[int], typer.Option(help="Use only the first N prompts and questions (quick runs)")] = None,  # noqa: E501
    num_threads: Annotated[Optional[int], typer.Option(help="CPU threads per model")] = None,
    output: Annotated[Optional[str], typer.Option(help="Also write the JSON report here")] = None,
    min_agreement: Annotated[float, typer.Option(help="Greedy token agreement with --against at least this")] = 0.4,
    max_accuracy_drop: Annotated[float, typer.Option(help="Accuracy at most this much below --against's")] = 0.1,
    max_perplexity_ratio: Annotated[float, typer.Option(help="Perplexity at most this times --against's")] = 1.10,
    min_accuracy: Annotated[float, typer.Option(help="Accuracy at least this (absolute)")] = 0.0,
    max_perplexity: Annotated[Optional[float], typer.Option(help="Perplexity at most this (absolute)")] = None,
    task: Annotated[Optional[list[str]], typer.Option("--task", help=f"Run this task instead (repeatable): {' | '.join(BUNDLED)} or a JSONL file of {{context, choices, gold}} (multiple choice by log-likelihood) or {{question, answers}} (generate-until) items")] = None,  # noqa: E501
) -> None:
    """Compare a model with a reference (greedy agreement, perplexity, accuracy), or run --task tasks
    (multiple choice by log-likelihood, generate-until); exit 1 when a check fails."""
    try:
        from lockgate.eval.offline import parse_side

        side = parse_side(model, dtype, quantization)
        ref = parse_side(against, against_dtype, against_quantization) if against is not None else None
        if ref is None and (against_dtype or against_quantization):
            raise ValueError("--against-dtype / --against-quantization need --against")
        thresholds = Thresholds(min_agreement, max_accuracy_drop, max_perplexity_ratio, min_accuracy, max_perplexity)
        if not 1 <= max_tokens <= 4096:
            raise ValueError(f"--max-tokens must be in [1, 4096], got {max_tokens}")
        if limit is not None and limit < 1:
            raise ValueError(f"--limit must be >= 1, got {limit}")
        if task:
            if prompts is not None:
                raise ValueError("--prompts and --task do not go together (a task brings its own items)")
            tasks = [load_task(t).head(limit) for t in task]
            if len({t.name for t in tasks}) < len(tasks):
                raise ValueError("--task names a task twice")
        else:
            prompt_set = data.load_prompts(prompts)[:limit]
            questions = data.load_questions()[:limit]
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if task:
        report = run_tasks(side, ref, thresholds, tasks, num_threads)
    else:
        report = run(side, ref, thresholds, prompt_set, questions, max_tokens, num_threads, prompts or "bundled")
    text = json.dumps(report, indent=2)
    if output:
        Path(output).write_text(text + "\n", encoding="utf-8")
    typer.echo(text)
    verdict = "PASS" if report["passed"] else "FAIL: " + "; ".join(report["failures"])
    typer.echo(f"{side.label} vs {ref.label if ref else '(no reference)'}: {verdict}", err=True)
    if not report["passed"]:
        raise typer.Exit(1)


def run(side: Side, ref: Side | None, thresholds: Thresholds, prompt_set: list[data.Prompt],
        questions: list[data.Question], max_tokens: int, num_threads: int | None, source: str) -> dict[str, Any]:
    started = time.monotonic()
    passage = data.load_passage()
    from lockgate.eval.offline import measure

    mine, answers = measure(side, prompt_set, questions, passage, max_tokens, num_threads)
    theirs, ref_answers, agree = None, None, None
    if ref is not None:
        theirs, ref_answers = measure(ref, prompt_set, questions, passage, max_tokens, num_threads)
        agree = scoring.agreement(answers, ref_answers)
    verdict = judge(thresholds, mine["accuracy"], mine["perplexity"],
                    theirs["accuracy"] if theirs else None, theirs["perplexity"] if theirs else None,
                    agree["token_agreement"] if agree else None)
    return {"model": side.to_json(), "against": ref.to_json() if ref else None,
            "settings": {"prompts": len(prompt_set), "prompts_source": source, "questions": len(questions),
                         "max_tokens": max_tokens, "python": sys.version.split()[0]},
            "results": mine, "against_results": theirs, "agreement": agree,
            "thresholds": thresholds.to_json(), **verdict, "seconds": round(time.monotonic() - started, 2)}


def run_tasks(side: Side, ref: Side | None, thresholds: Thresholds, tasks: list[Task],
              num_threads: int | None) -> dict[str, Any]:
    """`--task`: every task on the model (and the reference), one model in memory at a time."""
    started = time.monotonic()
    from lockgate.eval.offline import measure_tasks

    mine = measure_tasks(side, tasks, num_threads)
    theirs = measure_tasks(ref, tasks, num_threads) if ref is not None else None
    verdict = judge_tasks(thresholds, {t.name: mine["tasks"][t.name]["acc"] for t in tasks},
                          {t.name: theirs["tasks"][t.name]["acc"] for t in tasks} if theirs else None)
    return {"model": side.to_json(), "against": ref.to_json() if ref else None,
            "settings": {"tasks": [t.to_json() for t in tasks], "python": sys.version.split()[0]},
            "results": mine, "against_results": theirs,
            "thresholds": thresholds.to_json(), **verdict, "seconds": round(time.monotonic() - started, 2)}


def export_tokenizer_command(
    out_dir: Annotated[str, typer.Argument(help="Directory to write (created if missing)")],
    model: Annotated[str, typer.Option("--model", "-m", help="'default' (the embedded model), a .gguf file or a HF checkpoint directory")] = "default",  # noqa: E501
) -> None:
    """Write the model's tokenizer, as lockgate serves it, as a Hugging Face tokenizer directory
    (for lm-evaluation-harness, guidellm and other clients that load one with AutoTokenizer)."""
    from lockgate.eval.hf_tokenizer import FILES, export_tokenizer

    try:
        out = export_tokenizer(model, out_dir)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    written = [f for f in FILES if (out / f).is_file()]
    typer.echo(f"wrote {', '.join(written)} to {out}")


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_command)
    app.command("export-tokenizer")(export_tokenizer_command)
