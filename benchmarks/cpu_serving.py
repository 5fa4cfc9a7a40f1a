"""CPU serving benchmark: lockgate's OpenAI server vs llama-cpp-python's, same GGUF, same machine.

    python benchmarks/cpu_serving.py [--concurrency 32] [--num-requests 64]
                                     [--input-len 128] [--output-len 128]

Each server runs alone (never both at once), is warmed up with one request,
then serves `--num-requests` streaming completions from `--concurrency`
concurrent clients: distinct prompts of exactly `--input-len` tokens (so no
prefix-cache hits), exactly `--output-len` output tokens (EOS suppressed). It
prints aggregate output tokens/s, TTFT p50/p95 and TPOT p50 for each, and the
ratios lockgate / llama-cpp-python.

llama-cpp-python is not a dependency: install it yourself (it builds llama.cpp
from source, about 10 minutes on 2 cores), in this venv or another one whose
Python you pass with --llamacpp-python:

    pip install 'llama-cpp-python[server]'
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from lockgate.bench.procs import ServerProcess, free_port
from lockgate.stats import percentile

INSTALL_HINT = "pip install 'llama-cpp-python[server]'   # builds llama.cpp from source, ~10 min"


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    tokens: int = 0
    error: str = ""


@dataclass
class RunResult:
    name: str
    wall_s: float
    results: list[RequestResult] = field(default_factory=list)

    @property
    def ok(self) -> list[RequestResult]:
        return [r for r in self.results if r.ok]

    @property
    def output_tokens(self) -> int:
        return sum(r.tokens for r in self.ok)

    @property
    def throughput(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s else 0.0

    def ttft(self, q: float) -> float:
        """The q-quantile (q in [0, 1]) of TTFT; NaN with no successes."""
        return percentile([r.ttft for r in self.ok], q * 100, empty=math.nan)

    def tpot(self, q: float) -> float:
        return percentile([(r.latency - r.ttft) / (r.tokens - 1) for r in self.ok if r.tokens > 1], q * 100,
                          empty=math.nan)


def make_prompts(n: int, input_len: int, seed: int = 0) -> list[str]:
    """n distinct prompts of exactly `input_len` tokens (as the GGUF's tokenizer counts them)."""
    from lockgate.engine.loader import load_checkpoint

    tok = load_checkpoint(None).tokenizer
    rng = random.Random(seed)
    words = ("river", "mountain", "engine", "garden", "silver", "window", "planet", "music", "forest",
             "harbor", "candle", "market", "winter", "signal", "paper", "orange", "bridge", "cloud")
    prompts = []
    for i in range(n):
        text = f"Request {i}. " + " ".join(rng.choice(words) for _ in range(input_len * 2))
        ids = tok.encode(text, add_special_tokens=False)[: input_len]
        prompts.append(tok.decode(ids))
    return prompts


async def one_request(client: httpx.AsyncClient, body: dict) -> RequestResult:
    t0 = time.perf_counter()
    ttft = 0.0
    tokens = 0
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return RequestResult(False, error=f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return RequestResult(False, error=str(chunk["error"]))
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]  # exact count where reported
                    continue
                for c in chunk.get("choices", []):
                    if c.get("text"):
                        if not ttft:
                            ttft = time.perf_counter() - t0
                        if "usage" not in chunk:  # no usage reporting: one chunk per token
                            tokens += 1
    except httpx.HTTPError as exc:
        return RequestResult(False, error=repr(exc))
    return RequestResult(True, ttft, time.perf_counter() - t0, tokens)


async def run_load(name: str, base_url: str, prompts: list[str], concurrency: int, output_len: int,
                   extra: dict) -> RunResult:
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=3600, limits=limits) as client:
        warm = {"prompt": "Hello", "max_tokens": 4, "stream": True, **extra}
        await one_request(client, warm)
        queue: asyncio.Queue[str] = asyncio.Queue()
        for p in prompts:
            queue.put_nowait(p)
        results: list[RequestResult] = []

        async def worker() -> None:
            while not queue.empty():
                prompt = queue.get_nowait()
                body = {"prompt": prompt, "max_tokens": output_len, "temperature": 0.0, "stream": True, **extra}
                results.append(await one_request(client, body))

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return RunResult(name, time.perf_counter() - t0, results)


def bench_server(name: str, cmd: list[str], port: int, prompts: list[str], args: argparse.Namespace,
                 extra: dict, logdir: Path) -> RunResult:
    srv = ServerProcess([], logdir / f"{name}.log", command=cmd, port=port, wait=False)
    try:
        srv.wait_healthy(600, path="/v1/models")  # llama-cpp-python's server has no /health
        return asyncio.run(run_load(name, srv.base_url, prompts, args.concurrency, args.output_len, extra))
    finally:
        srv.stop()


def find_llamacpp_python(explicit: str | None) -> str | None:
    candidates = [explicit] if explicit else [sys.executable, "/tmp/llamacpp-venv/bin/python"]
    for py in candidates:
        if py and Path(py).exists() and subprocess.run(
                [py, "-c", "import llama_cpp.server"], capture_output=True).returncode == 0:
            return py
    return None


def report(runs: list[RunResult], args: argparse.Namespace) -> None:
    print(f"\n{args.num_requests} requests, {args.concurrency} concurrent streaming clients, "
          f"{args.input_len} prompt / {args.output_len} output tokens, {os.cpu_count()} CPUs")
    print(f"{'server':<18}{'ok':>6}{'out tok/s':>12}{'TTFT p50':>11}{'TTFT p95':>11}{'TPOT p50':>11}{'wall s':>9}")
    for r in runs:
        print(f"{r.name:<18}{len(r.ok):>6}{r.throughput:>12.1f}{r.ttft(0.5):>10.2f}s{r.ttft(0.95):>10.2f}s"
              f"{r.tpot(0.5) * 1000:>9.1f}ms{r.wall_s:>9.1f}")
        errors = [x.error for x in r.results if not x.ok]
        if errors:
            print(f"  {len(errors)} failed, e.g. {errors[0]}")
    if len(runs) == 2:
        a, b = runs
        print(f"\nratios {a.name} / {b.name}: throughput {a.throughput / b.throughput:.2f}x, "
              f"TTFT p50 {a.ttft(0.5) / b.ttft(0.5):.2f}x, TTFT p95 {a.ttft(0.95) / b.ttft(0.95):.2f}x, "
              f"TPOT p50 {a.tpot(0.5) / b.tpot(0.5):.2f}x  (throughput: higher is better; latencies: lower)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="CPU threads for each server")
    ap.add_argument("--llamacpp-python", help="Python with llama-cpp-python[server] installed")
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--lockgate-args", default="", help="extra `lockgate serve` options, space separated")
    args = ap.parse_args()

    from lockgate.engine.loader.default_model import default_model_path

    gguf = str(default_model_path())
    prompts = make_prompts(args.num_requests, args.input_len)
    logdir = Path(tempfile.mkdtemp(prefix="lockgate-bench-"))
    runs: list[RunResult] = []

    port = free_port()
    cmd = [sys.executable, "-m", "lockgate.server", "--port", str(port), "--no-access-log",
           "--num-threads", str(args.threads), *args.lockgate_args.split()]
    print(f"lockgate: {' '.join(cmd)}", flush=True)
    runs.append(bench_server("lockgate", cmd, port, prompts, args,
                             {"ignore_eos": True, "stream_options": {"include_usage": True}}, logdir))

    py = None if args.skip_llamacpp else find_llamacpp_python(args.llamacpp_python)
    if py is None:
        if not args.skip_llamacpp:
            print(f"\nllama-cpp-python is not installed; measuring lockgate alone. To compare, run:\n"
                  f"    {INSTALL_HINT}\n(or pass --llamacpp-python /path/to/venv/bin/python)")
    else:
        port = free_port()
        # One request at a time, as its server does; no interruption of a running request by a new one.
        cmd = [py, "-m", "llama_cpp.server", "--model", gguf, "--host", "127.0.0.1", "--port", str(port),
               "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads),
               "--n_ctx", str(max(2048, 2 * (args.input_len + args.output_len))),
               "--interrupt_requests", "False", "--verbose", "False"]
        print(f"llama-cpp-python: {' '.join(cmd)}", flush=True)
        # EOS suppressed through logit_bias (its API has no ignore_eos): 0 <|endoftext|>, 2 <|im_end|>.
        runs.append(bench_server("llama-cpp-python", cmd, port, prompts, args,
                                 {"logit_bias": {"0": -100, "2": -100}}, logdir))
    report(runs, args)
    shutil.rmtree(logdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
