"""SLO-aware scheduling vs plain FCFS: a multi-tenant, multi-class mix at 1x and 2x capacity, one run.

    .venv/bin/python benchmarks/slo_mix.py [--engine fake|model] [--seconds 60] [--loads 1,2]
                                           [--json out.json]

Two configurations of the real server (`python -m lockgate.server`, keyed mode, a
fresh data dir each), measured in turn on the same seeded arrival stream:
- slo:  `--scheduling-policy priority` (classes first, fair share between tenants,
        preemption, aging) with SLO admission (429 `slo_unattainable`, lowest class first);
- fcfs: `--scheduling-policy fcfs --no-slo-admission` and queue bounds (overall and
        per class) far above the load: plain arrival order, nothing refused.
Four tenants, each with a key: `chat` (interactive, 20% of requests), `app`
(standard, 25%), `flood` (standard, 25%: a noisy neighbour of `app`), `etl`
(batch, 30%). Classes and targets are the server's defaults (gateway/classes.py).

Capacity is measured first, on the fcfs server, by a closed loop that keeps the
engine full (completed requests per second); the loads are multiples of it
(Poisson arrivals). Each (config, load) phase runs `--seconds`, after a short
warm-up at 0.5x that is not counted (a server that has measured nothing has no
basis to refuse anything).

Engines: `fake` (default) is the server with no model and a known cost per step
and per token (`--fake-step-delay 0.02 --fake-token-delay 0.0001`, about what a
small model costs on a GPU); `model` is the embedded SmolLM2-135M on this CPU.

Per config, load, class and tenant: requests, completed, rejected, TTFT and TPOT
p50/p95/p99 (admitted requests), goodput (requests that completed within their
class's TTFT and TPOT targets, per second of the phase). Targets (issue 8):
goodput at 2x >= 2x FCFS's, and interactive TTFT p99 within its target.
Exit status: 0 PASS, 1 FAIL, 2 setup failed.
"""
from __future__ import annotations

import argparse
from collections import Counter
import asyncio
import json
import math
import random
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from lockgate.bench.client import Target, send
from lockgate.bench.procs import ServerProcess
from lockgate.bench.record import OK, REJECTED, RequestRecord
from lockgate.bench.stats import dist
from lockgate.bench.tenants import Tenant
from lockgate.bench.workload import RequestSpec, sample_len, words
from lockgate.gateway.classes import DEFAULT_CLASSES, PriorityClass

ADMIN = "slo-mix-admin"
MODEL = "SmolLM2-135M-Instruct"
CLASSES = {c.name: c for c in DEFAULT_CLASSES}


@dataclass(frozen=True, slots=True)
class TenantSpec:
    name: str
    cls: str
    share: float


TENANTS = (TenantSpec("chat", "interactive", 0.20), TenantSpec("app", "standard", 0.25),
           TenantSpec("flood", "standard", 0.25), TenantSpec("etl", "batch", 0.30))
# Prompt and output lengths (lognormal means) per class: chat is short, batch long.
LENGTHS = {"interactive": (120, 48), "standard": (300, 64), "batch": (600, 96)}
MAX_PROMPT = 3000  # the lognormal tail, clipped so prompt + output fits --max-model-len 4096

CONFIGS = {
    "slo": ["--scheduling-policy", "priority"],
    "fcfs": ["--scheduling-policy", "fcfs", "--no-slo-admission", "--max-queued-requests", "100000",
             "--max-queued-tokens", "100000000"],
}
ENGINES = {
    "fake": ["--load-format", "fake", "--fake-step-delay", "0.02", "--fake-token-delay", "0.0001",
             "--max-num-seqs", "32", "--max-prefill-tokens", "512", "--max-num-batched-tokens", "1024"],
    "model": ["--max-num-seqs", "16", "--max-prefill-tokens", "256", "--max-num-batched-tokens", "512",
              "--num-threads", "2"],
}


def start_server(args: list[str], log: Path, data_dir: Path) -> ServerProcess:
    """A keyed server of `args`; returns once /health answers."""
    return ServerProcess(["--admin-key", ADMIN, "--data-dir", str(data_dir), "--max-model-len", "4096", *args],
                         log, timeout=600)


def tenant_keys(url: str) -> dict[str, str]:
    """One tenant and inference key per TenantSpec."""
    h = {"Authorization": f"Bearer {ADMIN}"}
    out = {}
    for t in TENANTS:
        r = httpx.post(f"{url}/admin/tenants", json={"name": t.name, "priority": t.cls}, headers=h, timeout=30)
        r.raise_for_status()
        k = httpx.post(f"{url}/admin/tenants/{r.json()['id']}/keys", json={"name": "bench"}, headers=h, timeout=30)
        k.raise_for_status()
        out[t.name] = k.json()["key"]
    return out


@dataclass(slots=True)
class Planned:
    at_s: float
    tenant: TenantSpec
    prompt: str
    max_tokens: int


def plan(rate: float, seconds: float, seed: int) -> list[Planned]:
    rng = random.Random(seed)
    out: list[Planned] = []
    t = 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= seconds:
            return out
        ten = rng.choices(TENANTS, weights=[x.share for x in TENANTS])[0]
        p_len, o_len = LENGTHS[ten.cls]
        out.append(Planned(t, ten, words(min(MAX_PROMPT, sample_len(p_len, "lognormal", rng)), rng),
                           sample_len(o_len, "lognormal", rng)))


async def run_phase(url: str, keys: dict[str, str], planned: list[Planned]) -> list[RequestRecord]:
    target = Target(base_url=f"{url}/v1", model=MODEL, ignore_eos=True)
    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=1024)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900, connect=30), limits=limits, trust_env=False) as http:
        t0 = time.perf_counter()

        async def one(i: int, p: Planned) -> RequestRecord:
            delay = p.at_s - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            spec = RequestSpec(i, p.prompt, None, p.max_tokens,
                               Tenant(p.tenant.name, keys[p.tenant.name], p.tenant.share, ""))
            return await send(http, target, spec, p.at_s, t0)

        return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(planned))))


async def measure_capacity(url: str, keys: dict[str, str], seconds: float, concurrency: int) -> float:
    """Completed requests per second with the engine kept full (closed loop, the mix's lengths)."""
    target = Target(base_url=f"{url}/v1", model=MODEL, ignore_eos=True)
    rng = random.Random(99)
    done: list[float] = []
    async with httpx.AsyncClient(timeout=900, trust_env=False) as http:
        t0 = time.perf_counter()
        end = t0 + seconds

        async def worker(w: int) -> None:
            i = 0
            while time.perf_counter() < end:
                ten = rng.choices(TENANTS, weights=[x.share for x in TENANTS])[0]
                p_len, o_len = LENGTHS[ten.cls]
                prompt = words(min(MAX_PROMPT, sample_len(p_len, "lognormal", rng)), rng)
                spec = RequestSpec(w * 100000 + i, prompt, None, sample_len(o_len, "lognormal", rng),
                                   Tenant(ten.name, keys[ten.name], 1, ""))
                rec = await send(http, target, spec, 0.0, t0)
                if rec.status == OK:
                    done.append(time.perf_counter())
                i += 1

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
    # Count completions in the second half only: the first half fills the engine.
    half = t0 + seconds / 2
    return sum(1 for t in done if half <= t <= end) / (seconds / 2)


@dataclass(slots=True)
class Row:
    config: str
    load: float
    group: str  # "class:<name>" or "tenant:<name>" or "all"
    requests: int
    completed: int
    rejected: int
    errors: int
    ttft: dict = field(default_factory=dict)
    tpot: dict = field(default_factory=dict)
    goodput: float = 0.0


def _cls_of(rec: RequestRecord) -> PriorityClass:
    return CLASSES[next(t.cls for t in TENANTS if t.name == rec.tenant)]


def met(rec: RequestRecord) -> bool:
    c = _cls_of(rec)
    return rec.status == OK and rec.ttft_s is not None and rec.ttft_s <= c.ttft_s and \
        (rec.tpot_s is None or rec.tpot_s <= c.tpot_s)


def summarize(config: str, load: float, recs: list[RequestRecord], seconds: float) -> list[Row]:
    groups: dict[str, list[RequestRecord]] = {"all": recs}
    for c in CLASSES:
        groups[f"class:{c}"] = [r for r in recs if _cls_of(r).name == c]
    for t in TENANTS:
        groups[f"tenant:{t.name}"] = [r for r in recs if r.tenant == t.name]
    rows = []
    for g, rs in groups.items():
        ok = [r for r in rs if r.status == OK]
        d_ttft = dist(r.ttft_s for r in ok if r.ttft_s is not None)
        d_tpot = dist(r.tpot_s for r in ok if r.tpot_s is not None)
        rows.append(Row(config, load, g, len(rs), len(ok), sum(r.status == REJECTED for r in rs),
                        sum(r.status not in (OK, REJECTED) for r in rs),
                        {"p50": d_ttft.p50, "p95": d_ttft.p95, "p99": d_ttft.p99},
                        {"p50": d_tpot.p50, "p95": d_tpot.p95, "p99": d_tpot.p99},
                        sum(met(r) for r in rs) / seconds))
    return rows


def _f(v: float | None, scale: float = 1.0) -> str:
    return "-" if v is None or not math.isfinite(v) else f"{v * scale:.2f}"


def print_table(rows: list[Row]) -> None:
    print(f"{'config':6} {'load':>4} {'group':18} {'reqs':>5} {'done':>5} {'rej':>5} {'err':>4} "
          f"{'TTFT p50':>8} {'p95':>7} {'p99':>7} {'TPOT p50':>8} {'p95':>6} {'p99':>6} {'goodput/s':>9}")
    for r in rows:
        print(f"{r.config:6} {r.load:>4g} {r.group:18} {r.requests:>5} {r.completed:>5} {r.rejected:>5} "
              f"{r.errors:>4} {_f(r.ttft['p50']):>8} {_f(r.ttft['p95']):>7} {_f(r.ttft['p99']):>7} "
              f"{_f(r.tpot['p50']):>8} {_f(r.tpot['p95']):>6} {_f(r.tpot['p99']):>6} {r.goodput:>9.2f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--engine", choices=sorted(ENGINES), default="fake")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--warmup", type=float, default=8.0)
    ap.add_argument("--loads", default="1,2", help="multiples of the measured capacity")
    ap.add_argument("--capacity", type=float, default=None, help="skip measuring: requests/s at 1x")
    ap.add_argument("--capacity-seconds", type=float, default=30.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--json", default=None, help="write every row here")
    args = ap.parse_args()
    loads = [float(x) for x in args.loads.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="slo-mix-"))
    rows: list[Row] = []
    capacity = args.capacity
    try:
        for config in ("fcfs", "slo"):
            extra = []
            if config == "fcfs":  # the same targets, no per-class queue caps
                cfg = tmp / "fcfs-classes.json"
                cfg.write_text(json.dumps({"default": "standard", "classes": [
                    {"name": c.name, "ttft_p95_s": c.ttft_s, "tpot_p95_s": c.tpot_s, "max_queued": 1_000_000}
                    for c in DEFAULT_CLASSES]}))
                extra = ["--class-config", str(cfg)]
            srv = start_server(CONFIGS[config] + ENGINES[args.engine] + extra, tmp / f"{config}.log",
                               tmp / f"{config}-data")
            try:
                keys = tenant_keys(srv.base_url)
                if capacity is None:
                    conc = 64 if args.engine == "fake" else 16
                    capacity = asyncio.run(measure_capacity(srv.base_url, keys, args.capacity_seconds, conc))
                    print(f"capacity (fcfs, closed loop, {conc} clients): {capacity:.2f} req/s", flush=True)
                for load in loads:
                    asyncio.run(run_phase(srv.base_url, keys, plan(0.5 * capacity, args.warmup, args.seed + 1000)))
                    t = time.monotonic()
                    recs = asyncio.run(run_phase(srv.base_url, keys,
                                                 plan(load * capacity, args.seconds, args.seed)))
                    print(f"{config} at {load:g}x ({load * capacity:.2f} req/s): {len(recs)} requests in "
                          f"{time.monotonic() - t:.0f} s", flush=True)
                    rows += summarize(config, load, recs, args.seconds)
                    codes = Counter(f"{r.http_status} {r.error_code}" for r in recs if r.status != OK)
                    if codes:
                        print(f"  not ok: {dict(sorted(codes.items()))}", flush=True)
            finally:
                srv.stop()
    except Exception as exc:  # noqa: BLE001 - a setup failure is reported, not a traceback
        print(f"setup failed: {exc} (logs in {tmp})", file=sys.stderr)
        return 2
    print()
    print_table(rows)
    verdict = 0
    top = max(loads)

    def row(config: str, group: str) -> Row:
        return next(r for r in rows if r.config == config and r.load == top and r.group == group)

    slo_all, fcfs_all = row("slo", "all"), row("fcfs", "all")
    ratio = slo_all.goodput / fcfs_all.goodput if fcfs_all.goodput > 0 else math.inf
    inter = row("slo", "class:interactive").ttft["p99"]
    target = CLASSES["interactive"].ttft_s
    print(f"\nat {top:g}x: goodput slo {slo_all.goodput:.2f}/s vs fcfs {fcfs_all.goodput:.2f}/s = {ratio:.1f}x "
          f"(target >= 2x); interactive TTFT p99 {_f(inter)} s (target <= {target:g} s)")
    if not ratio >= 2.0 or inter is None or inter > target:
        verdict = 1
    print("PASS" if verdict == 0 else "FAIL")
    if args.json:
        Path(args.json).write_text(json.dumps({"capacity": capacity, "engine": args.engine,
                                               "seconds": args.seconds, "rows": [asdict(r) for r in rows]},
                                              indent=1, default=str))
    shutil.rmtree(tmp, ignore_errors=True)
    return verdict


if __name__ == "__main__":
    sys.exit(main())
