"""CPU serving benchmark: lockgate's OpenAI server vs llama.cpp's own `llama-server`, same GGUF, same machine.

    python benchmarks/cpu_serving.py [--streams 1,8,32] [--requests-per-stream 2]
                                     [--input-len 128] [--output-len 128] [--llama-server PATH]

For each number of concurrent streaming clients N (`--streams`), both servers serve
`N * --requests-per-stream` streaming completions from N clients: distinct prompts of exactly
`--input-len` tokens (no prefix-cache hits), exactly `--output-len` output tokens (EOS
suppressed). lockgate runs with its defaults but `--no-slo-admission` (it would refuse what cannot
start within the class's 2 s TTFT target; llama-server queues everything, so both queue here) (the GGUF as stored: its int4 blocks on the native
kernels; threads from the cores it may use); `llama-server` runs with N parallel slots (`-np N`,
continuous batching, a context of N x (input + output) tokens, `-t` = the cores). Only one
server runs at a time; lockgate's one server is reused across N, llama-server is started per N
(its slot count is fixed at start). The order of the two alternates per N (a drift of the machine
lands on both). Printed per N: aggregate output tokens/s, TTFT p50/p99, TPOT p50, and the ratios
lockgate / llama-server, with the instruction set and kernels lockgate reported.

llama-server is not a dependency. It is built from the llama.cpp source that llama-cpp-python's
source package vendors (about 10 minutes on 2 cores); when it is not found (`--llama-server`,
$LLAMA_SERVER, /tmp/llb/build/bin/llama-server) the script prints these commands and measures
lockgate alone:

    mkdir -p /tmp/llb && cd /tmp/llb
    pip download --no-binary :all: --no-deps llama-cpp-python -d .
    tar xzf llama_cpp_python-*.tar.gz
    cmake -S llama_cpp_python-*/vendor/llama.cpp -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \\
          -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \\
          -DLLAMA_BUILD_TOOLS=ON -DLLAMA_OPENSSL=OFF
    cmake --build build -j 2 --target llama-server llama-bench llama
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from lockgate.bench.procs import ServerProcess, free_port
from lockgate.stats import percentile

LLAMA_SERVER_CANDIDATES = ("/tmp/llb/build/bin/llama-server",)


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


def start(name: str, cmd: list[str], port: int, logdir: Path, health: str) -> ServerProcess:
    srv = ServerProcess([], logdir / f"{name}.log", command=cmd, port=port, wait=False)
    try:
        srv.wait_healthy(600, path=health)
    except BaseException:
        srv.stop()
        raise
    return srv


def find_llama_server(explicit: str | None) -> str | None:
    for path in (explicit, os.environ.get("LLAMA_SERVER"), *LLAMA_SERVER_CANDIDATES):
        if path and Path(path).is_file() and os.access(path, os.X_OK):
            return path
    return None


def lockgate_kernels(log_text: str) -> str:
    """What lockgate's start-up log says ran: the precision/kernels line(s)."""
    keep = [ln.split("] ", 1)[-1].strip() for ln in log_text.splitlines()
            if any(k in ln for k in ("native CPU kernels", "precision", "kernels:", "quantization"))]
    return "; ".join(dict.fromkeys(keep))[:600] or "(not reported)"


def report(rows: list[tuple[int, RunResult, RunResult | None]], args: argparse.Namespace, kernels: str) -> None:
    print(f"\n{args.input_len} prompt / {args.output_len} output tokens per request, "
          f"{args.requests_per_stream} requests per stream, {os.cpu_count()} CPUs")
    print(f"lockgate kernels: {kernels}")
    print("| streams | server | ok | out tok/s | TTFT p50 | TTFT p99 | TPOT p50 | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for n, a, b in rows:
        for r in (a, b):
            if r is None:
                continue
            print(f"| {n} | {r.name} | {len(r.ok)} | {r.throughput:.1f} | {r.ttft(0.5):.2f} s | {r.ttft(0.99):.2f} s | "
                  f"{r.tpot(0.5) * 1000:.1f} ms | {r.wall_s:.1f} |")
            errors = [x.error for x in r.results if not x.ok]
            if errors:
                print(f"|   | {len(errors)} failed, e.g. {errors[0][:100]} | | | | | | |")
    for n, a, b in rows:
        if b is not None and b.throughput and a.throughput:
            print(f"{n} streams: lockgate / llama-server throughput {a.throughput / b.throughput:.2f}x, "
                  f"TTFT p99 {a.ttft(0.99) / b.ttft(0.99):.2f}x (lower is better)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", default="1,8,32", help="concurrent streaming clients, comma separated")
    ap.add_argument("--requests-per-stream", type=int, default=2)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="llama-server's threads")
    ap.add_argument("--llama-server", help="path to llama.cpp's llama-server binary")
    ap.add_argument("--skip-peer", action="store_true")
    ap.add_argument("--lockgate-args", default="", help="extra `lockgate serve` options, space separated")
    args = ap.parse_args()
    streams = [int(x) for x in args.streams.split(",") if x.strip()]

    from lockgate.engine.loader.default_model import default_model_path

    gguf = str(default_model_path())
    logdir = Path(tempfile.mkdtemp(prefix="lockgate-bench-"))
    peer = None if args.skip_peer else find_llama_server(args.llama_server)
    if peer is None and not args.skip_peer:
        print("llama-server not found; measuring lockgate alone. To compare, build it:\n"
              + __doc__.split("lockgate alone:\n", 1)[1].rstrip().rstrip('"'))
    port = free_port()
    cmd = [sys.executable, "-m", "lockgate.server", "--port", str(port), "--no-access-log",
           "--max-num-seqs", str(max(streams)), "--no-slo-admission", *args.lockgate_args.split()]
    print(f"lockgate: {' '.join(cmd)}", flush=True)
    lockgate = start("lockgate", cmd, port, logdir, "/health")
    kernels = lockgate_kernels(lockgate.log_text())
    ours = {"ignore_eos": True, "stream_options": {"include_usage": True}}
    theirs = {"ignore_eos": True, "n_predict": args.output_len, "logit_bias": [[0, False], [2, False]]}
    rows: list[tuple[int, RunResult, RunResult | None]] = []
    try:
        for k, n in enumerate(streams):
            prompts = make_prompts(n * args.requests_per_stream, args.input_len, seed=n)

            def run_ours() -> RunResult:
                return asyncio.run(run_load("lockgate", lockgate.base_url, prompts, n, args.output_len, ours))

            def run_theirs() -> RunResult | None:
                if peer is None:
                    return None
                pport = free_port()
                pcmd = [peer, "-m", gguf, "--host", "127.0.0.1", "--port", str(pport), "-t", str(args.threads),
                        "-np", str(n), "-c", str(n * (args.input_len + args.output_len + 16)), "--cont-batching",
                        "--no-webui"]
                if k == 0:
                    print(f"llama-server: {' '.join(pcmd)}", flush=True)
                srv = start(f"llama-server-{n}", pcmd, pport, logdir, "/health")
                try:
                    return asyncio.run(run_load("llama-server", srv.base_url, prompts, n, args.output_len, theirs))
                finally:
                    srv.stop()

            if k % 2 == 0:
                a = run_ours()
                b = run_theirs()
            else:
                b = run_theirs()
                a = run_ours()
            rows.append((n, a, b))
    finally:
        lockgate.stop()
    report(rows, args, kernels)
    shutil.rmtree(logdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
