"""guidellm (the vLLM project's load generator) beside `lockgate bench`, on one server, workload and rate.

    .venv/bin/python benchmarks/guidellm_peer.py [--rate 4] [--requests 60] [--input-len 256] [--output-len 128]
                                                 [--step-delay 0.02] [--reps 3] [--work-dir DIR] [--json out.json]

The server is lockgate on the fake engine (`--load-format fake --fake-step-delay S`: no model,
every engine step sleeps S seconds, plain tokens, never EOS), so what it does is fixed: TTFT is
about one step plus the HTTP path, each further token one step. Both clients send the same
load to it: `--requests` streamed `/v1/completions` at a constant `--rate` (evenly spaced
arrivals), prompts of `--input-len` tokens, `max_tokens` = `--output-len` with `ignore_eos`.
- guidellm 0.8.1 (`guidellm run`, the command that replaced `guidellm benchmark`) in its own
  venv (`benchmarks/tool_venv.py`: torch==2.13.0 first, the CPU wheel; then guidellm), with a
  scenario file: `openai_http` backend, `constant` profile, `max_requests`, `synthetic_text` data
  (exact token counts, cut with the tokenizer from `lockgate export-tokenizer`);
- `lockgate bench --rate R --arrivals constant --num-requests N --len-dist fixed --ignore-eos`.

Runs are paired and alternate (rep 1: guidellm then lockgate bench; rep 2: the other order; ...),
so drift of the shared machine lands on both. Reported per client, medians over the reps:
TTFT p50, inter-token latency (guidellm's ITL is per request (last token - first token) /
(tokens - 1), which is lockgate bench's TPOT; lockgate bench's own ITL, the pooled gaps between
chunks, is shown too), output tokens/s and requests/s (each over the client's own run span),
and each client's own CPU use: its process tree's user + system time while the load ran (the
span from the first request's arrival to the last one's end, from the server's request log;
/proc sampled every 50 ms), per request and in cores, and in all (start-up included, wait4);
plus the server's CPU per request during that client's run. A metric agrees when the two medians
are within 10%.

Exit status: 0 every compared metric within 10%, 1 one is not (the table says which), 2 setup failed.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tool_venv import ensure_tool, tools_dir  # noqa: E402

from lockgate.bench.procs import ServerProcess, children  # noqa: E402
from lockgate.eval.hf_tokenizer import export_tokenizer  # noqa: E402

GUIDELLM = ["guidellm==0.8.1", "transformers==5.23.0"]
TOLERANCE = 0.10
_TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pids: list[int]) -> float:
    """user + system seconds of these processes so far (/proc/PID/stat)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / _TICK
        except (OSError, IndexError, ValueError):
            pass
    return total


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants now."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children(p))
    return out


class CpuSampler(threading.Thread):
    """(Unix time, CPU seconds of a process tree so far) every 50 ms while the process runs. A child
    that exits takes its CPU out of /proc, so the series keeps its running maximum."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.samples, self.done = pid, [(time.time(), 0.0)], threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            self.samples.append((time.time(), max(self.samples[-1][1], proc_cpu_s(tree(self.pid)))))

    def at(self, t: float) -> float:
        """CPU seconds at Unix time `t` (linear between samples)."""
        prev = self.samples[0]
        for cur in self.samples:
            if cur[0] >= t:
                span = cur[0] - prev[0]
                return prev[1] + (cur[1] - prev[1]) * ((t - prev[0]) / span if span > 0 else 1.0)
            prev = cur
        return self.samples[-1][1]


def timed(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[int, float, float, CpuSampler]:
    """(exit status, wall seconds, CPU seconds of the process and the children it waited for, its CPU series)."""
    print("+ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        sampler = CpuSampler(proc.pid)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        sampler.done.set()
        sampler.join()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.monotonic() - t0, usage.ru_utime + usage.ru_stime, sampler


def load_span(server_log: Path, offset: int) -> tuple[float, float, int]:
    """(first request's arrival, last request's end, requests) in Unix time, from the server's
    request log lines written since `offset`: the load phase as the server saw it."""
    starts, ends = [], []
    with open(server_log, "rb") as f:
        f.seek(offset)
        for line in f.read().decode(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("event") == "request" and rec.get("e2e_s") is not None:
                end = datetime.fromisoformat(rec["ts"].replace("Z", "+00:00")).timestamp()
                ends.append(end)
                starts.append(end - rec["e2e_s"])
    if not ends:
        raise RuntimeError(f"no request lines in {server_log} for this run")
    return min(starts), max(ends), len(ends)


def guidellm_run(bin_dir: Path, out: Path, base_url: str, model: str, tok_dir: Path, args: argparse.Namespace,
                 seed: int, env: dict[str, str]) -> dict:
    scenario = {"spec": {
        "backend": {"kind": "openai_http", "target": base_url, "model": model, "request_format": "/v1/completions",
                    "http2": False},
        "profile": {"kind": "constant", "rate": [args.rate]},
        "constraints": [{"kind": "max_requests", "count": args.requests}],
        "tokenizer": {"kind": "huggingface_auto", "model": str(tok_dir)},
        "data": [{"kind": "synthetic_text", "prompt_tokens": args.input_len, "output_tokens": args.output_len}],
        "seed": {"kind": "static", "value": seed},
        "outputs": [{"kind": "json", "path": str(out / "guidellm.json")}],
    }}
    out.mkdir(parents=True, exist_ok=True)
    (out / "scenario.json").write_text(json.dumps(scenario, indent=2))
    cmd = [str(bin_dir / "guidellm"), "run", "--scenario", str(out / "scenario.json"), "--disable-progress"]
    rc, wall, cpu, sampler = timed(cmd, out / "guidellm.log", env)
    if rc != 0:
        raise RuntimeError(f"guidellm exited {rc}: {(out / 'guidellm.log').read_text()[-3000:]}")
    bench = json.loads((out / "guidellm.json").read_text())["benchmarks"][0]
    m = bench["metrics"]

    def med(name: str) -> float:
        return m[name]["successful"]["median"]

    done = int(m["request_totals"]["successful"])
    dur = bench["duration"]
    return {"ttft_p50_ms": med("time_to_first_token_ms"), "itl_ms": med("inter_token_latency_ms"),
            "chunk_gap_p50_ms": None, "output_tok_s": m["output_token_count"]["successful"]["total_sum"] / dur,
            "req_s": done / dur, "completed": done, "errors": int(m["request_totals"]["errored"]),
            "prompt_tokens_mean": m["prompt_token_count"]["successful"]["mean"],
            "client_cpu_s": cpu, "wall_s": wall, "span_s": dur, "sampler": sampler}


def lockgate_run(out: Path, base_url: str, model: str, args: argparse.Namespace, seed: int) -> dict:
    lockgate = str(Path(sys.executable).parent / "lockgate")
    duration = args.requests / args.rate + 5  # --num-requests ends it first
    cmd = [lockgate, "bench", "--base-url", f"{base_url}/v1", "--model", model, "--rate", str(args.rate),
           "--arrivals", "constant", "--num-requests", str(args.requests), "--duration", str(duration),
           "--input-len", str(args.input_len), "--output-len", str(args.output_len), "--len-dist", "fixed",
           "--ignore-eos", "--seed", str(seed), "--out", str(out), "--no-progress", "--no-plots"]
    rc, wall, cpu, sampler = timed(cmd, out.with_suffix(".log"))
    if rc != 0:
        raise RuntimeError(f"lockgate bench exited {rc}: {out.with_suffix('.log').read_text()[-3000:]}")
    result = json.loads((out / "result.json").read_text())
    o = result["summary"]["overall"]
    span = result["summary"]["duration_s"]
    return {"ttft_p50_ms": o["ttft"]["p50"] * 1e3, "itl_ms": o["tpot"]["p50"] * 1e3,
            "chunk_gap_p50_ms": o["itl"]["p50"] * 1e3, "output_tok_s": o["output_token_rate"],
            "req_s": o["request_rate"], "completed": o["ok"], "errors": o["errors"] + o["rejected"],
            "prompt_tokens_mean": o["prompt_tokens"] / max(o["requests"], 1),
            "client_cpu_s": cpu, "wall_s": wall, "span_s": span, "sampler": sampler}


ROWS = [  # (key, label, compared within 10%)
    ("ttft_p50_ms", "TTFT p50 (ms)", True),
    ("itl_ms", "ITL (ms): per-request (last-first)/(n-1), p50", True),
    ("chunk_gap_p50_ms", "  lockgate bench: pooled chunk gaps p50 (ms)", False),
    ("output_tok_s", "output tokens/s", True),
    ("req_s", "requests/s", True),
    ("prompt_tokens_mean", "prompt tokens (mean)", False),
    ("client_cpu_per_req_ms", "client CPU per request under load (ms)", False),
    ("client_cpu_share", "client CPU under load (cores)", False),
    ("client_cpu_s", "client CPU per run incl. start-up (s)", False),
    ("wall_s", "client wall time per run incl. start-up (s)", False),
    ("server_cpu_per_req_ms", "server CPU per request (ms)", False),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=float, default=4.0, help="requests/s, constant arrivals")
    ap.add_argument("--requests", type=int, default=60, help="requests per run")
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--step-delay", type=float, default=0.02, help="the fake engine's seconds per step")
    ap.add_argument("--reps", type=int, default=3, help="paired repetitions (alternating order)")
    ap.add_argument("--work-dir", default=None)
    ap.add_argument("--venv", default=None, help=f"guidellm's venv (default: {tools_dir() / 'guidellm'})")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="lockgate-guidellm-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"work dir: {work}", flush=True)
    try:
        bin_dir = ensure_tool("guidellm", GUIDELLM, "guidellm", Path(args.venv) if args.venv else None)
    except (subprocess.CalledProcessError, RuntimeError) as e:
        print(f"SETUP FAILED: guidellm install: {e}", file=sys.stderr)
        return 2
    print(f"+ {Path(sys.executable).parent / 'lockgate'} export-tokenizer {work / 'tokenizer'}", flush=True)
    tok_dir = export_tokenizer(None, work / "tokenizer")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_DATASETS_CACHE": str(work / "hf-datasets"),
           "TOKENIZERS_PARALLELISM": "false"}
    server_args = ["--load-format", "fake", "--fake-step-delay", str(args.step_delay)]
    print(f"+ {sys.executable} -m lockgate.server {' '.join(server_args)}", flush=True)
    try:
        server = ServerProcess(server_args, work / "server.log")
    except (RuntimeError, TimeoutError) as e:
        print(f"SETUP FAILED: server: {e}", file=sys.stderr)
        return 2
    runs: dict[str, list[dict]] = {"guidellm": [], "lockgate": []}
    try:
        model = httpx.get(f"{server.base_url}/v1/models", timeout=10).json()["data"][0]["id"]
        server_pids = [server.pid, *server.engine_pids()]
        for rep in range(args.reps):
            order = ["guidellm", "lockgate"] if rep % 2 == 0 else ["lockgate", "guidellm"]
            for who in order:
                before = proc_cpu_s(server_pids)
                offset = server.log_path.stat().st_size
                if who == "guidellm":
                    r = guidellm_run(bin_dir, work / f"guidellm-{rep}", server.base_url, model, tok_dir, args, rep, env)
                else:
                    r = lockgate_run(work / f"lockgate-{rep}", server.base_url, model, args, rep)
                r["server_cpu_per_req_ms"] = (proc_cpu_s(server_pids) - before) * 1e3 / max(r["completed"], 1)
                start, end, seen = load_span(server.log_path, offset)
                sampler = r.pop("sampler")
                r["client_load_cpu_s"] = sampler.at(end) - sampler.at(start)
                r["client_cpu_per_req_ms"] = r["client_load_cpu_s"] * 1e3 / max(r["completed"], 1)
                r["client_cpu_share"] = r["client_load_cpu_s"] / max(end - start, 1e-9)
                r["server_requests"] = seen
                runs[who].append(r)
                print(f"  rep {rep + 1} {who}: TTFT p50 {r['ttft_p50_ms']:.1f} ms, ITL {r['itl_ms']:.2f} ms, "
                      f"{r['output_tok_s']:.1f} tok/s, {r['completed']} ok / {r['errors']} failed; client CPU "
                      f"{r['client_load_cpu_s']:.2f} s under load, {r['client_cpu_s']:.1f} s in all", flush=True)
    except (RuntimeError, httpx.HTTPError) as e:
        print(f"SETUP FAILED: {e}", file=sys.stderr)
        return 2
    finally:
        server.stop()

    def median(who: str, key: str) -> float | None:
        values = [r[key] for r in runs[who] if r.get(key) is not None]
        return statistics.median(values) if values else None

    print(f"\nfake engine {args.step_delay * 1e3:g} ms/step; {args.requests} requests at {args.rate:g}/s constant, "
          f"{args.input_len} -> {args.output_len} tokens; medians of {args.reps} paired runs")
    print(f"{'metric':<48}{'guidellm':>12}{'lockgate bench':>16}{'ratio':>8}")
    table, failed = [], []
    for key, label, compared in ROWS:
        g, lg = median("guidellm", key), median("lockgate", key)
        ratio = lg / g if g and lg is not None else None
        ok = None if not compared or ratio is None else abs(ratio - 1) <= TOLERANCE
        if ok is False:
            failed.append(label)
        fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        verdict = "" if ok is None else ("  ok" if ok else "  >10%")
        print(f"{label:<48}{fmt(g):>12}{fmt(lg):>16}{fmt(ratio):>8}{verdict}")
        table.append({"metric": key, "label": label, "guidellm": g, "lockgate_bench": lg, "ratio": ratio,
                      "within_10pct": ok})
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(args), "table": table, "runs": runs}, indent=2) + "\n")
    if failed:
        print("DIFFER by more than 10%: " + "; ".join(failed))
        return 1
    print("AGREE: TTFT, ITL and throughput within 10%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
