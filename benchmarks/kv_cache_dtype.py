"""KV cache element type on the native CPU path: float32 against 16-bit K/V, paired in one run.

1. Attention time of a decode step at a long context: `rows` decode rows (1 and 16), each its
   own sequence at position ctx - 1 (2048) on blocks scattered over the pool, over a cache filled
   with random values (pages never written would all read the one zero page), on the embedded
   model (int4, fused `lg_decode`).
   A profiling build of the kernels (-DLG_PROFILE: thread 0's clock per phase) gives the
   attention phase's time; the whole step is timed too.
2. Decode tokens/s at 1 and 16 streams: `LLM.generate`, 64 random prompt tokens and 64 output
   tokens, greedy, EOS ignored, the prefix cache reset before each run; output tokens/s over the
   whole request and the decode rate after the first token.

Each measurement of one type is followed at once by the same measurement of the other, and the
ratio reported is the median over those pairs (the machine's speed drifts over minutes).

    .venv/bin/python benchmarks/kv_cache_dtype.py [--ctx 2048] [--rows 1,16] [--streams 1,16] [--reps 3]
"""
from __future__ import annotations

import argparse
import ctypes
import random
import subprocess
import tempfile
import time
from pathlib import Path
from statistics import median

import numpy as np
import torch

from lockgate import LLM, SamplingParams
from lockgate.engine.native import build

PROMPT_LEN = 64
OUTPUT_LEN = 64


def profile_library(tmp: Path) -> ctypes.CDLL:
    """The kernels built with -DLG_PROFILE (lg_prof: seconds per phase since the last call)."""
    out = tmp / "lockgate_profile.so"
    subprocess.run([build._compiler(), *build.FLAGS, "-DLG_PROFILE", str(build.SOURCE), "-o", str(out), "-lm"],
                   check=True, timeout=300)
    lib = ctypes.CDLL(str(out))
    build._declare(lib)
    lib.lg_prof.argtypes = [ctypes.c_void_p]
    lib.lg_prof.restype = None
    return lib


def read_profile(lib: ctypes.CDLL) -> np.ndarray:
    out = np.zeros(8, dtype=np.float64)
    lib.lg_prof(out.ctypes.data)
    return out


def attention_step(llm: LLM, lib: ctypes.CDLL, rows: int, ctx: int, steps: int) -> tuple[float, float]:
    """(attention ms, whole step ms) per decode step of `rows` sequences at context `ctx`."""
    runner = llm.engine.core.runner
    dec = runner.native
    dec.lib = lib
    bs = runner.block_size
    nb = -(-ctx // bs)
    rng = np.random.default_rng(rows)
    ids = rng.integers(100, runner.vocab_size, rows)
    pos = np.full(rows, ctx - 1, dtype=np.int64)
    # Every row its own blocks, scattered over the pool as a serving engine's become.
    tables = rng.permutation(rows * nb).astype(np.int64).reshape(rows, nb)
    slots = tables[np.arange(rows), (ctx - 1) // bs] * bs + (ctx - 1) % bs
    dec(ids, pos, slots, tables, pos + 1)  # warm-up
    read_profile(lib)
    t = time.perf_counter()
    for _ in range(steps):
        dec(ids, pos, slots, tables, pos + 1)
    wall = (time.perf_counter() - t) / steps
    return read_profile(lib)[7] / steps * 1e3, wall * 1e3


def decode_run(llm: LLM, streams: int, seed: int) -> tuple[float, float]:
    """(output tokens/s over the whole run, decode tokens/s after the first tokens)."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(100, 49000) for _ in range(PROMPT_LEN)] for _ in range(streams)]
    params = SamplingParams(temperature=0.0, max_tokens=OUTPUT_LEN, ignore_eos=True)
    llm.engine.core.kv.reset_prefix_cache()
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    dt = time.perf_counter() - t
    times = [o.engine_times[0] for o in outs]
    span = max(x.last_token for x in times) - min(x.first_token for x in times)
    return streams * OUTPUT_LEN / dt, streams * (OUTPUT_LEN - 1) / span


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ctx", type=int, default=2048)
    ap.add_argument("--rows", default="1,16")
    ap.add_argument("--streams", default="1,16")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--steps", type=int, default=5, help="decode steps per attention measurement")
    ap.add_argument("--types", default="float32,float16", help="the first is the baseline")
    args = ap.parse_args()
    rows_list = [int(r) for r in args.rows.split(",") if r]
    streams_list = [int(s) for s in args.streams.split(",") if s]
    types = args.types.split(",")
    blocks = max(rows_list + [1]) * -(-args.ctx // 16) + 1
    llms = {kv: LLM(quantization="int4", kv_cache_dtype=kv, num_kv_blocks=blocks) for kv in types}
    for kv, llm in llms.items():
        runner = llm.engine.core.runner
        assert runner.native is not None, f"{kv}: the step left the fused path"
        for kc, vc in runner.kv_caches:
            kc.copy_(torch.empty(kc.shape).uniform_(-2, 2))
            vc.copy_(torch.empty(vc.shape).uniform_(-2, 2))
        print(f"{kv}: {runner.num_blocks} blocks, {runner.kv_dtype}, "
              f"{sum(t.nbytes for p in runner.kv_caches for t in p) / 2**30:.2f} GiB; torch threads "
              f"{torch.get_num_threads()}; native {'AVX2' if build.load().lg_has_avx2() else 'portable'}")
    with tempfile.TemporaryDirectory() as tmp:
        lib = profile_library(Path(tmp))
        for rows in rows_list:
            res: dict[str, list[tuple[float, float]]] = {kv: [] for kv in types}
            for _ in range(args.reps):
                for kv in types:
                    res[kv].append(attention_step(llms[kv], lib, rows, args.ctx, args.steps))
            base = res[types[0]]
            for kv in types:
                att = [a for a, _ in res[kv]]
                step = [s for _, s in res[kv]]
                ratio = median(b[0] / a for a, b in zip(att, base))
                print(f"attention, {rows} rows at ctx {args.ctx}, {kv}: {min(att):.2f} ms "
                      f"(step {min(step):.2f} ms); {types[0]}/{kv} paired median {ratio:.2f}x")
        for llm in llms.values():
            llm.engine.core.runner.native.lib = build.load()
    for streams in streams_list:
        for llm in llms.values():
            llm.generate([[1000, 2000]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
        res2: dict[str, list[tuple[float, float]]] = {kv: [] for kv in types}
        for rep in range(args.reps):
            for kv in types:
                res2[kv].append(decode_run(llms[kv], streams, seed=rep))
        base2 = res2[types[0]]
        for kv in types:
            out = [o for o, _ in res2[kv]]
            dec = [d for _, d in res2[kv]]
            ratio = median(a[0] / b[0] for a, b in zip(res2[kv], base2))
            print(f"{streams} streams, {kv}: {max(out):.1f} tok/s (decode after the first token "
                  f"{max(dec):.1f}); {kv}/{types[0]} paired median {ratio:.2f}x")


if __name__ == "__main__":
    main()
