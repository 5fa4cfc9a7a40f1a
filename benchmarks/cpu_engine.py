"""lockgate vs llama.cpp vs Hugging Face transformers on the default model, CPU, one run.

Same prompts for every engine (64 random prompt tokens, 64 output tokens, greedy,
EOS ignored). Output tokens/s counts the whole request (prefill included); at 1 stream
the decode rate after the first token is printed too, for lockgate and llama.cpp. For:

- llama.cpp (llama-cpp-python, on the same GGUF file as stored: Q4_1 weights) at 1 stream,
  one llama.cpp run just before each lockgate run, so each pair sees the same machine (its
  speed drifts by tens of percent over minutes); the ratio reported is the median over
  pairs. Its prompt cache is cleared before each run, as lockgate's is (llama-cpp-python
  otherwise reuses the KV of a repeated prompt);
- lockgate at 1/16/64 streams in each precision: `default` (what `LLM()` and `lockgate serve`
  run with no options: the GGUF as stored, its Q4_1 blocks on the native kernels), `float` (the
  dequantized GGUF, `quantization="none"`), `int8`, `int4`; a precision may name its kernels
  (`int4:torch`) or activation codes (`int4+int16`). The start-up line of each (precision, path,
  kernels and the instruction set they were built for, dtypes, threads) is printed with it;
- transformers `generate` (float32, the same dequantized weights) at 16 and 64 streams,
  paired the same way: one of its runs just before each lockgate run.

With each precision's bounds at 1 stream: the *kernel bound* (tokens/s if a decode
step did nothing but run each weight matrix once with that precision's own kernels)
and the *bandwidth bound* (weight bytes / the machine's measured copy bandwidth).

    .venv/bin/python benchmarks/cpu_engine.py [--streams 1,16,64] [--precisions default,float,int4+int16]

llama-cpp-python is not a dependency: it builds llama.cpp from source (about 15
minutes on 2 cores). Install it in its own venv, found at /tmp/llamacpp-venv or
passed with --llamacpp-python:

    python3 -m venv /tmp/llamacpp-venv && /tmp/llamacpp-venv/bin/pip install llama-cpp-python

(or, with llama.cpp already built as benchmarks/cpu_serving.py says, install the Python package alone,
`CMAKE_ARGS=-DLLAMA_BUILD=OFF /tmp/llamacpp-venv/bin/pip install llama_cpp_python-*.tar.gz`, and run
this with `LLAMA_CPP_LIB_PATH=/tmp/llb/build/bin`).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from statistics import median
from typing import Callable

import torch
import torch.nn.functional as F

from lockgate import LLM, SamplingParams
from lockgate.engine.loader import default_model_path, load_checkpoint
from lockgate.engine.native.build import load as native_lib
from lockgate.engine.native.linear import gemm as native_gemm
from lockgate.engine.quant.linear import KERNEL_DTYPE
from lockgate.engine.quant.quantize import BlockEmbedding, BlockLinear, QuantEmbedding, QuantLinear, weight_bytes

PROMPT_LEN = 64
OUTPUT_LEN = 64
INSTALL_HINT = "python3 -m venv /tmp/llamacpp-venv && /tmp/llamacpp-venv/bin/pip install llama-cpp-python"

# Runs inside llama-cpp-python's interpreter: a warm-up, then one timed greedy decode of the
# prompt (one stream) per line read from stdin, each answered with a JSON line.
LLAMACPP_SCRIPT = r"""
import json, sys, time
from llama_cpp import Llama
path, threads, prompt, out_len = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
llm = Llama(model_path=path, n_ctx=512, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
def timed(prompt, n):
    # llama-cpp-python reuses the KV of the longest prefix shared with its last call: forget it,
    # as lockgate's prefix cache is reset before each run, so both pay the whole prefill.
    llm.reset()
    t, first, got = time.perf_counter(), None, 0
    for _ in llm.generate(prompt, temp=0.0, top_k=1, reset=True):
        got += 1
        if got == 1:
            first = time.perf_counter()
        if got == n:
            end = time.perf_counter()
            return n / (end - t), (n - 1) / (end - first)
timed(prompt[:8], 4)  # warm-up
print("ready", flush=True)
for line in sys.stdin:
    print(json.dumps(timed(prompt, out_len)), flush=True)
"""


class LlamaCpp:
    """llama.cpp in its own interpreter, kept running so its timed runs can alternate with
    lockgate's: each pair of runs sees the same machine (it drifts by tens of percent)."""

    def __init__(self, py: str, prompt: list[int]) -> None:
        cmd = [py, "-c", LLAMACPP_SCRIPT, str(default_model_path()), str(torch.get_num_threads()),
               json.dumps(prompt), str(OUTPUT_LEN)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("llama.cpp did not start")
        self.runs: list[tuple[float, float]] = []

    def run(self) -> tuple[float, float]:
        """One timed run: (output tokens/s, decode tokens/s after the first token)."""
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        r = tuple(json.loads(self.proc.stdout.readline()))
        self.runs.append(r)
        return r

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def make_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    # Distinct random ids (above the special tokens) so the prefix cache cannot help.
    return [[rng.randrange(100, vocab) for _ in range(PROMPT_LEN)] for _ in range(n)]


# A peer engine's timed run at the same load: (output tokens/s, decode tokens/s after the first
# token, or None where not measured).
Peer = Callable[[], tuple[float, float | None]]


def bench_lockgate(llm: LLM, prompts: list[list[int]], reps: int, peer: Peer | None = None
                   ) -> tuple[float, float, list[tuple[float, float | None]]]:
    """(output tokens/s over the whole run, decode tokens/s after the first tokens), each the best
    of `reps` runs (the machine is shared: the best run is the least disturbed), and the ratios
    to `peer`'s run just before each (output, decode), when a peer is given."""
    params = SamplingParams(temperature=0.0, max_tokens=OUTPUT_LEN, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))  # warm-up
    best, best_decode, ratios = 0.0, 0.0, []
    for _ in range(reps):
        theirs = None
        if peer is not None:
            theirs = peer()
            time.sleep(0.2)  # let the peer's threads stop spinning before lockgate's run
        llm.engine.core.kv.reset_prefix_cache()
        t = time.perf_counter()
        outs = llm.generate(prompts, params)
        dt = time.perf_counter() - t
        assert all(len(o.outputs[0].token_ids) == OUTPUT_LEN for o in outs)
        times = [o.engine_times[0] for o in outs]
        span = max(x.last_token for x in times) - min(x.first_token for x in times)
        rate, decode = len(prompts) * OUTPUT_LEN / dt, len(prompts) * (OUTPUT_LEN - 1) / span
        best, best_decode = max(best, rate), max(best_decode, decode)
        if theirs is not None:
            ratios.append((rate / theirs[0], decode / theirs[1] if theirs[1] else None))
    return best, best_decode, ratios


@torch.inference_mode()
def kernel_bound(llm: LLM) -> float:
    """Tokens/s if a batch-1 decode step did nothing but multiply by every weight matrix once,
    each with the kernel this precision runs (the LM head included)."""
    model = llm.engine.core.runner.model
    dtype = llm.engine.core.runner.dtype
    calls = []
    for m in model.modules():
        if isinstance(m, BlockLinear):
            calls.append((lambda x, m=m: native_gemm(x, m.table, m.wtype, m.out_features), torch.randn(1, m.in_features)))
        elif isinstance(m, QuantLinear):
            calls.append((m.qmm, torch.randn(1, m.in_features, dtype=KERNEL_DTYPE)))
        elif isinstance(m, torch.nn.Linear):
            calls.append((lambda x, w=m.weight: F.linear(x, w), torch.randn(1, m.in_features, dtype=dtype)))
    head = model.head_q if model.head_q is not None else None
    if isinstance(head, BlockEmbedding):
        rank, wtype = head.ranking()
        calls.append((lambda x: native_gemm(x, rank, wtype, head.vocab), torch.randn(1, head.hidden)))
    elif isinstance(head, QuantEmbedding):
        calls.append((lambda x, h=head: torch.ops.aten._weight_int8pack_mm(x, h.qweight, h.scales),
                      torch.randn(1, head.qweight.shape[1], dtype=KERNEL_DTYPE)))
    elif model.lm_head is None:
        w = model.embed_tokens.weight
        calls.append((lambda x, w=w: F.linear(x, w), torch.randn(1, w.shape[1], dtype=dtype)))

    def step() -> None:
        for f, x in calls:
            f(x)

    for _ in range(3):
        step()
    best = float("inf")
    for _ in range(20):
        t = time.perf_counter()
        step()
        best = min(best, time.perf_counter() - t)
    return 1 / best


def matrix_bytes(llm: LLM) -> int:
    """Bytes a batch-1 decode step reads: every weight but the embedding rows it does not look up."""
    model = llm.engine.core.runner.model
    total = weight_bytes(model)
    if model.lm_head is not None:  # untied: the embedding table is only looked up, one row
        total -= weight_bytes(model.embed_tokens)
    head = model.head_q
    if isinstance(head, BlockEmbedding) and head.rank_table is not None:
        total -= head.table.numel()  # logits are ranked on the 4-bit copy; 64 Q8_0 rows are read
    return total


def copy_bandwidth() -> float:
    """Bytes/s of a large tensor copy (read + write) on all threads: the memory roofline."""
    src = torch.empty(64 * 2**20, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(8):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.numel() * 4 / best


def load_hf():
    """transformers' LlamaForCausalLM (float32) with the same dequantized GGUF weights (HF names)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    ckpt = load_checkpoint(None)
    c = ckpt.config
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                      num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
                      max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
                      rope_theta=c.rope_theta, tie_word_embeddings=c.tie_word_embeddings)
    model = LlamaForCausalLM(cfg).eval()
    missing, unexpected = model.load_state_dict(dict(ckpt.weights()), strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    if c.tie_word_embeddings:
        model.tie_weights()
    return model


@torch.inference_mode()
def bench_hf_generate(model, prompts: list[list[int]]) -> float:
    ids = torch.tensor(prompts)
    kw = dict(max_new_tokens=OUTPUT_LEN, min_new_tokens=OUTPUT_LEN, do_sample=False,
              attention_mask=torch.ones_like(ids), pad_token_id=0)
    model.generate(ids[:, :8], **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
    t = time.perf_counter()
    out = model.generate(ids, **kw)
    dt = time.perf_counter() - t
    assert out.shape[1] - ids.shape[1] == OUTPUT_LEN
    return len(prompts) * OUTPUT_LEN / dt


def find_llamacpp_python(explicit: str | None) -> str | None:
    candidates = [explicit] if explicit else [sys.executable, "/tmp/llamacpp-venv/bin/python"]
    for py in candidates:
        if py and Path(py).exists() and subprocess.run([py, "-c", "import llama_cpp"],
                                                       capture_output=True).returncode == 0:
            return py
    return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", default="1,16,64")
    ap.add_argument("--precisions", default="default,float",
                    help="comma-separated: default (the stored precision), float, int8, int4; a precision may "
                         "name its kernels (int8:native, int4:torch) and activation codes (int4+int16)")
    ap.add_argument("--dtype", default="auto", help="lockgate's float dtype (auto: bf16 with AMX/AVX512-BF16)")
    ap.add_argument("--reps", type=int, default=2, help="runs per measurement; the best is reported")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--llamacpp-python", help="a Python with llama-cpp-python installed")
    args = ap.parse_args()
    streams = [int(b) for b in args.streams.split(",")]
    precisions = args.precisions.split(",")

    bw = copy_bandwidth()
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, copy bandwidth {bw / 1e9:.1f} GB/s")
    ckpt = load_checkpoint(None)
    vocab, stored = ckpt.config.vocab_size, ckpt.stored_precision
    prompts = {b: make_prompts(b, vocab, seed=b) for b in streams}

    llama: LlamaCpp | None = None
    if not args.skip_llamacpp:
        py = find_llamacpp_python(args.llamacpp_python)
        if py is None:
            print(f"llama-cpp-python is not installed; skipping llama.cpp. To compare, run:\n    {INSTALL_HINT}")
        elif 1 in streams:
            llama = LlamaCpp(py, prompts[1][0])

    hf = None if args.skip_hf else load_hf()
    hf_runs: dict[int, list[float]] = {b: [] for b in streams if b > 1 and hf is not None}

    def peer_for(b: int) -> Peer | None:
        """llama.cpp at 1 stream, transformers generate at more."""
        if b == 1:
            return llama.run if llama is not None else None
        if hf is None:
            return None

        def run_hf() -> tuple[float, None]:
            hf_runs[b].append(bench_hf_generate(hf, prompts[b]))
            return hf_runs[b][-1], None
        return run_hf

    rows = []
    decodes: dict[str, float | None] = {}
    paired: dict[str, dict[int, list[tuple[float, float | None]]]] = {}
    for spec in precisions:
        prec, _, kernels = spec.partition(":")  # e.g. int8:native
        prec, _, acts = prec.partition("+")  # e.g. int4+int16
        opts = {"quantization_kernels": kernels or "auto", "quantization_activations": acts or "int8"}
        if prec != "default":
            opts["quantization"] = "none" if prec == "float" else prec
        llm = LLM(None, dtype=args.dtype, **opts)
        runner = llm.engine.core.runner
        print(f"lockgate {spec}: {runner.describe(stored)}", flush=True)
        q = runner.quantization or "float"
        name = (f"{spec} ({runner.dtype})".replace("torch.", "") if q == "float"
                else f"{spec} ({q}, {runner.kernels}{', ' + acts + ' activations' if acts else ''})")
        mb = weight_bytes(runner.model) / 2**20
        kb = kernel_bound(llm)
        bb = bw / matrix_bytes(llm)
        lib = native_lib()
        tiles = lib.lg_amx_calls() if lib is not None and lib.lg_amx() else None
        runs = {b: bench_lockgate(llm, prompts[b], args.reps, peer_for(b)) for b in streams}
        if tiles is not None:  # a build with AMX: say whether the tiles ran (a silent fallback shows as 0)
            print(f"lockgate {spec}: {lib.lg_amx_calls() - tiles} matmuls ran on the AMX-INT8 tiles", flush=True)
        rates = {b: r[0] for b, r in runs.items()}
        decodes[name] = runs[1][1] if 1 in runs else None
        paired[name] = {b: r[2] for b, r in runs.items()}
        rows.append((name, mb, kb, bb, rates))
        print(f"lockgate {name}: weights {mb:.0f} MiB, bounds {kb:.0f} (kernels) / {bb:.0f} (bandwidth) tok/s, "
              + ", ".join(f"{b} streams {r:.1f} tok/s" for b, r in rates.items())
              + (f", 1-stream decode after the first token {decodes[name]:.1f} tok/s" if decodes[name] else ""),
              flush=True)
        del llm
    if llama is not None:
        llama.close()
    best_llama = max(llama.runs) if llama is not None and llama.runs else None
    if best_llama:
        print(f"llama.cpp (llama-cpp-python, {default_model_path().name}) 1 stream: {len(llama.runs)} runs, "
              f"{min(r[0] for r in llama.runs):.1f}-{best_llama[0]:.1f} tok/s")
    for b, runs_b in hf_runs.items():
        print(f"transformers generate (float32) {b} streams: {len(runs_b)} runs, "
              f"{min(runs_b):.1f}-{max(runs_b):.1f} tok/s")

    def ratio(name: str, b: int) -> str:
        pairs = paired[name].get(b, [])
        return f"{median(r for r, _ in pairs):.2f}x" if pairs else "-"

    hf_cols = [b for b in streams if b in hf_runs]
    print("\n| precision | weights MiB | 1-stream kernel bound | bandwidth bound | "
          + " | ".join(f"{b} streams tok/s" for b in streams)
          + (" | 1 stream / llama.cpp" if best_llama else "") + " | 1 stream / kernel bound"
          + "".join(f" | {b} streams / HF generate" for b in hf_cols) + " |")
    print("|" + "---|" * (4 + len(streams) + bool(best_llama) + 1 + len(hf_cols)))
    for name, mb, kb, bb, rates in rows:
        line = f"| lockgate {name} | {mb:.0f} | {kb:.0f} | {bb:.0f} | " + " | ".join(f"{rates[b]:.1f}" for b in streams)
        if best_llama:
            line += f" | {ratio(name, 1)}"
        line += f" | {rates[1] / kb:.0%}" if 1 in rates else " | -"
        line += "".join(f" | {ratio(name, b)}" for b in hf_cols)
        print(line + " |")
    if best_llama:
        print(f"| llama.cpp Q4_1 (best run) | - | - | - | {best_llama[0]:.1f}" + " | -" * (len(streams) - 1)
              + " | 1.00x | - |" + " - |" * len(hf_cols))
    for b in hf_cols:
        print(f"transformers generate float32 (best run), {b} streams: {max(hf_runs[b]):.1f} tok/s")
    print("\nRatios are medians over pairs: each lockgate run over the peer's run just before it.")
    for name in paired:
        for b, pairs in paired[name].items():
            if pairs:
                shown = ", ".join(f"{r:.2f}x" + (f"/{d:.2f}x" if d else "") for r, d in pairs)
                print(f"  lockgate {name}, {b} stream{'s' * (b > 1)} over "
                      f"{'llama.cpp (output/decode after the first token)' if b == 1 else 'transformers'}: {shown}")
    if best_llama:
        print("best runs, 1-stream decode after the first token: "
              + ", ".join(f"lockgate {n} {d:.1f}" for n, d in decodes.items() if d)
              + f", llama.cpp {max(r[1] for r in llama.runs):.1f} tok/s")

if __name__ == "__main__":
    main()
