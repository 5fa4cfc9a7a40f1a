"""`lockgate eval`'s measurements on one model, offline with the `LLM` class.

A side is `PATH[:TAG[,TAG]]`: PATH a checkpoint or `default` (the embedded model), TAGs a
dtype (`float32`, `bfloat16`, `float16`, `auto`), a quantization (`int8`, `int4`, `none`,
`auto`) and/or its kernels (`native`, `torch`): `default:float32`, `default:int8`,
`default:int8,native`, `./qwen:bfloat16,int8`. A suffix that is not all tags is part of
the path. A side names a precision: no quantization tag means the checkpoint's stored one
(`default`, `default:auto`: the default model's Q4_1 blocks as int4), except beside a float
dtype, which names that float precision (`default:float32` is the weights dequantized to
float32, the reference); `default:float32,auto` is the stored precision with float32 for the rest.
"""
from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lockgate import LLM, SamplingParams
from lockgate.eval import scoring
from lockgate.eval.scoring import ANSWER_TOKENS
from lockgate.eval.data import Prompt, Question, encode_prompts
from lockgate.eval.perplexity import token_logprobs
from lockgate.eval.task_runner import run_task
from lockgate.eval.tasks import Task

DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("int8", "int4", "none", "auto")
KERNELS = ("native", "torch")  # quantized matmuls: lockgate's C kernels or PyTorch's (default: per precision)


@dataclass(slots=True)
class Side:
    path: str = "default"
    dtype: str = "auto"
    quantization: str = "auto"  # auto (as stored) | none (float) | int4 | int8
    kernels: str = "auto"

    @property
    def label(self) -> str:
        implied = "auto" if self.dtype == "auto" else "none"  # what the dtype tag alone means
        tags = [self.dtype] + ([self.quantization] if self.quantization != implied else [])
        tags += [self.kernels] if self.kernels != "auto" else []
        return f"{self.path}:{','.join(tags)}"

    def to_json(self) -> dict[str, Any]:
        return {"spec": self.label, "path": self.path, "dtype": self.dtype, "quantization": self.quantization,
                "kernels": self.kernels}


def parse_side(value: str, dtype: str | None = None, quantization: str | None = None) -> Side:
    """A side from its spec and the explicit --dtype/--quantization flags (which must not contradict it)."""
    path, tags = value, []
    head, sep, tail = value.rpartition(":")
    if sep and head and tail and all(t in DTYPES + QUANTIZATIONS + KERNELS for t in tail.split(",")):
        path, tags = head, tail.split(",")
    side = Side(path=path or "default")
    # "auto" is a dtype and a quantization: beside a float dtype tag it is the quantization.
    float_dtype = any(t in DTYPES and t != "auto" for t in tags)
    said_dtype = said_quantization = False
    for t in tags:
        if t in DTYPES and not (t == "auto" and float_dtype):
            side.dtype, said_dtype = t, True
        elif t in KERNELS:
            side.kernels = t
        else:
            side.quantization, said_quantization = t, True
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if said_dtype and side.dtype != dtype:
            raise ValueError(f"{value!r} says dtype {side.dtype} but the flag says {dtype}")
        side.dtype = dtype
    if quantization is not None:
        if quantization not in QUANTIZATIONS:
            raise ValueError(f"quantization must be int8, int4, none or auto, got {quantization!r}")
        if said_quantization and side.quantization != quantization:
            raise ValueError(f"{value!r} says quantization {side.quantization} but the flag says {quantization}")
        side.quantization = quantization
    elif side.dtype != "auto" and not said_quantization:
        side.quantization = "none"  # a float dtype alone names that float precision
    if side.kernels != "auto" and side.quantization not in ("int8", "int4"):
        raise ValueError(f"{value!r}: kernels {side.kernels!r} need a quantization (int8 or int4)")
    if side.path != "default" and not Path(side.path).expanduser().exists():
        raise ValueError(f"model path {side.path!r} does not exist (or use 'default' for the embedded model)")
    return side


def load(side: Side, num_threads: int | None = None) -> LLM:
    """The side's model in an offline engine (no prefix caching: `perplexity.py` writes into free blocks)."""
    return LLM(None if side.path == "default" else side.path, dtype=side.dtype, quantization=side.quantization,
               quantization_kernels=side.kernels, enable_prefix_caching=False, num_threads=num_threads)


def ran(llm: LLM) -> dict[str, str]:
    """What the side's engine ran: the precision (int4 | int8 | none), dtype and step path."""
    runner = llm.engine.core.runner
    return {"quantization": runner.quantization or "none", "dtype": str(runner.dtype).removeprefix("torch."),
            "kernels": runner.kernels, "path": runner.path}


def measure(side: Side, prompts: list[Prompt], questions: list[Question], passage: str, max_tokens: int,
            num_threads: int | None = None) -> tuple[dict[str, Any], list[list[int]]]:
    """(figures, greedy answer token ids per prompt) for one side; the model is freed after."""
    t0 = time.monotonic()
    llm = load(side, num_threads)
    loaded = time.monotonic()
    greedy = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    outs = llm.generate(encode_prompts(llm.tokenizer, prompts), greedy)
    answers = [list(o.outputs[0].token_ids) for o in outs]
    replies = [o.outputs[0].text for o in llm.chat([[{"role": "user", "content": q.question}] for q in questions],
                                                   SamplingParams(temperature=0.0, max_tokens=ANSWER_TOKENS))]
    acc = scoring.accuracy(questions, replies)
    lps = token_logprobs(llm, llm.tokenizer.encode(passage, add_special_tokens=True))
    figures = {**acc, "perplexity": round(scoring.perplexity(lps), 4), "perplexity_tokens": len(lps),
               "ran": ran(llm),
               "load_seconds": round(loaded - t0, 2), "eval_seconds": round(time.monotonic() - loaded, 2),
               "replies": replies}
    del llm, outs
    gc.collect()  # one model in memory at a time
    return figures, answers


def measure_tasks(side: Side, tasks: list[Task], num_threads: int | None = None) -> dict[str, Any]:
    """Every task on one side (`eval --task`); the model is freed after."""
    t0 = time.monotonic()
    llm = load(side, num_threads)
    loaded = time.monotonic()
    results = {task.name: run_task(llm, task) for task in tasks}
    what = ran(llm)
    del llm
    gc.collect()
    return {"tasks": results, "ran": what, "load_seconds": round(loaded - t0, 2),
            "eval_seconds": round(time.monotonic() - loaded, 2)}
