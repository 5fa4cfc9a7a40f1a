"""Structured outputs on CPU: JSON-schema-constrained decoding against the same requests unconstrained,
and llama-cpp-python with the same schemas, on the default model, in one run.

    .venv/bin/python benchmarks/structured.py [--streams 16] [--max-tokens 200] [--reps 3]
                                              [--threads N] [--skip-llamacpp] [--llamacpp-python PY]

The 16 extraction tasks (benchmarks/structured_cases.py: invoice, person, event, product, ...
with nested objects, arrays, enums, number ranges, patterns) are asked for through lockgate's
OpenAI server (`--quantization int4`: the GGUF's Q4_1 blocks on lockgate's native kernels),
each prompt holding its schema and asking for the JSON, greedy, `max_tokens` 200:

- decode tokens/s: the 16 requests at once, streamed, with `response_format` json_schema (strict)
  and without it, in alternating pairs; the rate is the tokens all streams receive while all 16
  are decoding (from the last stream's first token to the first stream's last), so prompt
  processing and the different answer lengths do not enter it. The ratio constrained /
  unconstrained (median over pairs) must be at least 0.9;
- time to first token, one request at a time: without a schema, with a schema the server has
  never seen (its grammar is compiled) and with the same schema again (cached). Prefix caching is
  off, so every request pays its whole prompt;
- validity: the share of answers that parse as JSON (code fences stripped) and validate against
  their schema with `jsonschema`, constrained and unconstrained;
- the peer: llama-cpp-python on the same GGUF, the same chat messages with its
  `response_format={"type": "json_object", "schema": ...}` (a GBNF grammar made from the schema)
  and without. It serves one request at a time, so it runs the 16 sequentially: its aggregate
  tokens/s is the sequential run's, its decode rate a single stream's.

Absolute figures move with the machine's load; the ratios within one run are what count.

llama-cpp-python is not a dependency: it builds llama.cpp from source (about 15 minutes on 2
cores). Install it in its own venv, found at /tmp/llamacpp-venv or passed with --llamacpp-python:

    python3 -m venv /tmp/llamacpp-venv && /tmp/llamacpp-venv/bin/pip install llama-cpp-python
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Any

import httpx
import jsonschema

sys.path.insert(0, str(Path(__file__).resolve().parent))
from structured_cases import CASES, Case  # noqa: E402

MIN_RATIO = 0.9
STATS_WAIT_S = 1.0
INSTALL_HINT = "python3 -m venv /tmp/llamacpp-venv && /tmp/llamacpp-venv/bin/pip install llama-cpp-python"
ISA_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile")
FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.S)


# ---- answers -------------------------------------------------------------------------------

@dataclass
class Answer:
    """One request's stream as a client sees it."""

    text: str = ""
    finish_reason: str | None = None
    tokens: int = 0  # the server's count (usage); chunks where it gives none
    chunk_times: list[float] = field(default_factory=list)  # perf_counter of each chunk with text
    start: float = 0.0
    error: str = ""

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.start if self.chunk_times else float("nan")

    @property
    def emitted(self) -> int:
        """Tokens that came as text: the server counts an EOS that ended the answer, which sends none."""
        return self.tokens - (self.finish_reason == "stop" and self.tokens > len(self.chunk_times))

    @property
    def decode_rate(self) -> float | None:
        """This stream's tokens/s after its first token."""
        if len(self.chunk_times) < 2 or self.emitted < 2:
            return None
        return (self.emitted - 1) / (self.chunk_times[-1] - self.chunk_times[0])


def parse_json(text: str) -> Any:
    """The answer as JSON (surrounding whitespace and a Markdown code fence allowed); ValueError if
    it is not JSON. The unconstrained answers get this benefit of the doubt."""
    s = text.strip()
    m = FENCE.match(s)
    return json.loads(m.group(1) if m else s)


@dataclass
class Validity:
    answers: int = 0
    parsed: int = 0
    valid: int = 0
    cut: int = 0  # ended by max_tokens

    def add(self, case: Case, a: Answer) -> None:
        self.answers += 1
        self.cut += a.finish_reason == "length"
        try:
            doc = parse_json(a.text)
        except ValueError:
            return
        self.parsed += 1
        self.valid += jsonschema.Draft202012Validator(case.schema).is_valid(doc)

    def pct(self, n: int) -> str:
        return f"{100 * n / self.answers:.0f}%" if self.answers else "-"


def window_rate(answers: list[Answer]) -> tuple[float, float] | None:
    """(tokens/s, seconds) while every stream is decoding: from the last stream's first token to the
    first stream's last one. A chunk carries tokens / chunks of its stream's tokens (one, unless the
    server merged some). None where no such window exists (a stream ended before another began)."""
    live = [a for a in answers if len(a.chunk_times) >= 2]
    if len(live) != len(answers):
        return None
    begin = max(a.chunk_times[0] for a in live)
    end = min(a.chunk_times[-1] for a in live)
    if end <= begin:
        return None
    tokens = sum(sum(begin < t <= end for t in a.chunk_times) * a.emitted / len(a.chunk_times) for a in live)
    return tokens / (end - begin), end - begin


# ---- lockgate ------------------------------------------------------------------------------

def response_format(case: Case, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": case.name, "schema": schema or case.schema, "strict": True}}


def messages(case: Case) -> list[dict[str, str]]:
    return [{"role": "user", "content": case.prompt()}]


async def stream_chat(client: httpx.AsyncClient, body: dict[str, Any]) -> Answer:
    a = Answer(start=time.perf_counter())
    parts: list[str] = []
    try:
        async with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True,
                                 "stream_options": {"include_usage": True}}) as r:
            if r.status_code != 200:
                a.error = f"HTTP {r.status_code}: {(await r.aread())[:300]!r}"
                return a
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    a.error = str(chunk["error"])[:300]
                    return a
                if chunk.get("usage"):
                    a.tokens = chunk["usage"]["completion_tokens"]
                for c in chunk.get("choices", []):
                    if c.get("delta", {}).get("content"):
                        a.chunk_times.append(time.perf_counter())
                        parts.append(c["delta"]["content"])
                    if c.get("finish_reason"):
                        a.finish_reason = c["finish_reason"]
    except httpx.HTTPError as exc:
        a.error = repr(exc)
    a.text = "".join(parts)
    a.tokens = a.tokens or len(a.chunk_times)
    return a


@dataclass
class Wave:
    """The streams of one run, sent at once; `engine`: the server's step and bitmask seconds in it."""

    constrained: bool
    answers: list[Answer]
    wall: float
    engine: dict[str, float] = field(default_factory=dict)

    @property
    def output_rate(self) -> float:
        return sum(a.tokens for a in self.answers) / self.wall


async def wave(base_url: str, model: str, cases: list[Case], constrained: bool, max_tokens: int) -> Wave:
    async with httpx.AsyncClient(base_url=base_url, timeout=3600,
                                 limits=httpx.Limits(max_connections=len(cases) + 4)) as client:
        bodies = [{"model": model, "messages": messages(c), "max_tokens": max_tokens, "temperature": 0.0,
                   **({"response_format": response_format(c)} if constrained else {})} for c in cases]
        t = time.perf_counter()
        answers = await asyncio.gather(*(stream_chat(client, b) for b in bodies))
        return Wave(constrained, list(answers), time.perf_counter() - t)


@dataclass
class FirstTokens:
    """TTFT of one request at a time, per case: no schema, a never-seen schema, the same one again."""

    first_ever: float = 0.0  # the server's first constrained request (its tokenizer is built then)
    plain: list[float] = field(default_factory=list)
    new: list[float] = field(default_factory=list)
    cached: list[float] = field(default_factory=list)


async def first_tokens(base_url: str, model: str, cases: list[Case]) -> FirstTokens:
    out = FirstTokens()
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as client:
        async def one(case: Case, rf: dict[str, Any] | None) -> float:
            body = {"model": model, "messages": messages(case), "max_tokens": 1, "temperature": 0.0,
                    **({"response_format": rf} if rf else {})}
            a = await stream_chat(client, body)
            if a.error or not a.chunk_times:
                raise RuntimeError(f"{case.name}: {a.error or 'no token'}")
            return a.ttft

        # The first constrained request builds the grammar engine's tokenizer: timed on its own.
        warm = {"type": "json_schema", "json_schema": {"name": "warmup", "schema": {"type": "object", "properties": {
            "ok": {"type": "boolean"}}, "required": ["ok"]}}}
        out.first_ever = await one(cases[0], warm)
        for case in cases:
            # A title no request has used: a schema text the server has never seen, so it compiles.
            fresh = {**case.schema, "title": f"{case.name}-{uuid.uuid4().hex[:12]}"}
            out.plain.append(await one(case, None))
            out.new.append(await one(case, response_format(case, fresh)))
            out.cached.append(await one(case, response_format(case, fresh)))
    return out


ENGINE_METRICS = ("lockgate:engine_step_seconds_sum", "lockgate:engine_step_seconds_count",
                  "lockgate:structured_mask_seconds_sum", "lockgate:structured_mask_seconds_count")


def engine_metrics(srv: Any) -> dict[str, float]:
    """The server's cumulative step and bitmask seconds (/metrics)."""
    m = srv.metrics()
    return {k: m.get(k, 0.0) for k in ENGINE_METRICS}


def mask_share(waves: list[Wave]) -> str:
    """Bitmask milliseconds per step that filled any, and their share of all step time, over `waves`."""
    d = {k: sum(w.engine.get(k, 0.0) for w in waves) for k in ENGINE_METRICS}
    steps_s, masks_s, masks_n = d[ENGINE_METRICS[0]], d[ENGINE_METRICS[2]], d[ENGINE_METRICS[3]]
    if not masks_n or not steps_s:
        return "no bitmask steps recorded"
    return (f"{1000 * masks_s / masks_n:.2f} ms of bitmasks per step with constrained rows, "
            f"{100 * masks_s / steps_s:.1f}% of the engine's step time")


def mean_step_ms(waves: list[Wave]) -> float | None:
    steps_s = sum(w.engine.get(ENGINE_METRICS[0], 0.0) for w in waves)
    steps_n = sum(w.engine.get(ENGINE_METRICS[1], 0.0) for w in waves)
    return 1000 * steps_s / steps_n if steps_n else None


def start_lockgate(threads: int, streams: int, logdir: Path):  # noqa: ANN201 (ServerProcess)
    from lockgate.bench.procs import ServerProcess

    # No prefix cache (every request pays its whole prompt, as llama-cpp-python's does after its
    # reset) and no SLO shedding (the waves queue on purpose).
    args = ["--quantization", "int4", "--num-threads", str(threads), "--no-enable-prefix-caching",
            "--max-num-seqs", str(max(streams, 16)), "--no-slo-admission", "--request-log", "off",
            "--data-dir", str(logdir / "data")]
    print(f"lockgate: python -m lockgate.server {' '.join(args)}", flush=True)
    return ServerProcess(args, logdir / "lockgate.log")


# ---- llama-cpp-python ----------------------------------------------------------------------

# Runs inside llama-cpp-python's interpreter: one chat completion per JSON line read from stdin,
# streamed, answered with a JSON line (text, finish reason, token count, each token's time).
LLAMACPP_SCRIPT = r"""
import json, sys, time
from llama_cpp import Llama
path, threads = sys.argv[1], int(sys.argv[2])
llm = Llama(model_path=path, n_ctx=2048, n_batch=512, n_threads=threads, n_threads_batch=threads, verbose=False)
print("ready", flush=True)
for line in sys.stdin:
    job = json.loads(line)
    # Its prompt cache would reuse the KV of the previous call's shared prefix; lockgate's prefix
    # cache is off in this benchmark, so both pay every prompt in full.
    llm.reset()
    kw = {"response_format": {"type": "json_object", "schema": job["schema"]}} if job["schema"] else {}
    t0, times, parts, finish, error = time.perf_counter(), [], [], None, ""
    try:
        for chunk in llm.create_chat_completion(job["messages"], max_tokens=job["max_tokens"], temperature=0.0,
                                                top_k=1, stream=True, **kw):
            choice = chunk["choices"][0]
            text = choice["delta"].get("content")
            if text:
                times.append(time.perf_counter())
                parts.append(text)
            finish = choice.get("finish_reason") or finish
    except Exception as exc:  # e.g. a grammar llama.cpp cannot parse: that request fails, the run goes on
        error = repr(exc)[:300]
    out = "".join(parts)
    tokens = len(llm.tokenize(out.encode(), add_bos=False, special=True)) if out else 0
    print(json.dumps({"start": t0, "times": times, "text": out, "finish_reason": finish,
                      "tokens": max(tokens, len(times)), "error": error}), flush=True)
"""


class LlamaCpp:
    """llama-cpp-python in its own interpreter (its venv), one request at a time."""

    def __init__(self, py: str, gguf: str, threads: int) -> None:
        self.proc = subprocess.Popen([py, "-c", LLAMACPP_SCRIPT, gguf, str(threads)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("llama-cpp-python did not start")

    def chat(self, case: Case, schema: dict[str, Any] | None, max_tokens: int) -> Answer:
        job = {"messages": messages(case), "schema": schema, "max_tokens": max_tokens}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        r = json.loads(self.proc.stdout.readline())
        return Answer(text=r["text"], finish_reason=r["finish_reason"], tokens=r["tokens"],
                      chunk_times=r["times"], start=r["start"], error=r["error"])

    def sequential(self, cases: list[Case], constrained: bool, max_tokens: int) -> Wave:
        t = time.perf_counter()
        answers = [self.chat(c, c.schema if constrained else None, max_tokens) for c in cases]
        return Wave(constrained, answers, time.perf_counter() - t)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def find_llamacpp_python(explicit: str | None) -> str | None:
    candidates = [explicit] if explicit else [sys.executable, "/tmp/llamacpp-venv/bin/python"]
    for py in candidates:
        if py and Path(py).exists() and subprocess.run([py, "-c", "import llama_cpp"],
                                                       capture_output=True).returncode == 0:
            return py
    return None


# ---- the machine ---------------------------------------------------------------------------

def machine() -> str:
    """CPU model, cores, the instruction sets that matter here, and the kernels int4 runs on."""
    model, flags = "unknown CPU", set()
    try:
        info = Path("/proc/cpuinfo").read_text()
        model = re.search(r"^model name\s*:\s*(.*)$", info, re.M).group(1).strip()
        flags = set(re.search(r"^flags\s*:\s*(.*)$", info, re.M).group(1).split())
    except (OSError, AttributeError):
        pass
    isa = " ".join(f for f in ISA_FLAGS if f in flags) or "none of " + " ".join(ISA_FLAGS)
    from lockgate.engine.native.build import load

    lib = load()
    kernels = ("lockgate's native C kernels, " + ("AVX2 path" if lib.lg_has_avx2() else "portable C path")
               if lib is not None else "PyTorch's int4 kernels (native kernels unavailable)")
    return f"{model}, {os.cpu_count()} cores; ISA: {isa}; int4 on {kernels}"


# ---- the report ----------------------------------------------------------------------------

def fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None or x != x else format(x, spec)


def row(engine: str, mode: str, waves: list[Wave], cases: list[Case], decode: float | None) -> str:
    v = Validity()
    for w in waves:
        for c, a in zip(cases, w.answers):
            v.add(c, a)
    answers = [a for w in waves for a in w.answers]
    per_stream = [r for r in (a.decode_rate for a in answers) if r]
    return (f"| {engine} | {mode} | {v.pct(v.valid)} | {v.pct(v.parsed)} | {v.pct(v.cut)} | "
            f"{sum(a.tokens for a in answers) / len(answers):.0f} | {fmt(max(w.output_rate for w in waves))} | "
            f"{fmt(decode)} | {fmt(median(per_stream) if per_stream else None)} | "
            f"{fmt(median(a.ttft for a in answers), '.2f')} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=16, help="concurrent requests (cases, repeated if more than 16)")
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--reps", type=int, default=3, help="pairs of waves (constrained, unconstrained)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="CPU threads of each engine")
    ap.add_argument("--skip-llamacpp", action="store_true")
    ap.add_argument("--llamacpp-python", help="a Python with llama-cpp-python installed")
    args = ap.parse_args()
    if args.streams < 1 or args.reps < 1 or args.max_tokens < 2:
        ap.error("--streams and --reps must be at least 1, --max-tokens at least 2")
    cases = [CASES[i % len(CASES)] for i in range(args.streams)]

    print(f"machine: {machine()}", flush=True)
    logdir = Path(tempfile.mkdtemp(prefix="lockgate-structured-"))
    from lockgate.engine.loader.default_model import default_model_path

    gguf = str(default_model_path())
    srv = start_lockgate(args.threads, args.streams, logdir)
    try:
        model = httpx.get(f"{srv.base_url}/v1/models", timeout=10).json()["data"][0]["id"]
        asyncio.run(wave(srv.base_url, model, cases[:1], False, 4))  # warm-up
        ft = asyncio.run(first_tokens(srv.base_url, model, cases[:len(CASES)]))
        print(f"lockgate TTFT, one request at a time (median of {len(ft.plain)}): no schema {median(ft.plain):.3f} s, "
              f"new schema {median(ft.new):.3f} s, cached schema {median(ft.cached):.3f} s; "
              f"the first constrained request after start {ft.first_ever:.3f} s", flush=True)
        waves: dict[bool, list[Wave]] = {True: [], False: []}
        ratios: list[float] = []
        for rep in range(args.reps):
            pair = {}
            for constrained in ((True, False) if rep % 2 else (False, True)):  # alternate which goes first
                before = engine_metrics(srv)
                w = asyncio.run(wave(srv.base_url, model, cases, constrained, args.max_tokens))
                time.sleep(STATS_WAIT_S)  # the core ships its step counters periodically
                w.engine = {k: v - before[k] for k, v in engine_metrics(srv).items()}
                errors = [a.error for a in w.answers if a.error]
                if errors:
                    raise RuntimeError(f"lockgate: {len(errors)} requests failed, e.g. {errors[0]}")
                merged = sum(a.emitted != len(a.chunk_times) for a in w.answers)
                rate = window_rate(w.answers)
                pair[constrained] = rate
                waves[constrained].append(w)
                print(f"lockgate {'json_schema ' if constrained else 'unconstrained'} wave {rep + 1}: "
                      f"{sum(a.tokens for a in w.answers)} tokens in {w.wall:.1f} s ({w.output_rate:.1f} tok/s), "
                      + (f"decode with all {args.streams} streams {rate[0]:.1f} tok/s over {rate[1]:.1f} s"
                         if rate else "no window with every stream decoding")
                      + (f"; {merged} streams had chunks of several tokens" if merged else ""), flush=True)
            if pair[True] and pair[False]:
                ratios.append(pair[True][0] / pair[False][0])
    finally:
        srv.stop()

    peer: dict[bool, Wave] = {}
    py = None if args.skip_llamacpp else find_llamacpp_python(args.llamacpp_python)
    if py is None:
        if not args.skip_llamacpp:
            print(f"llama-cpp-python is not installed: lockgate measured alone. To compare, run:\n    {INSTALL_HINT}\n"
                  "(or pass --llamacpp-python /path/to/venv/bin/python)", flush=True)
    else:
        llama = LlamaCpp(py, gguf, args.threads)
        try:
            llama.sequential(cases[:1], False, 4)  # warm-up
            for constrained in (False, True):
                peer[constrained] = w = llama.sequential(cases, constrained, args.max_tokens)
                for c, a in zip(cases, w.answers):
                    if a.error:
                        print(f"llama-cpp-python failed on {c.name}: {a.error}", flush=True)
                print(f"llama-cpp-python {'json schema' if constrained else 'unconstrained'}, {len(cases)} requests "
                      f"one at a time: {sum(a.tokens for a in w.answers)} tokens in {w.wall:.1f} s "
                      f"({w.output_rate:.1f} tok/s)", flush=True)
        finally:
            llama.close()

    def best(constrained: bool) -> float | None:
        rates = [r[0] for r in (window_rate(w.answers) for w in waves[constrained]) if r]
        return max(rates) if rates else None

    print(f"\n{args.streams} streams, {args.max_tokens} max tokens, greedy, {args.reps} pairs of waves; lockgate int4 "
          f"(GGUF Q4_1), llama-cpp-python on {Path(gguf).name}")
    print("| engine | mode | valid (jsonschema) | parses | cut by max_tokens | output tokens (mean) | "
          "aggregate tok/s (wall, prompts included) | decode tok/s | per-stream decode tok/s (median) | "
          "TTFT s (median) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for constrained in (True, False):
        mode = "json_schema (strict)" if constrained else "unconstrained, JSON asked in the prompt"
        print(row("lockgate", mode, waves[constrained], cases, best(constrained)))
    for constrained, w in sorted(peer.items(), reverse=True):
        mode = "response_format json_object + schema" if constrained else "unconstrained, JSON asked in the prompt"
        rates = [r for r in (a.decode_rate for a in w.answers) if r]
        print(row("llama-cpp-python (sequential)", mode, [w], cases, median(rates) if rates else None))
    print(f"\nlockgate decode tok/s: the best wave's rate while all {args.streams} streams decode; llama-cpp-python: "
          "one stream at a time (its median stream). Aggregate: all tokens over the wave's wall time (lockgate: "
          "the streams at once; llama-cpp-python: one after another). TTFT of the waves includes queueing "
          "behind the other streams' prompts.")
    print(f"TTFT one request at a time (lockgate, median of {len(ft.plain)} schemas): "
          f"no schema {median(ft.plain):.3f} s, "
          f"new schema (compiled) {median(ft.new):.3f} s, cached schema {median(ft.cached):.3f} s "
          f"(new - cached, median per schema: {median(n - c for n, c in zip(ft.new, ft.cached)) * 1000:+.0f} ms); "
          f"first constrained request after start (tokenizer built) {ft.first_ever:.3f} s")
    print(f"lockgate engine: json_schema waves {mask_share(waves[True])}; mean step (prompts included) "
          f"{fmt(mean_step_ms(waves[True]), '.1f')} ms with json_schema, {fmt(mean_step_ms(waves[False]), '.1f')} ms "
          "without")
    if ratios:
        r = median(ratios)
        print(f"decode tok/s json_schema / unconstrained (lockgate, {args.streams} streams): median {r:.3f} over "
              f"pairs {', '.join(f'{x:.3f}' for x in ratios)}: {'PASS' if r >= MIN_RATIO else 'FAIL'} "
              f"(needs >= {MIN_RATIO})")
    else:
        print("decode ratio: no pair had a window with every stream decoding (try more --max-tokens)")
    shutil.rmtree(logdir, ignore_errors=True)
    return 0 if ratios and median(ratios) >= MIN_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
