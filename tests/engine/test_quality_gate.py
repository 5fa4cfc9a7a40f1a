"""Quality gate of each quantized precision against float32 on the default model (SmolLM2 Q4_1).

float32 runs the GGUF's weights dequantized (`quantization="none"`); `int4` (the default model's
default: its stored precision) runs the same Q4_1 blocks through the
native kernels (int8 activations per 32 values, as llama.cpp), `int8` re-quantizes them per
channel (PyTorch's kernel, bfloat16 activations: its native Q8_0 form failed this gate). Gate: the
precision answers as many questions as float32 (one fewer at most) and its greedy tokens
agree with float32's on most of each answer. `python -m tests.engine.test_quality_gate`
prints the table kept in docs/PERFORMANCE.md.
"""
from __future__ import annotations

import functools

import pytest

from lockgate import LLM, SamplingParams

QUESTIONS = [
    ("What is the capital of France?", ["paris"]),
    ("What is the capital of Japan?", ["tokyo"]),
    ("What is the capital of Italy?", ["rome"]),
    ("What is 2 + 2?", ["4", "four"]),
    ("What color is the sky on a clear day?", ["blue"]),
    ("Which planet is the largest in our solar system?", ["jupiter"]),
    ("How many days are there in a week?", ["7", "seven"]),
    ("What is the opposite of hot?", ["cold"]),
    ("What do bees make?", ["honey"]),
    ("What is the freezing point of water in degrees Celsius?", ["0", "zero"]),
]
MAX_TOKENS = 24


@functools.cache
def answers(precision: str) -> tuple[list[list[int]], list[str]]:
    prec, _, kernels = precision.partition(":")  # e.g. "int8:native"
    llm = LLM(dtype="float32", quantization="none" if prec == "float32" else prec,
              quantization_kernels=kernels or "auto")
    outs = llm.chat([[{"role": "user", "content": q}] for q, _ in QUESTIONS],
                    SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS))
    return [list(o.outputs[0].token_ids) for o in outs], [o.outputs[0].text for o in outs]


def scores(precision: str) -> tuple[int, float, int]:
    """(questions answered, mean greedy agreement with float32, answers identical to float32)."""
    ref_ids, _ = answers("float32")
    ids, texts = answers(precision)
    correct = sum(any(a in t.lower() for a in accepted) for t, (_, accepted) in zip(texts, QUESTIONS))
    agree = []
    for a, b in zip(ids, ref_ids):
        common = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        agree.append(common / max(len(a), len(b)))
    return correct, sum(agree) / len(agree), sum(a == b for a, b in zip(ids, ref_ids))


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_precision_passes_the_gate(precision):
    ref_correct, _, _ = scores("float32")
    correct, agreement, identical = scores(precision)
    assert ref_correct >= 7  # the reference itself answers (else the gate measures nothing)
    assert correct >= ref_correct - 1, answers(precision)[1]
    assert agreement >= 0.6, (agreement, identical)


if __name__ == "__main__":
    print("| precision | answers correct | greedy agreement with float32 | answers identical to float32 |")
    print("|---|---|---|---|")
    for p in ("float32", "int4", "int8", "int4:torch", "int8:native"):
        c, a, i = scores(p)
        print(f"| {p} | {c}/{len(QUESTIONS)} | {a:.0%} | {i}/{len(QUESTIONS)} |")
