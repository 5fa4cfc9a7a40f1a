"""What the gateway costs: capacity, added latency and CPU per request, gateway off and on, one run.

    .venv/bin/python benchmarks/gateway_overhead.py [--configs off,sqlite,pg,off-w2,sqlite-w2,pg-w2]
        [--p95-ms 150] [--phase-seconds 3] [--seconds 10] [--rate R] [--json out.json] [--keep]

Configurations (`--configs`, comma-separated; all six by default), each its own
`python -m lockgate.server --load-format fake` (an engine that answers at once with no
model, so only the server's and the gateway's own cost shows):
- off:    open mode, no admin key: no auth, limits, budget or ledger;
- sqlite: `--admin-key` and a fresh `--data-dir` (the SQLite store); the script creates a
          tenant with limits far above the load (nothing is rejected, every check still
          runs), a budget and prices, and an inference key, and sends every request with it;
- pg:     the same on `--store postgresql://...`: a throwaway PostgreSQL the script starts
          (lockgate/bench/pgserver.py; PostgreSQL's durability defaults, fsync and
          synchronous_commit on), one database per configuration;
- NAME-w2: the same with `--api-workers 2` (skipped, with a note, by a server without it).

Load: open loop, constant arrivals, non-streaming `/v1/completions` with `max_tokens=1`,
over a bounded pool of keep-alive connections per server (a minimal asyncio HTTP/1.1
client, lockgate/bench/rawhttp.py; `--client httpx` for httpx's, which on a 2-core box
costs more CPU than the servers). Latency is measured from each request's dispatch to
its full response; the client's lateness against the schedule (dispatch lag) is
reported apart, so a client that cannot keep up shows as lag, not as server latency.

1. Capacity, per configuration: the highest offered rate whose p95 latency is under
   `--p95-ms` (150 ms; a failed request counts as over it), from short open-loop phases
   (`--phase-seconds` after `--phase-warmup`): the rate doubles from `--start-rate` until
   a phase fails, then bisection narrows it to `--precision`. Rates the load generator
   itself could not offer end the search (the capacity is then a lower bound).
2. Added latency and CPU, per worker count: the configurations with that many workers
   share one arrival stream at half the gateway-off capacity (`--rate` fixes it instead,
   and `--rate` alone skips step 1), alternating in blocks of `--block` seconds (off,
   sqlite, pg, off, ...), so each gets `--seconds` of load at the full rate and the drift
   of a shared machine lands on all alike. The first `--warmup` seconds are discarded.
   Before that, an idle baseline: `--idle-requests` requests each, one at a time. Added
   p50/p99 = the configuration's minus gateway off's (same worker count). CPU per
   request from /proc over the measured window: the server's API processes (every worker
   and the supervisor) and its engine core, and PostgreSQL's (server and backends) for pg.

Targets (issues 7 and 21): added p50 <= 2 ms and p99 <= 10 ms; API CPU per request with
the gateway on <= `--cpu-target-ms` (1 ms; 0: not checked; one worker: the figure that
scales); 2 workers reach >= 1.3x the capacity of one.
Exit status: 0 PASS, 1 FAIL (a target missed), 2 setup failed (nothing measured),
3 incomplete (a configuration could not be set up, e.g. no PostgreSQL or no
--api-workers: the rest passed), 4 inconclusive (the load generator could not offer the
rates needed, or gateway off itself queued at the latency phase's rate; a gateway
configuration that saturates where off does not fails its latency targets).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import secrets
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from lockgate.bench.procs import ServerProcess
from lockgate.bench.proctree import tree_cpu, tree_total
from lockgate.bench.rawhttp import RawClient
from lockgate.stats import percentile

TARGET_P50_MS = 2.0
TARGET_P99_MS = 10.0
TARGET_SCALING = 1.3  # 2 workers' capacity over 1's
PROMPT = "Write one word about the sea."
PATH = "/v1/completions"
ENV_DROP = ("LOCKGATE_ADMIN_KEY", "LOCKGATE_API_KEY", "LOCKGATE_DATA_DIR", "LOCKGATE_STORE_URL")
ALL_CONFIGS = ("off", "sqlite", "pg", "off-w2", "sqlite-w2", "pg-w2")
STORES = ("off", "sqlite", "pg")


# ---- configurations and servers ---------------------------------------------------------------
class SetupError(RuntimeError):
    pass


class Skipped(RuntimeError):
    """This configuration cannot run here (no PostgreSQL, no --api-workers): the others go on."""


@dataclass(frozen=True)
class Config:
    name: str
    store: str  # off | sqlite | pg
    workers: int

    @classmethod
    def parse(cls, name: str) -> Config:
        store, _, w = name.partition("-w")
        if store == "on":
            store = "sqlite"  # the old script's name for it
        if store not in STORES or (w and not (w.isdigit() and int(w) >= 1)):
            raise ValueError(f"unknown configuration {name!r}: one of {', '.join(ALL_CONFIGS)} (-wN: N API workers)")
        workers = int(w) if w else 1
        return cls(store if workers == 1 else f"{store}-w{workers}", store, workers)

    @property
    def gateway(self) -> bool:
        return self.store != "off"


class Server(ServerProcess):
    """One `python -m lockgate.server` (fake engine) in its own working directory."""

    def __init__(self, cfg: Config, workdir: Path, extra: list[str], server_args: list[str]) -> None:
        self.cfg = cfg
        workdir.mkdir(parents=True)
        env = {k: v for k, v in os.environ.items() if k not in ENV_DROP}
        workers = ["--api-workers", str(cfg.workers)] if cfg.workers > 1 else []
        # cwd: the default ./lockgate-data of open mode lands in an empty directory of ours.
        super().__init__(["--load-format", "fake", "--log-level", "warning", *workers, *server_args, *extra],
                         workdir / "server.log", wait=False, cwd=workdir, env=env, die_with_parent=True)

    def wait_up(self, timeout: float) -> None:
        try:
            self.wait_healthy(timeout)
        except RuntimeError:  # it exited
            tail = self.log_text()[-2500:]
            if self.cfg.workers > 1 and "No such option" in tail and "--api-workers" in tail:
                raise Skipped("this lockgate has no --api-workers") from None
            raise SetupError(f"{self.cfg.name} server exited with {self.proc.returncode} at startup\n"
                             f"  command: {' '.join(self.cmd)}\n  log tail:\n{_indent(tail)}") from None
        except TimeoutError:
            raise SetupError(f"{self.cfg.name} server not healthy after {timeout:.0f} s\n  log tail:\n"
                             f"{_indent(self.log_text()[-2500:])}") from None


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


@dataclass
class Target:
    cfg: Config
    server: Server
    headers: dict[str, str] = field(default_factory=dict)
    model: str = ""
    tenant_id: str | None = None
    db_pid: int | None = None  # PostgreSQL's postmaster (pg configurations): its CPU counts too

    @property
    def name(self) -> str:
        return self.cfg.name

    def cpu(self) -> tuple[float, float, float]:
        """(API, engine, database) CPU seconds so far."""
        api, engine = tree_cpu(self.server.pid)
        return api, engine, tree_total(self.db_pid) if self.db_pid is not None else 0.0


def first_model(url: str, headers: dict[str, str]) -> str:
    r = httpx.get(f"{url}/v1/models", headers=headers, timeout=30)
    if r.status_code != 200:
        raise SetupError(f"GET /v1/models: {r.status_code} {r.text[:300]}")
    return r.json()["data"][0]["id"]


def setup_gateway(t: Target, admin_key: str, max_rate: float, connections: int) -> None:
    """A tenant with limits far above any offered load, a budget and prices; one inference key."""
    url, admin = t.server.base_url, {"Authorization": f"Bearer {admin_key}"}
    tenant = {
        "name": "bench", "models": ["*"],
        "rpm": int(max_rate * 60 * 10), "tpm": int(max_rate * 60 * 10 * 200),
        "max_concurrency": connections * 16, "max_tokens": 64,
        "budget_usd": 1_000_000.0, "budget_period": "total",
        "prices": {"*": {"prompt": 0.1, "completion": 0.2}},
    }
    r = httpx.post(f"{url}/admin/tenants", json=tenant, headers=admin, timeout=30)
    if r.status_code != 201:
        raise SetupError(f"{t.name}: POST /admin/tenants: {r.status_code} {r.text[:500]}")
    t.tenant_id = r.json()["id"]
    r = httpx.post(f"{url}/admin/tenants/{t.tenant_id}/keys", json={"name": "bench", "scopes": ["inference"]},
                   headers=admin, timeout=30)
    if r.status_code != 201:
        raise SetupError(f"{t.name}: POST /admin/tenants/{t.tenant_id}/keys: {r.status_code} {r.text[:500]}")
    t.headers = {"Authorization": f"Bearer {r.json()['key']}"}


def ledger_requests(t: Target, admin_key: str) -> int | None:
    """Requests the ledger holds for the bench tenant; None when the usage API answers otherwise."""
    try:
        r = httpx.get(f"{t.server.base_url}/admin/usage",
                      params={"tenant_id": t.tenant_id, "group_by": "model", "format": "json"},
                      headers={"Authorization": f"Bearer {admin_key}"}, timeout=30)
        rows = r.json().get("data")
        if r.status_code != 200 or not isinstance(rows, list):
            return None
        return sum(int(x["requests"]) for x in rows)
    except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
        return None


# ---- load ------------------------------------------------------------------------------------
class HttpxClient:
    """httpx's AsyncClient: a bounded keep-alive pool."""

    def __init__(self, t: Target, connections: int, timeout: float, body: bytes) -> None:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections,
                              keepalive_expiry=60)
        self.client = httpx.AsyncClient(base_url=t.server.base_url, limits=limits, timeout=httpx.Timeout(timeout),
                                        headers={**t.headers, "content-type": "application/json"})
        self.body = body

    async def post(self) -> int:
        return (await self.client.post(PATH, content=self.body)).status_code

    async def aclose(self) -> None:
        await self.client.aclose()


def make_client(t: Target, kind: str, connections: int, timeout: float) -> HttpxClient | RawClient:
    body = json.dumps({"model": t.model, "prompt": PROMPT, "max_tokens": 1}).encode()
    if kind == "httpx":
        return HttpxClient(t, connections, timeout, body)
    return RawClient("127.0.0.1", t.server.port, PATH, t.headers, body, connections)


@dataclass
class Sample:
    name: str
    scheduled: float
    dispatched: float
    done: float
    status: str

    @property
    def ok(self) -> bool:
        return self.status == "200"

    @property
    def latency_ms(self) -> float:
        return (self.done - self.dispatched) * 1000


@dataclass
class Phase:
    """One open-loop phase: its samples (measured part), idle baseline and meters."""

    samples: list[Sample]
    idle: list[Sample]
    wall_s: float  # the measured window
    dispatched_rps: float  # what the client actually offered in it
    lag_ms: dict[str, float]
    client_cpu_ms_per_request: float
    cpu: dict[str, tuple[float, float, float]]  # per target: (API, engine, database) CPU seconds in the window


async def open_loop(targets: list[Target], clients: dict[str, HttpxClient | RawClient], rate: float,
                    seconds: float, warmup: float, block: float, timeout: float, idle_requests: int = 0,
                    meter_cpu: bool = True) -> Phase:
    """Constant arrivals at `rate`; block k of `block` seconds goes to targets[k % len(targets)], so each
    target gets `seconds` of measured load at the full rate (after `warmup` seconds each)."""
    loop = asyncio.get_running_loop()
    samples: list[Sample] = []
    idle: list[Sample] = []
    k = len(targets)
    warm_s, total_s = warmup * k, (warmup + seconds) * k
    interval = 1.0 / rate

    async def one(t: Target, scheduled: float, into: list[Sample] | None) -> None:
        dispatched = loop.time()
        SENT[t.name] = SENT.get(t.name, 0) + 1
        try:  # the timeout covers the wait for a pooled connection too
            status = str(await asyncio.wait_for(clients[t.name].post(), timeout))
        except (httpx.HTTPError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError,
                TimeoutError) as exc:
            status = type(exc).__name__
        if into is not None:
            into.append(Sample(t.name, scheduled, dispatched, loop.time(), status))

    for _ in range(idle_requests):  # one request at a time, targets alternating: no queueing at all
        for t in targets:
            await one(t, loop.time(), idle)
    tasks: set[asyncio.Task[None]] = set()
    t0 = loop.time() + 0.05
    i = 0
    started: dict[str, Any] = {}
    while (offset := i * interval) < total_s:
        scheduled = t0 + offset
        delay = scheduled - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        measured = offset >= warm_s
        if measured and not started:
            started = {"wall": time.monotonic(), "client": _self_cpu(),
                       "cpu": {t.name: t.cpu() for t in targets} if meter_cpu else {}}
        task = asyncio.create_task(one(targets[int(offset / block) % k], scheduled, samples if measured else None))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        i += 1
    span = loop.time() - (t0 + warm_s)
    if not started:  # nothing was measured
        started = {"wall": time.monotonic(), "client": _self_cpu(), "cpu": {t.name: t.cpu() for t in targets}}
    await asyncio.gather(*tasks)
    wall = time.monotonic() - started["wall"]
    cpu = {t.name: tuple(b - a for a, b in zip(started["cpu"][t.name], t.cpu())) for t in targets} if meter_cpu else {}
    lags = sorted((s.dispatched - s.scheduled) * 1000 for s in samples)
    client_cpu = _self_cpu() - started["client"]
    return Phase(samples, idle, wall, len(samples) / span if span > 0 else math.nan,
                 {"p50": percentile(lags, 50, empty=math.nan), "p99": percentile(lags, 99, empty=math.nan),
                  "max": lags[-1] if lags else math.nan},
                 client_cpu * 1000 / len(samples) if samples else math.nan, cpu)  # type: ignore[arg-type]


async def warm(clients: dict[str, HttpxClient | RawClient], connections: int) -> None:
    """Open `connections / 4` keep-alive connections per server (and warm its caches)."""
    n = max(1, connections // 4)
    for name, c in clients.items():
        for _ in range(3):
            await asyncio.gather(*(c.post() for _ in range(n)))
        SENT[name] = SENT.get(name, 0) + 3 * n


SENT: dict[str, int] = {}  # requests sent per configuration, warm-ups and probes included


def _self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def p95_ms(samples: list[Sample]) -> float:
    """p95 latency, a failed request counting as infinitely slow."""
    lat = sorted(s.latency_ms if s.ok else math.inf for s in samples)
    if not lat:
        return math.inf
    return lat[min(len(lat) - 1, math.ceil(0.95 * len(lat)) - 1)]


# ---- 1 capacity --------------------------------------------------------------------------------
async def capacity(t: Target, args: argparse.Namespace, log: list[dict[str, Any]]) -> dict[str, Any]:
    """The highest offered rate with p95 under the bound: doubling, then bisection."""
    client = make_client(t, args.client, args.connections, args.phase_timeout)
    clients = {t.name: client}
    try:
        await warm(clients, args.connections)
        passed, failed, limited = 0.0, math.inf, False

        async def probe(rate: float) -> bool:
            nonlocal limited
            ph = await open_loop([t], clients, rate, args.phase_seconds, args.phase_warmup, 1e9,
                                 args.phase_timeout, meter_cpu=False)
            p95 = p95_ms(ph.samples)
            errors = sum(not s.ok for s in ph.samples)
            ok = p95 < args.p95_ms
            short = ph.dispatched_rps < 0.97 * rate
            log.append({"config": t.name, "rate": rate, "p95_ms": p95, "errors": errors,
                        "dispatched_rps": ph.dispatched_rps, "pass": ok, "client_limited": short})
            offered = f", the client offered only {ph.dispatched_rps:.0f} req/s" if short else ""
            print(f"  {t.name:<10} {rate:7.0f} req/s: p95 {p95:8.1f} ms, {errors} errors{offered} -> "
                  f"{'ok' if ok else 'over'}", flush=True)
            await asyncio.sleep(args.cooldown)  # what the server still holds drains
            if ok and short:
                limited = True  # the client cannot offer more: stop here, a lower bound
            return ok

        rate = args.start_rate
        while rate <= args.max_rate and not limited:
            if not await probe(rate):
                failed = rate
                break
            passed, rate = rate, rate * 2
        while passed == 0 and failed > args.start_rate / 32:  # over at the first rate: halve until one is not
            if await probe(failed / 2):
                passed = failed / 2
            else:
                failed /= 2
        while not limited and passed > 0 and failed < math.inf and failed / passed > 1 + args.precision:
            mid = (passed * failed) ** 0.5
            if await probe(mid):
                passed = mid
            else:
                failed = mid
        return {"capacity_rps": passed, "first_failing_rps": failed if failed < math.inf else None,
                "lower_bound": limited or failed == math.inf}
    finally:
        await client.aclose()


# ---- 2 latency and CPU at a fixed rate --------------------------------------------------------
async def interleaved(targets: list[Target], rate: float, args: argparse.Namespace) -> Phase:
    clients = {t.name: make_client(t, args.client, args.connections, args.timeout) for t in targets}
    try:
        await warm(clients, args.connections)
        return await open_loop(targets, clients, rate, args.seconds, args.warmup, args.block, args.timeout,
                               args.idle_requests)
    finally:
        for c in clients.values():
            await c.aclose()


def summarize(ph: Phase, targets: list[Target], rate: float) -> dict[str, Any]:
    k = len(targets)
    out: dict[str, Any] = {}
    for t in targets:
        mine = [s for s in ph.samples if s.name == t.name]
        ok = sorted(s.latency_ms for s in mine if s.ok)
        idle = sorted(s.latency_ms for s in ph.idle if s.name == t.name and s.ok)
        errors: dict[str, int] = {}
        for s in mine:
            if not s.ok:
                errors[s.status] = errors.get(s.status, 0) + 1
        api, engine, db = ph.cpu[t.name]
        n = len(mine) or math.nan
        out[t.name] = {
            "rate_rps": rate, "requests": len(mine), "ok": len(ok), "errors": errors,
            # Each target had the stream for 1/k of the measured wall time (blocks alternate).
            "achieved_rps": len(ok) / (ph.wall_s / k) if ph.wall_s > 0 else math.nan,
            "latency_ms": {f"p{q}": percentile(ok, q, empty=math.nan) for q in (50, 90, 99)}
            | {"max": ok[-1] if ok else math.nan},
            "idle_latency_ms": {f"p{q}": percentile(idle, q, empty=math.nan) for q in (50, 99)},
            "api_cpu_ms_per_request": api * 1000 / n, "engine_cpu_ms_per_request": engine * 1000 / n,
            "db_cpu_ms_per_request": db * 1000 / n if t.db_pid is not None else None,
        }
        m = out[t.name]
        # A target answering well under the offered rate, or whose p50 is far over its idle p50, is
        # saturated: its loaded latency is then queueing, not the gateway's cost.
        m["saturated"] = (m["achieved_rps"] < 0.9 * rate
                          or m["latency_ms"]["p50"] > max(10 * m["idle_latency_ms"]["p50"], 20.0))
    return out


# ---- report --------------------------------------------------------------------------------------
def _f(v: float | None, fmt: str = ".2f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


def judge(res: dict[str, Any], args: argparse.Namespace) -> None:
    """Each target's verdict into res["checks"]; res["pass"], res["inconclusive"]."""
    checks: list[dict[str, Any]] = []
    lat, caps = res["latency"], res["capacity"]
    for name, m in lat.items():
        cfg = Config.parse(name)
        if not cfg.gateway:
            continue
        base = "off" if cfg.workers == 1 else f"off-w{cfg.workers}"
        if base in lat:
            a50 = m["latency_ms"]["p50"] - lat[base]["latency_ms"]["p50"]
            a99 = m["latency_ms"]["p99"] - lat[base]["latency_ms"]["p99"]
            m["added_ms"] = {"p50": a50, "p99": a99}
            checks.append({"check": f"{name}: added p50 <= {TARGET_P50_MS:g} ms", "value": a50,
                           "pass": a50 <= TARGET_P50_MS})
            checks.append({"check": f"{name}: added p99 <= {TARGET_P99_MS:g} ms", "value": a99,
                           "pass": a99 <= TARGET_P99_MS})
        if args.cpu_target_ms > 0 and cfg.workers == 1:
            v = m["api_cpu_ms_per_request"]
            checks.append({"check": f"{name}: API CPU per request <= {args.cpu_target_ms:g} ms", "value": v,
                           "pass": v <= args.cpu_target_ms})
        if m["errors"]:
            checks.append({"check": f"{name}: no errors", "value": sum(m["errors"].values()), "pass": False})
    for name, c in caps.items():
        cfg = Config.parse(name)
        one = caps.get(cfg.store)  # the same store with one worker
        if cfg.workers == 2 and one is not None and one["capacity_rps"] > 0:
            ratio = c["capacity_rps"] / one["capacity_rps"]
            c["scaling"] = ratio
            checks.append({"check": f"{name}: capacity >= {TARGET_SCALING:g}x {cfg.store}'s", "value": ratio,
                           "pass": ratio >= TARGET_SCALING, "lower_bound": c["lower_bound"]})
    res["checks"] = checks
    failed = [c for c in checks if not c["pass"]]
    # A missed scaling target whose 2-worker capacity is only a lower bound (the client ran out) proves
    # nothing; nor does a latency phase the client could not offer in full, or one where gateway off
    # itself queued (the rate is too much for this machine). A gateway configuration that saturates
    # where gateway off does not simply fails its latency targets.
    res["inconclusive"] = (any(c.get("lower_bound") for c in failed)
                           or any(m["saturated"] for n, m in lat.items() if not Config.parse(n).gateway)
                           or any(c["dispatched_rps"] < 0.97 * c["rate_rps"] for c in res["clients"].values()))
    res["pass"] = not failed


def print_report(res: dict[str, Any], args: argparse.Namespace) -> None:
    print(f"\ngateway overhead: /v1/completions max_tokens=1, non-streaming, open loop, fake engine, "
          f"{os.cpu_count()} CPU cores shared by the client and every server; {args.client} client, "
          f"{args.connections} keep-alive connections per server")
    caps = res["capacity"]
    if caps:
        print(f"\ncapacity: the highest offered rate with p95 < {args.p95_ms:g} ms ({args.phase_seconds:g} s "
              f"phases, doubling then bisection to {args.precision:.0%})")
        for name, c in caps.items():
            extra = f"  ({c['scaling']:.2f}x one worker's)" if "scaling" in c else ""
            bound = " (at least: the client could offer no more)" if c["lower_bound"] else ""
            print(f"  {name:<10} {c['capacity_rps']:8.0f} req/s{bound}{extra}")
    lat = res["latency"]
    head = (f"{'config':<10} {'rate/s':>7} {'ok':>6} {'errors':<14} {'p50 ms':>7} {'p99 ms':>7} {'+p50':>6} "
            f"{'+p99':>6} {'idle p50':>8}  {'CPU ms/request: api + engine (+ db)':<36}")
    at = f"at {args.rate:g} req/s" if args.rate is not None else "at half the gateway-off capacity (per worker count)"
    print(f"\n{at}, configurations interleaved in {args.block:g} s blocks, {args.seconds:g} s each after "
          f"{args.warmup:g} s (+p50/+p99: added against gateway off with as many workers):")
    print(head)
    print("-" * len(head))
    for name, m in lat.items():
        errs = ", ".join(f"{k}:{v}" for k, v in sorted(m["errors"].items())) or "-"
        a = m.get("added_ms", {})
        db = f" + {m['db_cpu_ms_per_request']:.2f}" if m["db_cpu_ms_per_request"] is not None else ""
        print(f"{name:<10} {m['rate_rps']:>7.0f} {m['ok']:>6} {errs:<14} {_f(m['latency_ms']['p50']):>7} "
              f"{_f(m['latency_ms']['p99']):>7} {_f(a.get('p50'), '+.2f'):>6} {_f(a.get('p99'), '+.2f'):>6} "
              f"{_f(m['idle_latency_ms']['p50']):>8}  {m['api_cpu_ms_per_request']:.2f} + "
              f"{m['engine_cpu_ms_per_request']:.2f}{db}"
              f"{'   SATURATED: its latency is queueing' if m['saturated'] else ''}")
    for w, c in res["clients"].items():
        print(f"client ({w} worker{'s' if w != '1' else ''}): offered {c['dispatched_rps']:.0f} req/s of "
              f"{c['rate_rps']:.0f}; dispatch lag p50 {c['lag_ms']['p50']:.2f} ms, p99 {c['lag_ms']['p99']:.2f} ms; "
              f"its own CPU {c['cpu_ms_per_request']:.2f} ms per request")
    for name, n in res.get("ledger", {}).items():
        print(f"ledger of {name}: {n} requests (sent: {res['sent'][name]}, warm-ups and probes included)")
    if res["skipped"]:
        print("\nskipped: " + "; ".join(f"{k} ({v})" for k, v in res["skipped"].items()))
    print("\nchecks:")
    for c in res["checks"]:
        print(f"  {'PASS' if c['pass'] else 'FAIL'}  {c['check']}: {c['value']:.2f}"
              f"{' (a lower bound)' if c.get('lower_bound') else ''}")


# ---- main ----------------------------------------------------------------------------------------
def start_postgres(tmp: Path) -> Any:
    from lockgate.bench.pgserver import PgServer, PgUnavailable

    try:
        return PgServer().start()  # PostgreSQL's durability defaults (fsync, synchronous_commit on)
    except PgUnavailable as exc:
        raise Skipped(str(exc)) from None
    except (RuntimeError, TimeoutError, OSError) as exc:
        raise Skipped(f"PostgreSQL did not start: {exc}") from None


async def run(args: argparse.Namespace, configs: list[Config], tmp: Path, admin_key: str,
              res: dict[str, Any], servers: list[Server], pg_box: list[Any]) -> None:
    targets: dict[str, Target] = {}
    pending: list[tuple[Config, Server]] = []
    for cfg in configs:  # start them all: they come up side by side
        extra: list[str] = []
        if cfg.gateway:
            extra = ["--admin-key", admin_key, "--data-dir", str(tmp / cfg.name / "data")]
        if cfg.store == "pg":
            try:
                if not pg_box:
                    print("starting PostgreSQL ...", flush=True)
                    pg_box.append(start_postgres(tmp))
                extra += ["--store", pg_box[0].create_database("gw_" + cfg.name.replace("-", "_"))]
            except Skipped as exc:
                res["skipped"][cfg.name] = str(exc)
                continue
        srv = Server(cfg, tmp / cfg.name, extra, args.server_arg)
        servers.append(srv)
        pending.append((cfg, srv))
    print(f"starting {len(pending)} servers (fake engine) ... logs under {tmp}", flush=True)
    for cfg, srv in pending:
        try:
            srv.wait_up(args.startup_timeout)
        except Skipped as exc:
            res["skipped"][cfg.name] = str(exc)
            print(f"  {cfg.name}: skipped ({exc})", flush=True)
            srv.stop()
            continue
        t = Target(cfg, srv)
        if cfg.gateway:
            setup_gateway(t, admin_key, max(args.max_rate, args.rate or 0), args.connections)
        if cfg.store == "pg":
            t.db_pid = pg_box[0].proc.pid
        t.model = first_model(srv.base_url, t.headers)
        targets[cfg.name] = t
    if not targets:
        raise SetupError("no configuration could be set up")

    if args.rate is None:
        print("\n1. capacity", flush=True)
        for name, t in targets.items():
            res["capacity"][name] = await capacity(t, args, res["probes"])
    print("\n2. latency and CPU at a fixed rate", flush=True)
    for workers in sorted({t.cfg.workers for t in targets.values()}):
        group = [t for t in targets.values() if t.cfg.workers == workers]
        if args.rate is not None:
            rate = args.rate
        else:  # half the gateway-off capacity (no gateway-off configuration: half the lowest capacity)
            base = next((t for t in group if not t.cfg.gateway), None)
            caps = [res["capacity"][t.name]["capacity_rps"] for t in ([base] if base else group)]
            rate = max(1.0, min(caps) / 2)
        print(f"  {workers} worker(s): {', '.join(t.name for t in group)} at {rate:.0f} req/s ...", flush=True)
        ph = await interleaved(group, rate, args)
        res["latency"].update(summarize(ph, group, rate))
        res["clients"][str(workers)] = {"rate_rps": rate, "dispatched_rps": ph.dispatched_rps, "lag_ms": ph.lag_ms,
                                        "cpu_ms_per_request": ph.client_cpu_ms_per_request}
    await asyncio.sleep(2.0)  # the ledgers are written behind the responses
    for name, t in targets.items():
        if t.cfg.gateway:
            n = ledger_requests(t, admin_key)
            if n is not None:
                res.setdefault("ledger", {})[name] = n
    res["sent"] = {name: SENT.get(name, 0) for name in targets}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default=",".join(ALL_CONFIGS),
                    help=f"comma-separated, from {', '.join(ALL_CONFIGS)} (-wN: N API workers)")
    ap.add_argument("--rate", type=float, help="latency phase at this rate for every configuration, no capacity search")
    ap.add_argument("--p95-ms", type=float, default=150.0, help="capacity: the p95 latency bound")
    ap.add_argument("--start-rate", type=float, default=100.0, help="capacity: the first probe's rate")
    ap.add_argument("--max-rate", type=float, default=6400.0, help="capacity: the highest rate probed")
    ap.add_argument("--precision", type=float, default=0.1, help="capacity: bisect until within this fraction")
    ap.add_argument("--phase-seconds", type=float, default=3.0, help="capacity: measured seconds per probe")
    ap.add_argument("--phase-warmup", type=float, default=1.0, help="capacity: discarded seconds per probe")
    ap.add_argument("--phase-timeout", type=float, default=5.0, help="capacity: per-request timeout in seconds")
    ap.add_argument("--cooldown", type=float, default=1.0, help="capacity: pause between probes")
    ap.add_argument("--seconds", type=float, default=10.0, help="latency phase: measured seconds per configuration")
    ap.add_argument("--warmup", type=float, default=2.0, help="latency phase: discarded seconds per configuration")
    ap.add_argument("--block", type=float, default=0.5, help="latency phase: seconds per alternating block")
    ap.add_argument("--idle-requests", type=int, default=200, help="latency phase: sequential requests each first")
    ap.add_argument("--timeout", type=float, default=15.0, help="latency phase: per-request timeout in seconds")
    ap.add_argument("--cpu-target-ms", type=float, default=1.0,
                    help="API CPU per request with the gateway on, one worker (0: not checked)")
    ap.add_argument("--connections", type=int, default=64, help="keep-alive connection pool per server")
    ap.add_argument("--client", choices=("raw", "httpx"), default="raw", help="the load generator's HTTP client")
    ap.add_argument("--startup-timeout", type=float, default=300.0)
    ap.add_argument("--server-arg", action="append", default=[], help="extra `lockgate serve` argument for every "
                    "server (repeatable; e.g. --server-arg=--max-num-seqs=512)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the servers' logs and data dirs")
    args = ap.parse_args()
    try:
        configs = [Config.parse(c.strip()) for c in args.configs.split(",") if c.strip()]
    except ValueError as exc:
        ap.error(str(exc))
    if not configs or len({c.name for c in configs}) != len(configs):
        ap.error("--configs: one or more distinct configurations")
    if (args.rate is not None and args.rate <= 0) or args.seconds <= 0 or args.warmup < 0 or args.block <= 0 \
            or args.connections < 1 or args.phase_seconds <= 0 or args.start_rate <= 0 or args.precision <= 0:
        ap.error("rates, --seconds, --phase-seconds, --block, --precision and --connections must be positive")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below on SIGTERM too

    tmp = Path(tempfile.mkdtemp(prefix="lockgate-gw-bench-"))
    admin_key = "adm-" + secrets.token_urlsafe(24)
    servers: list[Server] = []
    pg_box: list[Any] = []
    res: dict[str, Any] = {"capacity": {}, "probes": [], "latency": {}, "clients": {}, "skipped": {},
                           "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    code = 0
    try:
        asyncio.run(run(args, configs, tmp, admin_key, res, servers, pg_box))
        judge(res, args)
        print_report(res, args)
        if not res["pass"] and not res["inconclusive"]:
            code, verdict = 1, "FAIL"
        elif res["inconclusive"]:
            code, verdict = 4, "INCONCLUSIVE (the load generator could not offer the rates, or gateway off saturated)"
        elif res["skipped"]:
            code, verdict = 3, "INCOMPLETE (the configurations run passed; see skipped above)"
        else:
            code, verdict = 0, "PASS"
        print(f"\nRESULT: {verdict}")
        if args.json:
            args.json.write_text(json.dumps(res, indent=2, default=str))
            print(f"wrote {args.json}")
    except SetupError as exc:
        print(f"\nSETUP FAILED: {exc}", file=sys.stderr)
        code = 2
    finally:
        for s in servers:
            s.stop()
        for pg in pg_box:
            pg.close()
        if args.keep or code == 2:
            print(f"server logs kept under {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
