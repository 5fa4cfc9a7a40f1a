"""Replica routing: lockgate's KV-cache-aware router against round robin and least loaded, one run.

    .venv/bin/python benchmarks/fleet_routing.py [--quick] [--skip-real] [--skip-fake] [--out DIR]
        [--seed 1] [--qps 4,5,6.4,...] [--step-requests 200] [--min-step-seconds 8]
        [--real-qps 0.5,1,2,3,4] [--no-probe]

Policies (the server's hidden `--router-policy`), each on its own server, measured in one run:
- kv:            lockgate's router (lifecycle/router.py): the replica with the lowest predicted time to
                 first token (uncached prompt tokens + queued and running work + KV pressure);
- round_robin:   the next replica in turn;
- least_loaded:  power of two choices on requests queued and running.

Fake part (the targets). Each policy gets a `python -m lockgate.server --replicas 4 --load-format fake`
whose engines run no model: a step sleeps `--fake-step-delay 0.01` + `--fake-token-delay 0.0002` x the
tokens it computes, and prefix-cache hits are not computed, so a cached prefix is cheaper, as on real
hardware. Each replica's KV cache holds a pool where all prefixes together fill 60% of the fleet's pool
(no single replica can hold them all), plus room for the questions and outputs of `--max-num-seqs`
requests; the script computes and prints the sizes.

The workload is llm-d's shared-prefix benchmark, scaled down: 48 groups, each with a 2,048-token
prefix (random token ids, unique per group), 6 users per group, a 128-token question unique to
every request, 64 output tokens (`ignore_eos`). Prompts are token ids on /v1/completions (exact
lengths), streamed. Every server is first warmed with one request per group (so each prefix is
cached somewhere); then Poisson arrivals at a constant rate, stepped up (`--qps`); each step lasts
max(`--min-step-seconds`, `--step-requests` / qps). The policies run each step in turn on the same
arrivals and prompts (paired: a drift of the machine lands on all alike; the order rotates per
step); a policy stops stepping once its TTFT p90 passes 2 s. If round robin or least loaded stopped
below the highest step where kv's TTFT p90 is under 1 s, they are probed once at that step.

The load generator is this one asyncio process (httpx.AsyncClient, HTTP/1.1 keep-alive, one task per
request, every body built before the clock starts). It shares the 2 cores with the servers, and
httpx costs it about 10 ms of CPU per streamed request of 64 chunks, so it tops out near 50-60
req/s here. A step where it fell behind (achieved rate under 95% of the offered one, or dispatch lag
p99 over 100 ms) ends that policy's steps and counts for nothing: it measured the generator. When kv
was still under 1 s at its last counted step, its throughput ratio is a lower bound.

Per step and policy: TTFT p50/p90 (streaming, time to the first content chunk; a failed request
counts as infinite), output tokens/s (completed output tokens over the step's wall time), the
prefix-cache hit rate (cached_tokens / prompt_tokens from each response's usage, and the
`lockgate:prefix_cache_hits` / `_queries` counters' deltas), the ideal hit rate (every shared prefix
token a hit after its group's first request on that server) and the hit rate as a share of it, how
sticky each group was (share of a group's requests on its most used replica), the replicas' shares,
and the load generator's own state: achieved vs offered rate, dispatch lag, its CPU.

The router's own cost: (a) in process: `prompt_block_hashes` + `Router.route` + the ticket's start
and end on the workload's prompts, with an index filled like the benchmark's (each group's prefix on
one of 4 replicas, the rest of each replica's KV blocks as other blocks); (b) end to end: one short
non-streamed request at a time (max_tokens 1), alternating between a `--replicas 4` and a
`--replicas 1` server with the same fake costs, p50 difference.

Targets (issue 19): at the highest step where kv's TTFT p90 is under 1 s, round robin's TTFT p90 is
at least 10x kv's; kv's highest output tokens/s with TTFT p90 under 1 s is at least 1.8x round
robin's; kv's prefix-cache hit rate over its steps is at least 85% of the ideal; the router adds at
most 0.5 ms p50 (in process).

Real part (no target; `--skip-real` skips it): 2 replicas of the embedded SmolLM2-135M
(`--quantization int4 --num-threads 1`), kv against round robin, on the workload scaled to 2
cores (12 groups x 256-token prefixes, 32-token questions, 8 output tokens), a few low rates.

`--quick`: a 2-minute smoke run of everything with small shapes and short steps (12 groups, 16 output
tokens, 2 rates of 4-5 s; the real part one rate of 6 s): its numbers are not the targets'.
Tables are printed (markdown) and written with the settings, the machine and the commands to
reproduce to `--out` (default benchmarks/results/fleet_routing/): result.json and report.md.
On a 2-core machine a full run takes about 17 minutes (the fake part about 13, the real part about 4).
Exit status: 0 when it ran (a missed target prints FAIL with its ratio), 2 when setup or a run failed.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import os
import random
import resource
import shlex
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict, deque
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
import msgspec

from lockgate.bench.arrivals import fixed_rate
from lockgate.bench.procs import ServerProcess, children, parse_metrics
from lockgate.engine.prefix_hash import prompt_block_hashes
from lockgate.gateway.classes import DEFAULT_CLASSES
from lockgate.lifecycle.router import Router, RouterConfig
from lockgate.stats import percentile

POLICIES = ("kv", "round_robin", "least_loaded")
SHORT = {"kv": "kv", "round_robin": "rr", "least_loaded": "ll"}
STOP_P90_S = 2.0  # a policy stops stepping once its TTFT p90 passes this
GOOD_P90_S = 1.0  # the targets' "TTFT p90 under 1 s"
TARGET_TTFT_RATIO = 10.0
TARGET_THROUGHPUT_RATIO = 1.8
TARGET_HIT_OF_IDEAL = 0.85
TARGET_ROUTER_P50_MS = 0.5
TOKEN_LO, TOKEN_HI = 1000, 40000  # prompt token ids are drawn here (inside the default model's vocabulary)
SETTLE_S = 1.5  # after a step: the cores' stats heartbeat carries their last counters to /metrics
# The load generator is behind (the step measures it, not the server) below this share of the offered
# rate or above this dispatch lag p99.
GEN_MIN_ACHIEVED = 0.95
GEN_MAX_LAG_P99_MS = 100.0
KEEPALIVE_S = 4.0  # below the server's 5 s keep-alive timeout: never reuse a connection it is closing
ENV_DROP = ("LOCKGATE_ADMIN_KEY", "LOCKGATE_API_KEY", "LOCKGATE_DATA_DIR")
HEADERS = {"content-type": "application/json", "accept": "text/event-stream"}
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "fleet_routing"


# ---- settings ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Shape:
    """The shared-prefix workload."""
    groups: int
    prefix_len: int
    users: int  # per group
    question_len: int
    output_len: int

    @property
    def prompt_len(self) -> int:
        return self.prefix_len + self.question_len


@dataclass(frozen=True, slots=True)
class FleetSpec:
    """One server's engines (every policy's server gets the same)."""
    replicas: int
    max_num_seqs: int
    fake: tuple[float, float] | None  # (step delay, token delay) s; None: the real model
    extra: tuple[str, ...] = ()
    block_size: int = 16
    kv_fill: float = 0.6  # all prefixes together fill this share of the fleet's prefix pool
    max_prefill_tokens: int = 512
    max_num_batched_tokens: int = 2048


@dataclass(frozen=True, slots=True)
class Part:
    name: str  # "fake" | "real"
    shape: Shape
    fleet: FleetSpec
    policies: tuple[str, ...]
    qps: tuple[float, ...]
    step_requests: int
    min_step_seconds: float


def kv_sizing(shape: Shape, fleet: FleetSpec) -> dict[str, Any]:
    """Each replica's KV blocks: a prefix pool such that all prefixes fill `kv_fill` of the fleet's pool,
    plus room for the blocks of `max_num_seqs` requests beyond their shared prefix."""
    bs = fleet.block_size
    prefix_blocks = shape.groups * math.ceil(shape.prefix_len / bs)
    pool_fleet = math.ceil(prefix_blocks / fleet.kv_fill)
    pool = math.ceil(pool_fleet / fleet.replicas)
    per_request = math.ceil((shape.prompt_len + shape.output_len) / bs) - shape.prefix_len // bs
    room = fleet.max_num_seqs * per_request
    blocks = pool + room
    one_prefix = math.ceil(shape.prefix_len / bs)
    return {
        "block_size": bs, "prefix_blocks_all_groups": prefix_blocks, "pool_per_replica": pool,
        "room_blocks_per_request": per_request, "room_per_replica": room, "blocks_per_replica": blocks,
        "fleet_blocks": blocks * fleet.replicas, "prefixes_share_of_pool": prefix_blocks / (pool * fleet.replicas),
        "prefixes_share_of_fleet": prefix_blocks / (blocks * fleet.replicas),
        "prefixes_one_replica_holds": blocks // one_prefix, "one_replica_holds_all": blocks >= prefix_blocks,
    }


def max_model_len(shape: Shape) -> int:
    need = shape.prompt_len + shape.output_len + 16
    return max(256, 1 << (need - 1).bit_length())


def class_config(path: Path) -> Path:
    """The default classes with queue caps far above any load here: no request is shed."""
    path.write_text(json.dumps({"default": "standard", "classes": [
        {"name": c.name, "ttft_p95_s": c.ttft_s, "tpot_p95_s": c.tpot_s, "max_queued": 1_000_000,
         "objective": c.objective} for c in DEFAULT_CLASSES]}, indent=1))
    return path


def server_args(part: Part, policy: str, replicas: int, classes: Path) -> list[str]:
    f, s = part.fleet, kv_sizing(part.shape, part.fleet)
    args = ["--replicas", str(replicas), "--router-policy", policy,
            "--num-kv-blocks", str(s["blocks_per_replica"]), "--block-size", str(f.block_size),
            "--max-num-seqs", str(f.max_num_seqs), "--max-prefill-tokens", str(f.max_prefill_tokens),
            "--max-num-batched-tokens", str(f.max_num_batched_tokens),
            "--max-model-len", str(max_model_len(part.shape)),
            # Nothing shed or refused: routing is the subject, not admission.
            "--no-slo-admission", "--max-queued-requests", "1000000", "--max-queued-tokens", "1000000000",
            "--class-config", str(classes), "--request-log", "off", "--log-level", "warning"]
    if f.fake is not None:
        args += ["--load-format", "fake", "--fake-step-delay", str(f.fake[0]), "--fake-token-delay", str(f.fake[1])]
    return args + list(f.extra)


# ---- servers -----------------------------------------------------------------------------------
class SetupError(RuntimeError):
    pass


def _proc_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


class Server:
    """One `python -m lockgate.server` in its own directory (open mode), started without waiting."""

    def __init__(self, label: str, args: list[str], workdir: Path, replicas: int) -> None:
        self.label, self.args, self.replicas = label, args, replicas
        workdir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in ENV_DROP}
        self.proc = ServerProcess(args, workdir / "server.log", wait=False, cwd=workdir, env=env,
                                  die_with_parent=True)
        self.url = self.proc.base_url
        self.model = ""
        self.seen_groups: set[int] = set()  # groups sent to it so far (the ideal hit rate's state)

    def wait_ready(self, timeout: float) -> None:
        """/health, then every replica up (/health answers once the first one is)."""
        t = time.monotonic()
        try:
            self.proc.wait_healthy(timeout)
        except (RuntimeError, TimeoutError) as exc:
            raise SetupError(f"{self.label}: {exc}") from None
        while True:
            up = self.metrics().get("lockgate:replica_up", 0.0)
            if up >= self.replicas:
                break
            if self.proc.proc.poll() is not None or time.monotonic() - t > timeout:
                raise SetupError(f"{self.label}: {up:g} of {self.replicas} replicas up after "
                                 f"{time.monotonic() - t:.0f} s\n{self.proc.log_text()[-3000:]}")
            time.sleep(0.2)
        r = httpx.get(f"{self.url}/v1/models", timeout=10)
        if r.status_code != 200:
            raise SetupError(f"{self.label}: GET /v1/models: {r.status_code} {r.text[:300]}")
        self.model = r.json()["data"][0]["id"]

    def metrics(self) -> dict[str, float]:
        return parse_metrics(self.proc.metrics_text())

    def prefix_counters(self) -> tuple[float, float]:
        m = self.metrics()

        def get(name: str) -> float:
            return m.get(name + "_total", m.get(name, math.nan))

        return get("lockgate:prefix_cache_hits"), get("lockgate:prefix_cache_queries")

    def cpu_seconds(self) -> float:
        pid = self.proc.pid
        return _proc_cpu(pid) + sum(_proc_cpu(c) for c in children(pid))

    def command(self) -> str:
        return "python -m lockgate.server --port PORT --no-access-log " + shlex.join(self.args)

    def stop(self) -> None:
        self.proc.stop()


def start_servers(specs: list[tuple[str, list[str], int]], workdir: Path, timeout: float) -> dict[str, Server]:
    """Start them all at once, wait for each; on any failure stop every one."""
    servers: dict[str, Server] = {}
    try:
        for label, args, replicas in specs:
            servers[label] = Server(label, args, workdir / label, replicas)
        for s in servers.values():
            s.wait_ready(timeout)
    except BaseException:
        for s in servers.values():
            s.stop()
        raise
    return servers


# ---- workload ----------------------------------------------------------------------------------
@dataclass(slots=True)
class Planned:
    at: float  # seconds from the step's start
    group: int
    user: int
    ids: list[int]


class Workload:
    def __init__(self, shape: Shape, seed: int) -> None:
        self.shape, self.seed = shape, seed
        self.prefixes = [self._ids(random.Random(f"{seed}:prefix:{g}"), shape.prefix_len)
                         for g in range(shape.groups)]

    @staticmethod
    def _ids(rng: random.Random, n: int) -> list[int]:
        return [rng.randrange(TOKEN_LO, TOKEN_HI) for _ in range(n)]

    def requests(self, times: list[float], key: str) -> list[Planned]:
        rng = random.Random(f"{self.seed}:{key}")
        out = []
        for t in times:
            g, u = rng.randrange(self.shape.groups), rng.randrange(self.shape.users)
            out.append(Planned(t, g, u, self.prefixes[g] + self._ids(rng, self.shape.question_len)))
        return out

    def step(self, qps: float, seconds: float, key: str) -> list[Planned]:
        seed = random.Random(f"{self.seed}:arrivals:{key}").randrange(1 << 30)
        return self.requests(fixed_rate(qps, "poisson", seed, duration_s=seconds), key)

    def body(self, model: str, p: Planned, max_tokens: int, stream: bool = True) -> bytes:
        b: dict[str, Any] = {"model": model, "prompt": p.ids, "max_tokens": max_tokens, "temperature": 0.0,
                             "ignore_eos": True, "user": f"g{p.group}-u{p.user}", "stream": stream}
        if stream:
            b["stream_options"] = {"include_usage": True}
        return msgspec.json.encode(b)


# ---- load generator ----------------------------------------------------------------------------
@dataclass(slots=True)
class Rec:
    group: int
    at: float
    ideal_cached: int
    lag: float = 0.0  # dispatch time - planned time
    sent: float = 0.0  # dispatch time from the step's start
    ttft: float | None = None
    end: float = 0.0  # from the step's start
    status: int = 0
    error: str = ""
    replica: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0

    @property
    def ok(self) -> bool:
        return self.status == 200 and not self.error and self.ttft is not None and self.completion_tokens > 0


def _first_content(event: bytes, rec: Rec) -> bool:
    """True once `event` carries content text (or an error, which ends the search)."""
    if not event.startswith(b"data:"):
        return False
    data = event[5:].strip()
    if data == b"[DONE]":
        return False
    obj = msgspec.json.decode(data)
    if "error" in obj:
        rec.error = f"stream error: {str(obj['error'])[:200]}"
        return True
    choices = obj.get("choices") or []
    return bool(choices and choices[0].get("text"))


def _read_tail(buf: bytes, rec: Rec) -> None:
    """The usage (or error) in the stream's last event before [DONE]."""
    for event in reversed(buf.split(b"\n\n")):
        event = event.strip()
        if not event.startswith(b"data:") or event[5:].strip() == b"[DONE]":
            continue
        obj = msgspec.json.decode(event[5:].strip())
        if "error" in obj:
            rec.error = rec.error or f"stream error: {str(obj['error'])[:200]}"
        elif obj.get("usage"):
            u = obj["usage"]
            rec.prompt_tokens = int(u.get("prompt_tokens") or 0)
            rec.completion_tokens = int(u.get("completion_tokens") or 0)
            rec.cached_tokens = int((u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
        else:
            rec.error = rec.error or "no usage in the stream's last event"
        return
    rec.error = rec.error or "empty stream"


async def _one(http: httpx.AsyncClient, url: str, body: bytes, rec: Rec, t0: float, timeout_s: float) -> None:
    start = time.perf_counter()
    rec.sent = start - t0
    try:
        async with asyncio.timeout(timeout_s):
            async with http.stream("POST", url, content=body, headers=HEADERS) as resp:
                rec.status = resp.status_code
                rec.replica = resp.headers.get("x-lockgate-replica", "")
                if resp.status_code != 200:
                    rec.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200].decode(errors='replace')}"
                    return
                parts: list[bytes] = []
                pending = b""
                async for chunk in resp.aiter_bytes():
                    parts.append(chunk)
                    if rec.ttft is None and not rec.error:  # parse only until the first content
                        pending += chunk
                        while (i := pending.find(b"\n\n")) >= 0:
                            event, pending = pending[:i], pending[i + 2:]
                            if _first_content(event, rec):
                                if not rec.error:
                                    rec.ttft = time.perf_counter() - start
                                pending = b""
                                break
        _read_tail(b"".join(parts), rec)
    except TimeoutError:
        rec.error = f"timeout after {timeout_s:g} s"
    except httpx.HTTPError as exc:
        rec.error = f"{type(exc).__name__}: {exc}"[:200]
    except (msgspec.DecodeError, ValueError, TypeError, AttributeError) as exc:
        rec.error = f"bad stream: {type(exc).__name__}: {exc}"[:200]
    finally:
        rec.end = time.perf_counter() - t0


def _client(connections: int, timeout_s: float) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections,
                          keepalive_expiry=KEEPALIVE_S)
    return httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout_s, connect=30), trust_env=False)


async def fire(url: str, items: list[tuple[Planned, bytes, int]], timeout_s: float, connections: int
               ) -> tuple[list[Rec], float]:
    """Open loop: each request at its planned time (one dispatcher, one task per request); all bodies
    are built before. Returns the records and the wall time to the last response."""
    recs = [Rec(p.group, p.at, ideal) for p, _, ideal in items]
    async with _client(connections, timeout_s) as http:
        gc.collect()
        gc.disable()  # no collector pauses in the dispatcher's timing
        try:
            t0 = time.perf_counter() + 0.05
            tasks = []
            for (p, body, _), rec in zip(items, recs):
                target = t0 + p.at
                delay = target - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                rec.lag = time.perf_counter() - target
                tasks.append(asyncio.create_task(_one(http, url, body, rec, t0, timeout_s)))
            await asyncio.gather(*tasks)
            wall = time.perf_counter() - t0
        finally:
            gc.enable()
    return recs, wall


async def warm_up(server: Server, wl: Workload, concurrency: int = 4) -> None:
    """One request per group (max_tokens 1), a few at a time: every prefix cached on some replica."""
    sem = asyncio.Semaphore(concurrency)
    url = f"{server.url}/v1/completions"
    rng = random.Random(f"{wl.seed}:warmup")

    async with _client(64, 300) as http:
        async def one(g: int) -> None:
            p = Planned(0.0, g, 0, wl.prefixes[g] + wl._ids(rng, wl.shape.question_len))
            async with sem:
                r = await http.post(url, content=wl.body(server.model, p, 1, stream=False), headers=HEADERS)
            if r.status_code != 200:
                raise SetupError(f"{server.label}: warm-up request: HTTP {r.status_code} {r.text[:300]}")

        await asyncio.gather(*(one(g) for g in range(wl.shape.groups)))
    server.seen_groups.update(range(wl.shape.groups))


# ---- one step ----------------------------------------------------------------------------------
@dataclass(slots=True)
class Step:
    part: str
    policy: str
    qps: float
    seconds: float
    probe: bool = False
    sent: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    error_samples: list[str] = field(default_factory=list)
    achieved_qps: float = 0.0
    lag_p50_ms: float = 0.0
    lag_p99_ms: float = 0.0
    lag_max_ms: float = 0.0
    ttft_p50: float = math.nan
    ttft_p90: float = math.nan
    ttft_p99: float = math.nan
    out_tok_s: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    ideal_cached: int = 0
    hit_usage: float = math.nan
    hit_metrics: float = math.nan
    ideal: float = math.nan
    of_ideal: float = math.nan
    affinity: float = math.nan
    replica_share: dict[str, float] = field(default_factory=dict)
    server_cpu_pct: float = 0.0  # the server's processes, % of the machine
    gen_cpu_pct: float = 0.0  # this load generator, % of the machine
    wall_s: float = 0.0
    gen_behind: bool = False  # the load generator did not keep up: not a measurement of the server

    @property
    def valid(self) -> bool:
        return not self.gen_behind


def _ideal(server: Server, p: Planned, shape: Shape, block_size: int) -> int:
    """Prompt tokens cached in the ideal: the whole shared prefix (its full blocks) if its group was
    served before on this server; one prompt token is always computed."""
    if p.group not in server.seen_groups:
        server.seen_groups.add(p.group)
        return 0
    return min(shape.prefix_len // block_size * block_size, len(p.ids) - 1)


def summarize(step: Step, recs: list[Rec], wall: float, hits: float, queries: float, ncpu: int,
              server_cpu: float, gen_cpu: float) -> Step:
    step.sent = len(recs)
    ok = [r for r in recs if r.ok]
    step.ok = len(ok)
    step.errors = dict(Counter(r.error.split(":")[0] if r.error else f"HTTP {r.status}"
                               for r in recs if not r.ok))
    step.error_samples = sorted({r.error or f"HTTP {r.status}" for r in recs if not r.ok})[:5]
    if len(recs) > 1:
        span_plan = recs[-1].at - recs[0].at
        span_sent = max(r.sent for r in recs) - min(r.sent for r in recs)
        step.achieved_qps = step.qps * span_plan / span_sent if span_sent > 0 else math.nan
    lags = [r.lag * 1000 for r in recs]
    step.lag_p50_ms, step.lag_p99_ms = percentile(lags, 50, empty=0.0), percentile(lags, 99, empty=0.0)
    step.lag_max_ms = max(lags, default=0.0)
    ttfts = [r.ttft if r.ok and r.ttft is not None else math.inf for r in recs]
    step.ttft_p50, step.ttft_p90, step.ttft_p99 = (percentile(ttfts, q, empty=math.nan) for q in (50, 90, 99))
    step.wall_s = wall
    step.out_tok_s = sum(r.completion_tokens for r in ok) / wall if wall > 0 else 0.0
    step.prompt_tokens = sum(r.prompt_tokens for r in ok)
    step.cached_tokens = sum(r.cached_tokens for r in ok)
    step.ideal_cached = sum(r.ideal_cached for r in ok)
    if step.prompt_tokens:
        step.hit_usage = step.cached_tokens / step.prompt_tokens
        step.ideal = step.ideal_cached / step.prompt_tokens
        step.of_ideal = step.cached_tokens / step.ideal_cached if step.ideal_cached else math.nan
    step.hit_metrics = hits / queries if queries > 0 else math.nan
    by_group: dict[int, Counter[str]] = defaultdict(Counter)
    reps: Counter[str] = Counter()
    for r in recs:
        if r.replica:
            idx = r.replica.rsplit("/", 1)[-1]
            by_group[r.group][idx] += 1
            reps[idx] += 1
    total = sum(reps.values())
    if total:
        step.affinity = sum(max(c.values()) for c in by_group.values()) / total
        step.replica_share = {k: round(v / total, 4) for k, v in sorted(reps.items())}
    step.server_cpu_pct = 100 * server_cpu / (wall * ncpu) if wall > 0 else 0.0
    step.gen_cpu_pct = 100 * gen_cpu / (wall * ncpu) if wall > 0 else 0.0
    step.gen_behind = not (step.achieved_qps >= GEN_MIN_ACHIEVED * step.qps and step.lag_p99_ms <= GEN_MAX_LAG_P99_MS)
    return step


def _self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def run_step(part: Part, server: Server, wl: Workload, plan: list[Planned], qps: float, seconds: float,
                   policy: str, args: argparse.Namespace, probe: bool = False) -> Step:
    bs = part.fleet.block_size
    items = [(p, wl.body(server.model, p, part.shape.output_len), _ideal(server, p, part.shape, bs)) for p in plan]
    h0, q0 = server.prefix_counters()
    c0, g0 = server.cpu_seconds(), _self_cpu()
    recs, wall = await fire(f"{server.url}/v1/completions", items, args.request_timeout, args.connections)
    c1, g1 = server.cpu_seconds(), _self_cpu()
    await asyncio.sleep(SETTLE_S)
    h1, q1 = server.prefix_counters()
    step = summarize(Step(part.name, policy, qps, seconds, probe), recs, wall, h1 - h0, q1 - q0,
                     os.cpu_count() or 1, c1 - c0, g1 - g0)
    errs = f", errors {step.errors}" if step.errors else ""
    behind = "  [the load generator fell behind]" if step.gen_behind else ""
    print(f"  [{part.name}] {qps:g} req/s {SHORT[policy]}{' (probe)' if probe else ''}: {step.sent} sent, "
          f"TTFT p50 {_s(step.ttft_p50)} p90 {_s(step.ttft_p90)} s, {step.out_tok_s:.0f} tok/s, "
          f"hit {_pct(step.hit_usage)} ({_pct(step.of_ideal)} of ideal), affinity {_pct(step.affinity)}, "
          f"achieved {step.achieved_qps:.2f} req/s, lag p99 {step.lag_p99_ms:.1f} ms, "
          f"cpu {step.server_cpu_pct:.0f}%+{step.gen_cpu_pct:.0f}% ({wall:.0f} s){errs}{behind}", flush=True)
    return step


def step_seconds(part: Part, qps: float) -> float:
    return max(part.min_step_seconds, part.step_requests / qps)


async def ladder(part: Part, servers: dict[str, Server], wl: Workload, args: argparse.Namespace) -> list[Step]:
    """Every policy through the rates in turn, on the same arrivals; each stops after its TTFT p90
    passes STOP_P90_S."""
    steps: list[Step] = []
    active = list(part.policies)
    for k, qps in enumerate(part.qps):
        if not active:
            break
        seconds = step_seconds(part, qps)
        plan = wl.step(qps, seconds, f"{part.name}:step:{qps:g}")
        order = active[k % len(active):] + active[:k % len(active)]  # rotate: no policy always first
        for policy in order:
            step = await run_step(part, servers[policy], wl, plan, qps, seconds, policy, args)
            steps.append(step)
            if step.gen_behind:
                active.remove(policy)
                print(f"  [{part.name}] {SHORT[policy]} stops: the load generator could not offer {qps:g} req/s "
                      f"(achieved {step.achieved_qps:.1f}, dispatch lag p99 {step.lag_p99_ms:.0f} ms); this step "
                      f"does not count", flush=True)
            elif not step.ttft_p90 <= STOP_P90_S:
                active.remove(policy)
                print(f"  [{part.name}] {SHORT[policy]} stops: TTFT p90 {_s(step.ttft_p90)} s > {STOP_P90_S:g} s",
                      flush=True)
    return steps


def best_good_step(steps: list[Step], policy: str) -> Step | None:
    good = [s for s in steps if s.policy == policy and not s.probe and s.valid and s.ttft_p90 < GOOD_P90_S]
    return max(good, key=lambda s: s.qps) if good else None


async def probe_peers(part: Part, servers: dict[str, Server], wl: Workload, steps: list[Step],
                      args: argparse.Namespace) -> list[Step]:
    """The peers at kv's highest good rate, where they stopped stepping below it."""
    star = best_good_step(steps, "kv")
    if star is None:
        return []
    out = []
    plan = wl.step(star.qps, star.seconds, f"{part.name}:step:{star.qps:g}")
    for policy in part.policies:
        if policy == "kv" or any(s.policy == policy and s.qps == star.qps and s.valid for s in steps):
            continue
        out.append(await run_step(part, servers[policy], wl, plan, star.qps, star.seconds, policy, args, probe=True))
    return out


# ---- the router's own cost --------------------------------------------------------------------
def router_in_process(wl: Workload, fleet: FleetSpec, sizing: dict[str, Any], n: int, seed: int,
                      in_flight: int = 32) -> dict[str, Any]:
    """hash + route + a ticket's start and end per request, with each group's prefix in one replica's
    index and the rest of each replica's KV blocks as other blocks (what a full cache reports)."""
    bs, reps = fleet.block_size, fleet.replicas
    rng = random.Random(f"{seed}:router")
    router = Router(RouterConfig(block_size=bs), rng=random.Random(seed))
    for i in range(reps):
        router.add_replica(i, routable=True)
    home = {g: g % reps for g in range(wl.shape.groups)}
    stored = Counter[int]()
    for g, prefix in enumerate(wl.prefixes):
        hashes = prompt_block_hashes(prefix + [0], bs, None)
        router.blocks_stored(home[g], hashes)
        stored[home[g]] += len(hashes)
    for i in range(reps):
        router.blocks_stored(i, [rng.randbytes(16) for _ in range(max(0, sizing["blocks_per_replica"] - stored[i]))])
    warm = 200
    plan = wl.requests([0.0] * (n + warm), "router")
    window: deque[Any] = deque()
    total, hashing, routing = [], [], []
    to_home = prefix_reason = 0
    clock = time.perf_counter_ns
    for k, p in enumerate(plan):
        t0 = clock()
        hashes = prompt_block_hashes(p.ids, bs, None)
        t1 = clock()
        decision, ticket = router.route(hashes, len(p.ids))
        window.append(ticket)
        if len(window) > in_flight // 2:
            window[-(in_flight // 2) - 1].started()
        if len(window) > in_flight:
            window.popleft().end()
        t2 = clock()
        if k >= warm:
            total.append((t2 - t0) / 1e6)
            hashing.append((t1 - t0) / 1e6)
            routing.append((t2 - t1) / 1e6)
            to_home += decision.replica == home[p.group]
            prefix_reason += decision.reason == "prefix"
    return {"requests": n, "prompt_tokens": wl.shape.prompt_len, "replicas": reps, "in_flight": in_flight,
            "index_blocks_per_replica": sizing["blocks_per_replica"],
            "p50_ms": percentile(total, 50), "p99_ms": percentile(total, 99),
            "hash_p50_ms": percentile(hashing, 50), "route_p50_ms": percentile(routing, 50),
            "route_p99_ms": percentile(routing, 99),
            "to_group_replica": to_home / n, "reason_prefix": prefix_reason / n}


async def router_end_to_end(four: Server, one: Server, n: int, prompt_len: int, seed: int) -> dict[str, Any]:
    """The same lone request (short prompt, max_tokens 1, not streamed), one at a time, alternating."""
    rng = random.Random(f"{seed}:lone")
    ids = [rng.randrange(TOKEN_LO, TOKEN_HI) for _ in range(prompt_len)]
    lat: dict[str, list[float]] = {four.label: [], one.label: []}
    async with _client(4, 60) as http:
        for k in range(n + 10):
            pair = (four, one) if k % 2 == 0 else (one, four)
            for s in pair:
                body = msgspec.json.encode({"model": s.model, "prompt": ids, "max_tokens": 1, "temperature": 0.0})
                t = time.perf_counter()
                r = await http.post(f"{s.url}/v1/completions", content=body, headers=HEADERS)
                dt = (time.perf_counter() - t) * 1000
                if r.status_code != 200:
                    raise SetupError(f"{s.label}: lone request: HTTP {r.status_code} {r.text[:300]}")
                if k >= 10:
                    lat[s.label].append(dt)
    a, b = lat[four.label], lat[one.label]
    return {"requests_each": n, "prompt_tokens": prompt_len,
            "replicas4_p50_ms": percentile(a, 50), "replicas4_p90_ms": percentile(a, 90),
            "replicas1_p50_ms": percentile(b, 50), "replicas1_p90_ms": percentile(b, 90),
            "p50_diff_ms": percentile(a, 50) - percentile(b, 50)}


# ---- formatting --------------------------------------------------------------------------------
def _s(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return "inf" if math.isinf(v) else f"{v:.3f}"


def _pct(v: float) -> str:
    return "-" if v is None or math.isnan(v) else f"{100 * v:.0f}%"


def _x(v: float) -> str:
    if v is None or math.isnan(v):
        return "-"
    return "inf" if math.isinf(v) else f"{v:.1f}x"


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def steps_table(steps: list[Step]) -> str:
    rows = []
    for s in sorted(steps, key=lambda s: (s.qps, POLICIES.index(s.policy))):
        share = " ".join(f"{v:.2f}" for v in s.replica_share.values())
        rows.append([f"{s.qps:g}", SHORT[s.policy] + (" (probe)" if s.probe else ""), s.sent, s.ok,
                     f"{s.achieved_qps:.2f}", f"{s.lag_p99_ms:.1f}", _s(s.ttft_p50), _s(s.ttft_p90),
                     f"{s.out_tok_s:.0f}", _pct(s.hit_usage), _pct(s.hit_metrics), _pct(s.ideal), _pct(s.of_ideal),
                     _pct(s.affinity), share, f"{s.server_cpu_pct:.0f}+{s.gen_cpu_pct:.0f}",
                     "no" if s.gen_behind else "yes"])
    return md_table(["req/s", "policy", "sent", "ok", "achieved req/s", "lag p99 ms", "TTFT p50 s", "TTFT p90 s",
                     "out tok/s", "hit (usage)", "hit (metrics)", "ideal", "of ideal", "group affinity",
                     "replica shares", "cpu % server+gen", "generator kept up"], rows)


def pivot_table(steps: list[Step], policies: tuple[str, ...]) -> str:
    """TTFT p90 and throughput per rate, side by side, with the peers' ratios to kv."""
    by = {(s.qps, s.policy): s for s in steps}
    rows = []
    for q in sorted({s.qps for s in steps}):
        kv = by.get((q, "kv"))
        row = [f"{q:g}"]
        for p in policies:
            s = by.get((q, p))
            row.append((_s(s.ttft_p90) + ("*" if s.gen_behind else "")) if s else "-")
        for p in policies[1:]:
            s = by.get((q, p))
            row.append(_x(s.ttft_p90 / kv.ttft_p90) if s and kv and kv.ttft_p90 > 0 else "-")
        for p in policies:
            s = by.get((q, p))
            row.append(f"{s.out_tok_s:.0f}" if s else "-")
        rows.append(row)
    heads = (["req/s"] + [f"{SHORT[p]} TTFT p90 s" for p in policies] + [f"{SHORT[p]}/kv p90" for p in policies[1:]]
             + [f"{SHORT[p]} tok/s" for p in policies])
    return md_table(heads, rows)


# ---- targets -----------------------------------------------------------------------------------
def evaluate(steps: list[Step], router: dict[str, Any] | None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    star = best_good_step(steps, "kv")
    if star is None:
        out.append({"target": f"RR TTFT p90 >= {TARGET_TTFT_RATIO:g}x kv's at kv's highest rate with p90 < 1 s",
                    "measured": "kv has no step with TTFT p90 < 1 s", "ratio": None, "pass": False})
    else:
        rr = next((s for s in steps if s.policy == "round_robin" and s.qps == star.qps and s.valid), None)
        if rr is None:
            ratio, text = math.nan, f"at {star.qps:g} req/s: kv {_s(star.ttft_p90)} s, rr not measured"
        else:
            ratio = rr.ttft_p90 / star.ttft_p90 if star.ttft_p90 > 0 else math.inf
            text = f"at {star.qps:g} req/s: rr {_s(rr.ttft_p90)} s / kv {_s(star.ttft_p90)} s"
        out.append({"target": f"RR TTFT p90 >= {TARGET_TTFT_RATIO:g}x kv's at kv's highest rate with p90 < 1 s",
                    "measured": text, "ratio": ratio, "pass": ratio >= TARGET_TTFT_RATIO})
    kv_best = best_good_step(steps, "kv")
    rr_best = best_good_step(steps, "round_robin")
    def best_tp(policy: str) -> float:
        return max((s.out_tok_s for s in steps if s.policy == policy and s.valid and s.ttft_p90 < GOOD_P90_S),
                   default=0.0)

    kv_tp, rr_tp = best_tp("kv"), best_tp("round_robin")
    # kv never passed 1 s: its limit lies beyond the highest rate measured (or the generator's)
    kv_open = kv_best is not None and not any(s.policy == "kv" and s.valid and s.qps > kv_best.qps for s in steps)
    ratio = kv_tp / rr_tp if rr_tp > 0 else (math.inf if kv_tp > 0 else math.nan)
    measured = (f"kv {kv_tp:.0f} tok/s ({kv_best.qps:g} req/s) / rr {rr_tp:.0f} tok/s ({rr_best.qps:g} req/s)"
                if kv_best and rr_best else f"kv {kv_tp:.0f} tok/s / rr {rr_tp:.0f} tok/s")
    if kv_open:
        measured += " (a lower bound: kv was under 1 s at every rate measured)"
    out.append({"target": f"kv's best tok/s with TTFT p90 < 1 s >= {TARGET_THROUGHPUT_RATIO:g}x RR's",
                "measured": measured, "ratio": ratio, "pass": ratio >= TARGET_THROUGHPUT_RATIO})
    kv_steps = [s for s in steps if s.policy == "kv" and not s.probe and s.valid]
    cached, ideal = sum(s.cached_tokens for s in kv_steps), sum(s.ideal_cached for s in kv_steps)
    share = cached / ideal if ideal else math.nan
    out.append({"target": f"kv's prefix-cache hit rate >= {TARGET_HIT_OF_IDEAL:.0%} of the ideal (all its steps)",
                "measured": f"{cached} of {ideal} ideal cached prompt tokens", "ratio": share,
                "pass": share >= TARGET_HIT_OF_IDEAL})
    if router is not None:
        p50 = router["in_process"]["p50_ms"]
        e2e = router.get("end_to_end")
        extra = f"; end to end 4 vs 1 replica p50 {e2e['p50_diff_ms']:+.2f} ms" if e2e else ""
        out.append({"target": f"router adds <= {TARGET_ROUTER_P50_MS:g} ms p50 (in process)",
                    "measured": f"p50 {p50:.3f} ms, p99 {router['in_process']['p99_ms']:.3f} ms{extra}",
                    "ratio": p50 / TARGET_ROUTER_P50_MS, "pass": p50 <= TARGET_ROUTER_P50_MS})
    return out


def targets_table(targets: list[dict[str, Any]]) -> str:
    rows = []
    for t in targets:
        r = t["ratio"]
        ratio = "-" if r is None or (isinstance(r, float) and math.isnan(r)) else (
            "inf" if math.isinf(r) else f"{r:.2f}")
        rows.append([t["target"], t["measured"], ratio, "PASS" if t["pass"] else "FAIL"])
    return md_table(["target", "measured", "ratio", "verdict"], rows)


# ---- machine and report -----------------------------------------------------------------------
def machine() -> dict[str, Any]:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 0
    return {"cpu": model, "cores": os.cpu_count(), "usable_cores": usable, "python": sys.version.split()[0],
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def sizing_lines(part: Part) -> str:
    s = kv_sizing(part.shape, part.fleet)
    sh = part.shape
    warn = "" if not s["one_replica_holds_all"] else "  (WARNING: one replica can hold every prefix)"
    return (f"{sh.groups} groups x {sh.prefix_len}-token prefixes = {s['prefix_blocks_all_groups']} blocks of "
            f"{s['block_size']} tokens; per replica: a prefix pool of {s['pool_per_replica']} blocks (all prefixes = "
            f"{s['prefixes_share_of_pool']:.0%} of the fleet's pools) + room {s['room_per_replica']} blocks "
            f"({part.fleet.max_num_seqs} requests x {s['room_blocks_per_request']} blocks of question and output) = "
            f"{s['blocks_per_replica']} blocks; fleet {s['fleet_blocks']} blocks (prefixes = "
            f"{s['prefixes_share_of_fleet']:.0%}); one replica holds at most {s['prefixes_one_replica_holds']} of "
            f"{sh.groups} prefixes{warn}")


def part_settings(part: Part) -> dict[str, Any]:
    return {"shape": asdict(part.shape), "fleet": asdict(part.fleet), "policies": list(part.policies),
            "qps": list(part.qps), "step_requests": part.step_requests, "min_step_seconds": part.min_step_seconds,
            "kv_sizing": kv_sizing(part.shape, part.fleet), "max_model_len": max_model_len(part.shape)}


def write_report(out: Path, result: dict[str, Any], md: str) -> None:
    out.mkdir(parents=True, exist_ok=True)

    def clean(o: Any) -> Any:  # JSON has no inf/nan
        if isinstance(o, float) and not math.isfinite(o):
            return None if math.isnan(o) else ("inf" if o > 0 else "-inf")
        if isinstance(o, dict):
            return {k: clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        return o

    (out / "result.json").write_text(json.dumps(clean(result), indent=1))
    (out / "report.md").write_text(md)


# ---- parts ---------------------------------------------------------------------------------------
def fake_part(args: argparse.Namespace) -> Part:
    if args.quick:
        shape, seqs, qps, req, mins = Shape(12, 2048, 6, 128, 16), 32, (8.0, 24.0), 40, 4.0
    else:
        shape, seqs, qps, req, mins = Shape(48, 2048, 6, 128, 64), 64, args.qps, args.step_requests, \
            args.min_step_seconds
    fleet = FleetSpec(replicas=4, max_num_seqs=seqs, fake=(args.fake_step_delay, args.fake_token_delay))
    return Part("fake", shape, fleet, POLICIES, tuple(qps), req, mins)


def real_part(args: argparse.Namespace) -> Part:
    extra = ("--quantization", "int4", "--num-threads", "1")
    if args.quick:
        shape, seqs, qps, req, mins = Shape(8, 128, 6, 16, 4), 4, (1.0,), 6, 6.0
    else:
        shape, seqs, qps, req, mins = Shape(12, 256, 6, 32, 8), 8, args.real_qps, 30, 15.0
    return Part("real", shape, FleetSpec(replicas=2, max_num_seqs=seqs, fake=None, extra=extra),
                ("kv", "round_robin"), tuple(qps), req, mins)


async def run_fake(part: Part, args: argparse.Namespace, work: Path, classes: Path, result: dict[str, Any]
                   ) -> list[Step]:
    wl = Workload(part.shape, args.seed)
    sizing = kv_sizing(part.shape, part.fleet)
    n_router = 300 if args.quick else args.router_requests
    print(f"\n[fake] router in process: {n_router} of the workload's prompts ...", flush=True)
    inproc = router_in_process(wl, part.fleet, sizing, n_router, args.seed)
    result["router"] = {"in_process": inproc}
    print(f"  p50 {inproc['p50_ms']:.3f} ms, p99 {inproc['p99_ms']:.3f} ms (hashing p50 "
          f"{inproc['hash_p50_ms']:.3f} ms, route p50 {inproc['route_p50_ms']:.3f} ms); routed to the group's "
          f"replica {inproc['to_group_replica']:.0%}", flush=True)
    specs = [(p, server_args(part, p, part.fleet.replicas, classes), part.fleet.replicas) for p in part.policies]
    specs.append(("single", server_args(part, "kv", 1, classes), 1))
    print(f"[fake] starting {len(specs)} servers ...", flush=True)
    t = time.monotonic()
    servers = start_servers(specs, work / "fake", args.startup_timeout)
    result["commands"]["fake"] = {label: s.command() for label, s in servers.items()}
    print(f"  ready in {time.monotonic() - t:.0f} s", flush=True)
    try:
        n_lone = 30 if args.quick else args.lone_requests
        e2e = await router_end_to_end(servers["kv"], servers["single"], n_lone, 32, args.seed)
        result["router"]["end_to_end"] = e2e
        print(f"  lone request p50: 4 replicas {e2e['replicas4_p50_ms']:.2f} ms, 1 replica "
              f"{e2e['replicas1_p50_ms']:.2f} ms: {e2e['p50_diff_ms']:+.2f} ms", flush=True)
        servers.pop("single").stop()
        print("[fake] warm-up: one request per group on each server ...", flush=True)
        await asyncio.gather(*(warm_up(s, wl) for s in servers.values()))
        print("[fake] steps ...", flush=True)
        steps = await ladder(part, servers, wl, args)
        if not args.no_probe:
            steps += await probe_peers(part, servers, wl, steps, args)
    finally:
        for s in servers.values():
            s.stop()
    return steps


async def run_real(part: Part, args: argparse.Namespace, work: Path, classes: Path, result: dict[str, Any]
                   ) -> list[Step]:
    wl = Workload(part.shape, args.seed)
    specs = [(p, server_args(part, p, part.fleet.replicas, classes), part.fleet.replicas) for p in part.policies]
    print(f"\n[real] starting {len(specs)} servers (the embedded model) ...", flush=True)
    t = time.monotonic()
    servers = start_servers(specs, work / "real", args.startup_timeout)
    result["commands"]["real"] = {label: s.command() for label, s in servers.items()}
    print(f"  ready in {time.monotonic() - t:.0f} s", flush=True)
    try:
        print("[real] warm-up: one request per group on each server ...", flush=True)
        for s in servers.values():  # one at a time: each has the 2 cores to itself
            await warm_up(s, wl, concurrency=2)
        print("[real] steps ...", flush=True)
        steps = await ladder(part, servers, wl, args)
    finally:
        for s in servers.values():
            s.stop()
    return steps


def floats(text: str) -> tuple[float, ...]:
    try:
        out = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not out or any(not (x > 0 and math.isfinite(x)) for x in out):
        raise argparse.ArgumentTypeError(f"rates must be > 0, got {text!r}")
    return tuple(sorted(out))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a short smoke run with small shapes")
    ap.add_argument("--skip-real", action="store_true", help="skip the real model part")
    ap.add_argument("--skip-fake", action="store_true", help="skip the fake part (and the targets)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where result.json and report.md go")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--qps", type=floats, default=floats("4,5,6.4,8,10,12.5,16,20,25,32,40,50,64,80"),
                    help="fake part: the rates stepped through (req/s)")
    ap.add_argument("--step-requests", type=int, default=200, help="fake part: a step lasts this many requests...")
    ap.add_argument("--min-step-seconds", type=float, default=8.0, help="...or at least this long")
    ap.add_argument("--real-qps", type=floats, default=floats("0.5,1,2,3,4"), help="real part: the rates (req/s)")
    ap.add_argument("--fake-step-delay", type=float, default=0.01, help="fake engine: seconds per step")
    ap.add_argument("--fake-token-delay", type=float, default=0.0002, help="fake engine: seconds per token computed")
    ap.add_argument("--router-requests", type=int, default=2000, help="in-process router timings")
    ap.add_argument("--lone-requests", type=int, default=100, help="end-to-end lone requests per server")
    ap.add_argument("--no-probe", action="store_true",
                    help="do not run the peers at kv's highest good rate when they stopped below it")
    ap.add_argument("--connections", type=int, default=2048, help="the load generator's connection limit")
    ap.add_argument("--request-timeout", type=float, default=300.0, help="seconds; a slower request fails")
    ap.add_argument("--startup-timeout", type=float, default=600.0)
    args = ap.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, args.connections * 2 + 256))
    if want > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    mach = machine()
    started = datetime.now(timezone.utc)
    parts = []
    if not args.skip_fake:
        parts.append(fake_part(args))
    if not args.skip_real:
        parts.append(real_part(args))
    result: dict[str, Any] = {
        "benchmark": "fleet_routing", "started": started.isoformat(timespec="seconds"), "machine": mach,
        "quick": args.quick, "seed": args.seed,
        "command": ".venv/bin/python benchmarks/fleet_routing.py " + shlex.join(sys.argv[1:]),
        "settings": {p.name: part_settings(p) for p in parts}, "commands": {},
        "fake": {}, "real": {},
    }
    print(f"fleet routing benchmark: {mach['cpu']}, {mach['cores']} cores{' (quick)' if args.quick else ''}")
    for p in parts:
        f = p.fleet
        cost = f"fake engine {f.fake[0]:g} s/step + {f.fake[1]:g} s/token" if f.fake else \
            "the embedded model " + " ".join(f.extra)
        print(f"[{p.name}] {f.replicas} replicas, {cost}, max-num-seqs {f.max_num_seqs}, max-prefill-tokens "
              f"{f.max_prefill_tokens}; {p.shape.groups} groups x {p.shape.users} users, prefix {p.shape.prefix_len}"
              f" + question {p.shape.question_len} tokens, {p.shape.output_len} output tokens; rates "
              f"{', '.join(f'{q:g}' for q in p.qps)} req/s\n  KV: {sizing_lines(p)}", flush=True)

    work = Path(tempfile.mkdtemp(prefix="fleet-routing-"))
    args.out.mkdir(parents=True, exist_ok=True)
    classes = class_config(args.out / "classes.json")
    fake_steps: list[Step] = []
    real_steps: list[Step] = []
    error = None
    t_start = time.monotonic()
    try:
        for p in parts:
            t = time.monotonic()
            if p.name == "fake":
                fake_steps = asyncio.run(run_fake(p, args, work, classes, result))
            else:
                real_steps = asyncio.run(run_real(p, args, work, classes, result))
            result[p.name]["seconds"] = round(time.monotonic() - t, 1)
    except KeyboardInterrupt:
        error = "interrupted"
    except Exception as exc:  # noqa: BLE001 - reported with the logs' place, then exit 2
        error = f"{type(exc).__name__}: {exc}"
        traceback.print_exc()
    result["seconds"] = round(time.monotonic() - t_start, 1)
    result["fake"]["steps"] = [asdict(s) for s in fake_steps]
    result["real"]["steps"] = [asdict(s) for s in real_steps]

    md = ["# Fleet routing: kv vs round robin vs least loaded\n",
          f"{started:%Y-%m-%d %H:%M} UTC; {mach['cpu']}, {mach['cores']} cores ({mach['usable_cores']} usable), "
          f"{mach['memory_gb']} GiB; {'quick run; ' if args.quick else ''}{result['seconds']:.0f} s.\n",
          f"Reproduce: `{result['command']}`\n"]
    targets: list[dict[str, Any]] = []
    for p in parts:
        steps = fake_steps if p.name == "fake" else real_steps
        f = p.fleet
        md.append(f"## {p.name.capitalize()} part\n")
        md.append(f"{f.replicas} replicas per server; " + (f"fake engine: {f.fake[0]:g} s per step + {f.fake[1]:g} s "
                                                            f"per computed token" if f.fake else
                                                            "the embedded model, " + " ".join(f.extra)) +
                  f". Workload: {p.shape.groups} groups x {p.shape.users} users, {p.shape.prefix_len}-token shared "
                  f"prefix + {p.shape.question_len}-token question, {p.shape.output_len} output tokens, Poisson "
                  f"arrivals. KV: {sizing_lines(p)}.\n")
        if steps:
            md.append("TTFT p90 and output throughput per rate (a missing cell: that policy had stopped; probe: "
                      "run once at kv's highest rate with p90 < 1 s; *: the load generator fell behind, the step "
                      "does not count):\n")
            md.append(pivot_table(steps, p.policies) + "\n")
            md.append("Every step (hit = cached prompt tokens / prompt tokens; ideal: every shared prefix token a "
                      "hit after its group's first request; group affinity: share of a group's requests on its most "
                      "used replica; cpu: the server's processes + this load generator, % of the machine):\n")
            md.append(steps_table(steps) + "\n")
        cmds = result["commands"].get(p.name, {})
        if cmds:
            md.append("Servers:\n\n" + "\n".join(f"- {k}: `{v}`" for k, v in cmds.items()) + "\n")
    if fake_steps or "router" in result:
        router = result.get("router")
        if router:
            ip = router["in_process"]
            md.append("## The router's own cost\n")
            rows = [["in process: hash + route + ticket", ip["requests"], f"{ip['p50_ms']:.3f}", f"{ip['p99_ms']:.3f}",
                     f"hashing p50 {ip['hash_p50_ms']:.3f} ms, route p50 {ip['route_p50_ms']:.3f} ms, "
                     f"{ip['prompt_tokens']}-token prompts, {ip['replicas']} replicas x "
                     f"{ip['index_blocks_per_replica']} indexed blocks, {ip['in_flight']} in flight; "
                     f"{ip['to_group_replica']:.0%} to the group's replica"]]
            if "end_to_end" in router:
                e = router["end_to_end"]
                rows.append(["end to end: 4 replicas - 1 replica", e["requests_each"], f"{e['p50_diff_ms']:+.3f}", "-",
                             f"p50 {e['replicas4_p50_ms']:.2f} vs {e['replicas1_p50_ms']:.2f} ms "
                             f"(p90 {e['replicas4_p90_ms']:.2f} vs {e['replicas1_p90_ms']:.2f}); "
                             f"{e['prompt_tokens']}-token prompt, max_tokens 1, one at a time"])
            md.append(md_table(["measure", "requests", "p50 ms", "p99 ms", "notes"], rows) + "\n")
        if fake_steps:
            targets = evaluate(fake_steps, router)
            result["targets"] = targets
            md.append("## Targets (fake part)" + (" -- partial run, see the error below" if error else "") + "\n")
            md.append(targets_table(targets) + "\n")
    if error:
        md.append(f"## Error\n\n{error}\n\nServer logs: {work}\n")
        result["error"] = error
    report = "\n".join(md)
    print("\n" + report)
    write_report(args.out, result, report)
    print(f"wrote {args.out / 'result.json'} and {args.out / 'report.md'}")
    if error:
        print(f"FAILED: {error} (server logs kept in {work})", file=sys.stderr)
        return 2
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
