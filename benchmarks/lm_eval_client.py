"""lm-evaluation-harness against a lockgate server, checked against `lockgate eval --task` offline.

    .venv/bin/python benchmarks/lm_eval_client.py [--dtype float32] [--limit N] [--concurrency 1] [--batch-size 1]
                                                  [--work-dir DIR] [--venv DIR] [--skip-generate] [--json out.json]

What it does, each step printed with its command:
1. lm-eval in its own virtual environment (`benchmarks/tool_venv.py`: under
   ~/.cache/lockgate/tools/lm-eval, installed once: `lm-eval[api]==0.4.13` and the project's
   transformers, with `torch==2.13.0` as a pip constraint: its API models need no torch, and
   nothing may pull a CUDA build in).
2. `lockgate export-tokenizer` of the default model (a GGUF: the tokenizer is rebuilt from its
   metadata) into WORK/tokenizer, the directory lm-eval loads with AutoTokenizer.
3. The bundled tasks as lm-eval tasks in WORK/tasks (YAML over local JSONL files; nothing is
   downloaded: the Hugging Face libraries run offline): `lockgate_mc` (multiple choice,
   `acc` and `acc_norm` by log-likelihood) and `lockgate_qa` (generate-until, a reply is correct
   when it contains an accepted answer, as `lockgate eval` scores it).
4. A lockgate server (`python -m lockgate.server --dtype DTYPE`, default model) on a loopback port.
5. `lm_eval --model local-completions` on `lockgate_mc`: lm-eval tokenizes each context and
   context+choice with the exported tokenizer and sends the ids with `echo: true, logprobs: 1,
   max_tokens: 1`; it sums the prompt tokens' logprobs past the context. Then
   `lm_eval --model local-chat-completions --apply_chat_template` on `lockgate_qa`.
6. `lockgate eval --model default:DTYPE --task lockgate_mc --task lockgate_qa` (offline engine).
7. PASS when lm-eval's `acc` and `acc_norm` on `lockgate_mc` equal lockgate eval's; also printed:
   the largest difference between the two per-choice log-likelihoods, and the generate task's
   accuracies (greedy replies through the server and offline; a difference there is reported,
   not failed: the issue asks for the multiple-choice equality).

Exit status: 0 PASS, 1 FAIL, 2 a step could not run (install, server, lm-eval error).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tool_venv import ensure_tool, tools_dir  # noqa: E402

from lockgate.bench.procs import ServerProcess  # noqa: E402
from lockgate.eval.hf_tokenizer import export_tokenizer  # noqa: E402
from lockgate.eval.tasks import Task, load_task, write_jsonl  # noqa: E402

LM_EVAL = ["lm-eval[api]==0.4.13", "transformers==5.23.0"]

MC_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: gold
target_delimiter: {delimiter}
num_fewshot: 0
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

GEN_YAML = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: question
doc_to_target: "{{{{answers[0]}}}}"
num_fewshot: 0
generation_kwargs:
  until: {until}
  max_gen_toks: {max_gen_toks}
  do_sample: false
  temperature: 0
process_results: !function lockgate_scoring.process_results
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

# The generate task's scoring, as lockgate eval's (`Question.correct`): the reply contains an
# accepted answer, case-insensitive.
SCORING_PY = '''\
def process_results(doc, results):
    reply = results[0].lower()
    return {"acc": float(any(a.lower() in reply for a in doc["answers"]))}
'''


def run(cmd: list[str], env: dict[str, str] | None = None, log: Path | None = None) -> subprocess.CompletedProcess:
    print("+ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    t0 = time.monotonic()
    if log is None:
        proc = subprocess.run(cmd, env=env, text=True)
    else:
        with open(log, "w") as f:
            proc = subprocess.run(cmd, env=env, text=True, stdout=f, stderr=subprocess.STDOUT)
    print(f"  ({time.monotonic() - t0:.1f} s, exit {proc.returncode}{'' if log is None else f', log {log}'})",
          flush=True)
    return proc


def write_tasks(tasks_dir: Path, mc: Task, qa: Task | None) -> None:
    tasks_dir.mkdir(parents=True, exist_ok=True)
    data = write_jsonl(mc, tasks_dir / f"{mc.name}.jsonl")
    (tasks_dir / f"{mc.name}.yaml").write_text(MC_YAML.format(
        name=mc.name, data=json.dumps(str(data)), delimiter=json.dumps(mc.target_delimiter)))
    if qa is not None:
        data = write_jsonl(qa, tasks_dir / f"{qa.name}.jsonl")
        (tasks_dir / f"{qa.name}.yaml").write_text(GEN_YAML.format(
            name=qa.name, data=json.dumps(str(data)), until=json.dumps(qa.until), max_gen_toks=qa.max_gen_toks))
        (tasks_dir / "lockgate_scoring.py").write_text(SCORING_PY)


def lm_eval_results(out_dir: Path, task: str) -> tuple[dict, list[dict]]:
    """(the task's metrics, its logged samples by doc id) from an lm-eval --output_path directory."""
    results = sorted(out_dir.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    if not results:
        raise RuntimeError(f"lm-eval wrote no results_*.json under {out_dir}")
    metrics = json.loads(results[-1].read_text())["results"][task]
    samples: list[dict] = []
    for f in sorted(out_dir.rglob(f"samples_{task}_*.jsonl")):
        samples = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return metrics, sorted(samples, key=lambda s: s["doc_id"])


def metric(metrics: dict, name: str) -> float:
    for key, value in metrics.items():
        if key.split(",")[0] == name:  # lm-eval names them "acc,none"
            return float(value)
    raise KeyError(f"lm-eval reported no {name!r}: {sorted(metrics)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="float32", help="the server's and lockgate eval's dtype (one precision)")
    ap.add_argument("--limit", type=int, default=None, help="first N items of each task")
    ap.add_argument("--concurrency", type=int, default=1, help="lm-eval's num_concurrent")
    ap.add_argument("--batch-size", type=int, default=1, help="lm-eval's batch_size for the multiple-choice task "
                    "(prompts per /v1/completions request)")
    ap.add_argument("--work-dir", default=None, help="tokenizer, tasks, logs and results (default: a temp dir)")
    ap.add_argument("--venv", default=None, help=f"lm-eval's venv (default: {tools_dir() / 'lm-eval'})")
    ap.add_argument("--skip-generate", action="store_true", help="only the multiple-choice task")
    ap.add_argument("--json", default=None, help="also write the summary here")
    args = ap.parse_args()

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="lockgate-lm-eval-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"work dir: {work}", flush=True)
    try:
        # lm-eval's API models need no torch (transformers only tokenizes here): not installed.
        bin_dir = ensure_tool("lm-eval", LM_EVAL, "lm_eval", Path(args.venv) if args.venv else None, torch_first=False)
    except (subprocess.CalledProcessError, RuntimeError) as e:
        print(f"SETUP FAILED: lm-eval install: {e}", file=sys.stderr)
        return 2

    lockgate_bin = Path(sys.executable).parent / "lockgate"
    print(f"+ {lockgate_bin} export-tokenizer --model default {work / 'tokenizer'}", flush=True)
    tok_dir = export_tokenizer(None, work / "tokenizer")
    mc = load_task("lockgate_mc").head(args.limit)
    qa = None if args.skip_generate else load_task("lockgate_qa").head(args.limit)
    write_tasks(work / "tasks", mc, qa)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_DATASETS_CACHE": str(work / "hf-datasets"),
           "OPENAI_API_KEY": os.environ.get("OPENAI_API_KEY", "unused"), "TOKENIZERS_PARALLELISM": "false"}
    summary: dict = {"dtype": args.dtype, "items": {mc.name: len(mc), **({qa.name: len(qa)} if qa else {})},
                     "concurrency": args.concurrency, "batch_size": args.batch_size, "work_dir": str(work)}
    server_args = ["--dtype", args.dtype]
    print(f"+ {sys.executable} -m lockgate.server {' '.join(server_args)}   (log {work / 'server.log'})", flush=True)
    try:
        server = ServerProcess(server_args, work / "server.log")
    except (RuntimeError, TimeoutError) as e:
        print(f"SETUP FAILED: server: {e}", file=sys.stderr)
        return 2
    try:
        model = httpx.get(f"{server.base_url}/v1/models", timeout=10).json()["data"][0]["id"]
        lm_eval = str(bin_dir / "lm_eval")
        # Headers replace lm-eval's own (the key it would send from OPENAI_API_KEY): an evaluation is
        # bulk traffic, so it goes as lockgate's `batch` class (a 30 s TTFT target): under load the
        # server queues it instead of refusing it at once (429 slo_unattainable), which lm-eval's
        # concurrent path retries without waiting.
        header = {"Authorization": f"Bearer {env['OPENAI_API_KEY']}", "x-lockgate-priority": "batch"}
        runs = [("mc", "local-completions", mc, {
            "base_url": f"{server.base_url}/v1/completions", "model": model, "tokenizer": str(tok_dir),
            "tokenizer_backend": "huggingface"})]
        if qa is not None:
            runs.append(("qa", "local-chat-completions", qa, {
                "base_url": f"{server.base_url}/v1/chat/completions", "model": model}))
        for tag, kind, task, model_args in runs:
            config = {"model": kind, "model_args": {**model_args, "num_concurrent": args.concurrency,
                                                    "max_retries": 5, "timeout": 300, "header": header},
                      "tasks": [task.name], "include_path": str(work / "tasks"),
                      "output_path": str(work / f"out-{tag}"), "log_samples": True}
            if kind == "local-chat-completions":
                config["apply_chat_template"] = True  # (chat requests go one at a time: no batch_size)
            else:
                config["batch_size"] = args.batch_size
            config_path = work / f"lm_eval_{tag}.yaml"
            config_path.write_text(yaml.safe_dump(config, sort_keys=False))
            print(f"lm-eval config {config_path}:\n" + config_path.read_text(), end="", flush=True)
            t0 = time.monotonic()
            proc = run([lm_eval, "run", "--config", str(config_path)], env, work / f"lm_eval_{tag}.log")
            summary[f"lm_eval_{tag}_seconds"] = round(time.monotonic() - t0, 1)
            if proc.returncode != 0:
                print((work / f"lm_eval_{tag}.log").read_text()[-4000:], file=sys.stderr)
                print(f"SETUP FAILED: lm-eval on {task.name} exited {proc.returncode} "
                      f"(server log: {work / 'server.log'})", file=sys.stderr)
                return 2
    finally:
        server.stop()

    report_path = work / "lockgate_eval.json"
    cmd = [str(lockgate_bin), "eval", "--model", f"default:{args.dtype}",
           "--task", str(work / "tasks" / f"{mc.name}.jsonl"), "--output", str(report_path)]
    if qa is not None:
        cmd += ["--task", str(work / "tasks" / f"{qa.name}.jsonl")]
    t0 = time.monotonic()
    proc = run(cmd, log=work / "lockgate_eval.log")
    summary["lockgate_eval_seconds"] = round(time.monotonic() - t0, 1)
    if proc.returncode != 0:
        print((work / "lockgate_eval.log").read_text()[-4000:], file=sys.stderr)
        print("SETUP FAILED: lockgate eval", file=sys.stderr)
        return 2
    mine = json.loads(report_path.read_text())["results"]["tasks"]

    theirs, samples = lm_eval_results(work / "out-mc", mc.name)
    ours = mine[mc.name]
    rows = [(mc.name, "acc", metric(theirs, "acc"), ours["acc"]),
            (mc.name, "acc_norm", metric(theirs, "acc_norm"), ours["acc_norm"])]
    worst, greedy_differ = 0.0, 0
    for s in samples:
        row = ours["items"][s["doc_id"]]
        lls = [float(r[0]) for r in s["filtered_resps"]]
        worst = max([worst] + [abs(a - b) for a, b in zip(lls, row["loglikelihoods"])])
        greedy_differ += sum((str(r[1]) == "True") != g for r, g in zip(s["filtered_resps"], row["greedy"]))
    summary["max_abs_loglikelihood_diff"] = worst
    summary["greedy_flags_differing"] = greedy_differ
    summary["samples_compared"] = len(samples)
    passed = all(a == b for _, _, a, b in rows) and len(samples) == len(mc)
    if qa is not None:
        theirs_qa, qa_samples = lm_eval_results(work / "out-qa", qa.name)
        rows.append((qa.name, "acc", metric(theirs_qa, "acc"), mine[qa.name]["acc"]))
        differ = [(s["doc_id"], s["filtered_resps"][0], mine[qa.name]["items"][s["doc_id"]]["reply"])
                  for s in qa_samples if s["filtered_resps"][0] != mine[qa.name]["items"][s["doc_id"]]["reply"]]
        summary["generate_replies_differing"] = len(differ)
        for doc_id, a, b in differ[:5]:
            print(f"  {qa.name} doc {doc_id}: lm-eval {a!r} vs lockgate eval {b!r}")

    print(f"\n{'task':<14}{'metric':<10}{'lm-eval (server)':>18}{'lockgate eval':>15}  same")
    for task, name, a, b in rows:
        print(f"{task:<14}{name:<10}{a:>18.4f}{b:>15.4f}  {'yes' if a == b else 'NO'}")
    print(f"per-choice log-likelihoods: {len(samples)} items, largest |lm-eval - lockgate eval| = {worst:.2e}; "
          f"is-greedy flags differing: {greedy_differ}")
    summary["rows"] = [{"task": t, "metric": m, "lm_eval": a, "lockgate_eval": b} for t, m, a, b in rows]
    summary["passed"] = passed
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    print(("PASS" if passed else "FAIL") + f": lm-eval's {mc.name} accuracy "
          + ("equals" if passed else "differs from") + " lockgate eval's (same items, dtype " + args.dtype + ")")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
