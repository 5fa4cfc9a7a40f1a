"""Threads that fit: two engine processes sharing the cores against one engine using them all.

The default model in its default precision (the stored Q4_1 blocks: int4, the fused native
path), greedy, EOS ignored. Engines:

- `one`: 1 engine process with the default thread rule (every usable core);
- `two`: 2 engine processes at once with the default rule for two engines (the usable cores
  divided between them: what `lockgate serve --replicas 2` gives each), both started together;
- with `--oversubscribed`, also 2 processes that each take every core (the old default,
  threads fighting for the cores): `two-full-spin` with libgomp's default spinning wait (the
  old engine), `two-full-passive` with the engine's passive wait (engine/threads.py).

Each engine decodes N streams (N prompts of 64 random tokens, 64 tokens each, over and over)
for a fixed window; its throughput is its output tokens over the window; an arrangement's
aggregate is the sum over its processes. The arrangements run in turn, `--reps` times, each
`two` run right after a `one` run (pairs: the machine's speed drifts), and the ratio
two/one is the median over pairs (target: at least 0.8).

    .venv/bin/python benchmarks/cpu_threads.py [--streams 1,16] [--seconds 10] [--reps 3] [--oversubscribed]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from statistics import median

PROMPT_LEN = 64
OUTPUT_LEN = 64


def worker(args: argparse.Namespace) -> None:
    """One engine process: load, warm up, then one timed window per "go" line on stdin."""
    if args.omp == "spin":  # libgomp's own default: torch loads before LLM could set the wait policy
        for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
            os.environ.pop(k, None)
        import torch  # noqa: F401
    from lockgate import LLM, SamplingParams

    llm = LLM(num_threads=args.threads, enable_prefix_caching=False)
    runner = llm.engine.core.runner
    rng = random.Random(args.seed)
    vocab = min(llm.tokenizer.vocab_size, runner.vocab_size)
    prompts = [[rng.randrange(100, vocab - 100) for _ in range(PROMPT_LEN)] for _ in range(args.streams)]
    params = SamplingParams(temperature=0.0, max_tokens=OUTPUT_LEN, ignore_eos=True)
    llm.generate([p[:8] for p in prompts], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    print(json.dumps({"ready": True, "threads": runner.threads, "quantization": runner.quantization,
                      "path": runner.path, "kernels": runner.kernels}), flush=True)
    for line in sys.stdin:
        if line.strip() != "go":
            break
        tokens, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < args.seconds:
            outs = llm.generate(prompts, params)
            tokens += sum(len(o.outputs[0].token_ids) for o in outs)
        print(json.dumps({"tokens": tokens, "seconds": time.perf_counter() - t0}), flush=True)


class Group:
    """Engine processes that run their windows at the same time."""

    def __init__(self, name: str, count: int, threads: int | None, streams: int, seconds: float, omp: str) -> None:
        self.name = name
        cmd = [sys.executable, __file__, "--worker", "--streams", str(streams), "--seconds", str(seconds),
               "--omp", omp]
        if threads is not None:
            cmd += ["--threads", str(threads)]
        env = {**os.environ, "LOCKGATE_LOG_LEVEL": "WARNING"}
        self.procs = [subprocess.Popen(cmd + ["--seed", str(i)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       text=True, env=env) for i in range(count)]
        self.info = [json.loads(p.stdout.readline()) for p in self.procs]  # type: ignore[union-attr]

    def run(self) -> float:
        """One window in every process at once: the aggregate output tokens/s."""
        for p in self.procs:
            p.stdin.write("go\n")  # type: ignore[union-attr]
            p.stdin.flush()  # type: ignore[union-attr]
        results = [json.loads(p.stdout.readline()) for p in self.procs]  # type: ignore[union-attr]
        return sum(r["tokens"] / r["seconds"] for r in results)

    def close(self) -> None:
        for p in self.procs:
            p.stdin.close()  # type: ignore[union-attr]
            p.wait(timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", default="1,16")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--oversubscribed", action="store_true")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--omp", default="passive", choices=("passive", "spin"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.streams = int(args.streams)
        worker(args)
        return

    from lockgate.engine.threads import cgroup_cpu_limit, threads_per_engine, usable_cores

    cores = usable_cores()
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"{cpu}; {os.cpu_count()} CPUs, {cores} usable (affinity {len(os.sched_getaffinity(0))}, "
          f"cgroup quota {cgroup_cpu_limit()}); {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| streams per engine | arrangement | threads each | aggregate tok/s (median) | runs | two / one (pairs) |")
    print("|---|---|---|---|---|---|")
    for n in [int(s) for s in args.streams.split(",")]:
        groups = [Group("one", 1, None, n, args.seconds, "passive"),
                  Group("two", 2, None if cores < 2 else threads_per_engine(2, cores), n, args.seconds, "passive")]
        if args.oversubscribed:
            groups.append(Group("two-full-spin", 2, cores, n, args.seconds, "spin"))
            groups.append(Group("two-full-passive", 2, cores, n, args.seconds, "passive"))
        info = groups[0].info[0]
        print(f"<!-- {n} streams: {info['quantization']}, {info['path']}, kernels {info['kernels']} -->")
        runs: dict[str, list[float]] = {g.name: [] for g in groups}
        for _ in range(args.reps):
            for g in groups:
                runs[g.name].append(g.run())
        pairs = [b / a for a, b in zip(runs["one"], runs["two"])]
        for g in groups:
            threads = "/".join(str(i["threads"]) for i in g.info)
            ratio = (f"**{median(pairs):.2f}x** ({', '.join(f'{p:.2f}' for p in pairs)})" if g.name == "two"
                     else f"{median(b / a for a, b in zip(runs['one'], runs[g.name])):.2f}x" if g.name != "one"
                     else "1.00x")
            print(f"| {n} | {g.name} ({len(g.procs)} process{'es' if len(g.procs) > 1 else ''}) | {threads} | "
                  f"{median(runs[g.name]):.1f} | {', '.join(f'{r:.1f}' for r in runs[g.name])} | {ratio} |",
                  flush=True)
        for g in groups:
            g.close()


if __name__ == "__main__":
    main()
