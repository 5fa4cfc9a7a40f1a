"""One task on a loaded `LLM`: multiple choice by log-likelihood, or generate-until by greedy replies.

Multiple choice (lm-evaluation-harness's metrics, same definitions): `acc`, the share of
items whose most likely choice (the first on a tie) is the gold one; `acc_norm`, the same
with each log-likelihood divided by its choice's length in characters. Every item's
log-likelihoods come back too, for comparing with another client item by item.
"""
from __future__ import annotations

import time
from typing import Any

from lockgate import LLM, SamplingParams
from lockgate.eval.loglikelihood import encode_pair, score
from lockgate.eval.tasks import MULTIPLE_CHOICE, Task


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=lambda i: (values[i], -i))  # first of equal maxima


def run_multiple_choice(llm: LLM, task: Task) -> dict[str, Any]:
    tok = llm.tokenizer
    pairs, owners = [], []
    for n, item in enumerate(task.items):
        for choice in item.choices:
            pairs.append(encode_pair(tok, item.context, task.target_delimiter + choice))
            owners.append(n)
    scored = score(llm, pairs)
    rows: list[dict[str, Any]] = [{"gold": item.gold, "loglikelihoods": [], "greedy": []} for item in task.items]
    for owner, s in zip(owners, scored):
        rows[owner]["loglikelihoods"].append(s.loglikelihood)
        rows[owner]["greedy"].append(s.greedy)
    acc = acc_norm = 0
    for item, row in zip(task.items, rows):
        lls = row["loglikelihoods"]
        row["pred"] = _argmax(lls)
        row["pred_norm"] = _argmax([ll / len(c) for ll, c in zip(lls, item.choices)])
        acc += row["pred"] == item.gold
        acc_norm += row["pred_norm"] == item.gold
    n = len(task.items)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "correct": acc, "correct_norm": acc_norm,
            "requests": len(pairs), "continuation_tokens": sum(len(c) for _, c in pairs), "items": rows}


def run_generate_until(llm: LLM, task: Task) -> dict[str, Any]:
    params = SamplingParams(temperature=0.0, max_tokens=task.max_gen_toks, stop=task.until or None)
    outs = llm.chat([[{"role": "user", "content": q.question}] for q in task.questions], params)
    replies = [o.outputs[0].text for o in outs]
    correct = [q.correct(r) for q, r in zip(task.questions, replies)]
    return {"acc": sum(correct) / len(correct), "correct": sum(correct),
            "items": [{"reply": r, "correct": c} for r, c in zip(replies, correct)]}


def run_task(llm: LLM, task: Task) -> dict[str, Any]:
    t0 = time.monotonic()
    out = run_multiple_choice(llm, task) if task.kind == MULTIPLE_CHOICE else run_generate_until(llm, task)
    return {"task": task.to_json(), **out, "seconds": round(time.monotonic() - t0, 2)}
