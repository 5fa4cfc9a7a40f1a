"""Speculative decoding on the default model (int4 on its own blocks, CPU): off against on, one run.

    .venv/bin/python benchmarks/speculative.py [--rounds 2] [--max-tokens 128] [--skip-llamacpp]

Prints, all measured in the same run on the same machine:
1. The cost of a verify step with k extra rows against a one-row step (k = 1..8): on a CPU the
   rows are not free, and this curve bounds the gain; the k the plan picks from it at a given
   per-token acceptance (the engine picks per request and per step, from each request's own).
2. Tokens/s with speculation off and on (ngram prompt lookup), 1 stream and 8 streams, on two
   prompt sets that ship with the benchmark (benchmarks/data/speculative_prompts.json): input-
   grounded (rewrite, edit, copy a given passage or function) and open-ended chat. Rounds
   alternate off and on, so each pair sees the same machine; the best round of each is kept.
   Beside the 1-stream ratio, the figure the cost curve predicts from the run's own acceptance.
3. Acceptance rate and mean accepted length per set.
4. The peer: llama.cpp's prompt lookup decoding (llama-cpp-python's LlamaPromptLookupDecoding) on
   the same GGUF and the same prompt tokens, off and on, 1 stream, when llama-cpp-python is
   installed (benchmarks/cpu_engine.py says how; found at /tmp/llamacpp-venv or --llamacpp-python).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from lockgate import LLM, SamplingParams
from lockgate.engine.loader import default_model_path
from lockgate.engine.spec.cost import StepCostCurve, plan

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_engine import find_llamacpp_python  # noqa: E402

PROMPTS = Path(__file__).resolve().parent / "data" / "speculative_prompts.json"

# Runs in llama-cpp-python's interpreter: each stdin line is a JSON list of prompts (token ids);
# answered with [tokens, seconds] for plain greedy decoding and for prompt lookup decoding.
LLAMACPP_SCRIPT = r"""
import json, sys, time
from llama_cpp import Llama
from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
path, threads, k, max_tokens = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
plain = Llama(model_path=path, n_ctx=2048, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
lookup = Llama(model_path=path, n_ctx=2048, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False,
               draft_model=LlamaPromptLookupDecoding(max_ngram_size=3, num_pred_tokens=k))
def run1(llm, p):
    llm.reset()
    n, t0 = 0, time.perf_counter()
    for tok in llm.generate(p, temp=0.0, top_k=1, reset=True):
        n += 1
        if tok == llm.token_eos() or n >= max_tokens:
            break
    return n, time.perf_counter() - t0
run1(plain, [1, 2, 3]); run1(lookup, [1, 2, 3])
print("ready", flush=True)
for line in sys.stdin:
    prompts = json.loads(line)
    out = []
    for llm in (plain, lookup):
        n = s = 0
        for p in prompts:
            a, b = run1(llm, p)
            n, s = n + a, s + b
        out.append([n, s])
    print(json.dumps(out), flush=True)
"""


def load_prompts(llm: LLM) -> dict[str, list[list[int]]]:
    sets = json.loads(PROMPTS.read_text())
    tok = llm.tokenizer
    return {name: [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True),
                              add_special_tokens=False) for p in prompts] for name, prompts in sets.items()}


def timed(llm: LLM, prompts: list[list[int]], streams: int, max_tokens: int) -> tuple[int, float, float]:
    """(output tokens, seconds, decode seconds) for the prompts, `streams` at a time, greedy. Decode
    seconds: each batch's time from its last first token to its end (prefill excluded)."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    tokens, t0, decode = 0, time.perf_counter(), 0.0
    for i in range(0, len(prompts), streams):
        outs = llm.generate(prompts[i:i + streams], params)
        first = max(t.first_token for o in outs for t in o.engine_times)
        last = max(t.last_token for o in outs for t in o.engine_times)
        decode += last - first
        for o in outs:
            tokens += len(o.outputs[0].token_ids) - 1  # the first token comes from the prefill
    return tokens, time.perf_counter() - t0, decode


def predicted(curve: StepCostCurve, tokens: int, drafts: int, drafted: int, accepted: int) -> float:
    """The 1-stream speedup the cost curve predicts from a run's own counts: verify steps cost
    curve(1 + mean proposals) one-row steps and give 1 + their accepted tokens; the rest give one."""
    if not drafts:
        return 1.0
    plain = max(0, tokens - drafts - accepted)
    cost = drafts * curve.relative(1 + round(drafted / drafts)) + plain
    return tokens / cost


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--llamacpp-python")
    args = ap.parse_args()
    cfg = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_min": 2, "prompt_lookup_max": 5}
    off, on = LLM(), LLM(speculative_config=cfg)
    runner = on.engine.core.runner
    print(f"lockgate: {runner.describe(runner.quantization)}")
    print(f"speculative_config: {json.dumps(cfg)}")

    # 1. The verify-step cost curve.
    rows = list(range(1, 10))
    points = runner.measure_rows(rows, context=256, reps=3)
    curve = StepCostCurve.from_points(points)
    print("\n| rows (1 + k) | step ms | against 1 row |\n|---|---|---|")
    for r in rows:
        print(f"| {r} (k={r - 1}) | {1e3 * points[r]:.2f} | {points[r] / points[1]:.2f}x |")
    for a in (0.5, 0.7, 0.8, 0.9):
        k = plan(curve, 1, 1, [(a, 8)])[0]
        print(f"per-token acceptance {a:.1f}: the plan proposes {k} at 1 stream")
    spec = on.engine.core.speculator
    print(f"engine: speculation off for the step from {spec.off_at} decodes (80%-accepted proposals; measured)")

    prompts = load_prompts(on)
    results: dict[tuple[str, int], dict[str, float]] = {}
    for name, ps in prompts.items():
        for streams in (1, 8):
            best = {"off": 0.0, "on": 0.0, "off_decode": 0.0, "on_decode": 0.0}
            counts = (0, 0, 0, 0)
            for _ in range(args.rounds):
                n, s, d = timed(off, ps, streams, args.max_tokens)
                best["off"], best["off_decode"] = max(best["off"], n / s), max(best["off_decode"], n / d)
                b = spec.stats
                before = (b.num_drafts, b.num_draft_tokens, b.num_accepted_tokens, list(b.accepted_per_pos),
                          list(b.proposed_per_pos))
                n, s, d = timed(on, ps, streams, args.max_tokens)
                best["on"], best["on_decode"] = max(best["on"], n / s), max(best["on_decode"], n / d)
                st = spec.stats
                counts = (n, st.num_drafts - before[0], st.num_draft_tokens - before[1],
                          st.num_accepted_tokens - before[2])
                acc = [a - (before[3][j] if j < len(before[3]) else 0) for j, a in enumerate(st.accepted_per_pos)]
                made = [p - (before[4][j] if j < len(before[4]) else 0) for j, p in enumerate(st.proposed_per_pos)]
                per_pos = " / ".join(f"{100 * a / p:.0f}%" for a, p in zip(acc, made) if p)
            n, drafts, drafted, accepted = counts
            results[(name, streams)] = {
                **best, "ratio": best["on"] / best["off"], "decode_ratio": best["on_decode"] / best["off_decode"],
                "acceptance": accepted / drafted if drafted else 0.0,
                "mean_len": 1 + accepted / drafts if drafts else 1.0,
                "predicted": predicted(curve, n, drafts, drafted, accepted) if streams == 1 else float("nan"),
                "per_pos": per_pos or "-",
            }
            print(f"{name}, {streams} stream(s): off {best['off']:.1f} tok/s, on {best['on']:.1f} tok/s "
                  f"({best['on'] / best['off']:.2f}x; decode after the first token {best['off_decode']:.1f} -> "
                  f"{best['on_decode']:.1f}); proposals {drafted}, accepted {accepted}", flush=True)

    peer: dict[str, tuple[float, float]] = {}
    if not args.skip_llamacpp:
        py = find_llamacpp_python(args.llamacpp_python)
        if py is None:
            print("llama-cpp-python is not installed: no peer (benchmarks/cpu_engine.py says how)")
        else:
            proc = subprocess.Popen([py, "-c", LLAMACPP_SCRIPT, str(default_model_path()), str(runner.threads),
                                     str(args.k), str(args.max_tokens)], stdin=subprocess.PIPE,
                                    stdout=subprocess.PIPE, text=True)
            assert proc.stdout is not None and proc.stdin is not None
            if proc.stdout.readline().strip() == "ready":
                for name, ps in prompts.items():
                    best_plain = best_lookup = 0.0
                    for _ in range(args.rounds):
                        proc.stdin.write(json.dumps(ps) + "\n")
                        proc.stdin.flush()
                        (n1, s1), (n2, s2) = json.loads(proc.stdout.readline())
                        best_plain, best_lookup = max(best_plain, n1 / s1), max(best_lookup, n2 / s2)
                    peer[name] = (best_plain, best_lookup)
            proc.stdin.close()
            proc.wait(timeout=60)

    print("\n| prompt set | streams | off tok/s | on tok/s | on / off | decode tok/s off -> on (after the first "
          "token) | decode on / off | predicted (cost curve, decode) | acceptance | by position | mean accepted length |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (name, streams), r in results.items():
        pred = "-" if streams != 1 else f"{r['predicted']:.2f}x"
        print(f"| {name} | {streams} | {r['off']:.1f} | {r['on']:.1f} | **{r['ratio']:.2f}x** | "
              f"{r['off_decode']:.1f} -> {r['on_decode']:.1f} | **{r['decode_ratio']:.2f}x** | {pred} | "
              f"{100 * r['acceptance']:.0f}% | {r['per_pos']} | {r['mean_len']:.2f} |")
    if peer:
        print("\n| prompt set (1 stream) | llama.cpp tok/s | llama.cpp + prompt lookup | its on / off "
              "| lockgate on / llama.cpp + lookup |\n|---|---|---|---|---|")
        for name, (a, b) in peer.items():
            print(f"| {name} | {a:.1f} | {b:.1f} | {b / a:.2f}x | {results[(name, 1)]['on'] / b:.2f}x |")
    for what, key in (("output tok/s", "ratio"), ("decode tok/s", "decode_ratio")):
        g, c = results[("grounded", 1)][key], results[("chat", 1)][key]
        print(f"targets ({what}): grounded 1 stream >= 1.3x: {g:.2f}x ({'met' if g >= 1.3 else 'SHORT'}); "
              f"chat 1 stream >= 0.95x: {c:.2f}x ({'met' if c >= 0.95 else 'SHORT'})")


if __name__ == "__main__":
    main()
