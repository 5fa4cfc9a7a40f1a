"""What the gateway costs a request: the same stream with the gateway off and fully on, one run.

    .venv/bin/python benchmarks/gateway_overhead.py [--rate 500] [--seconds 20] [--warmup 2]
                                                    [--block 0.5] [--connections 64] [--json out.json]

Starts two `python -m lockgate.server --load-format fake` processes (an engine
that answers at once with no model, so only the server's and gateway's own
cost shows):
- off: open mode, no admin key, an empty data dir: no auth, limits, budget or ledger;
- on:  `--admin-key` and a fresh `--data-dir`; the script creates a tenant with
  limits far above the load (nothing is rejected, every check still runs), a
  budget and prices, and an inference key, and sends every request with it:
  auth, rate and token limits, concurrency, budget reserve/settle and a ledger
  row per request.

Load: open-loop, constant arrivals at `--rate` (500 req/s), non-streaming
`/v1/completions` with `max_tokens=1`, over keep-alive connections from a
bounded pool per server. The client is a minimal asyncio HTTP/1.1 keep-alive
pool (`--client raw`, the default) or httpx's AsyncClient (`--client httpx`):
on the 2-core box httpx spends ~5 ms of CPU per request, more than the server
itself, and the load generator shares those cores with both servers, so httpx
alone cannot offer 500 req/s there; the raw client costs a fraction of that.
Both clients treat the two modes alike. One arrival stream alternates between
the two servers in blocks of `--block` seconds (off, on, off, on, ...), so each
mode gets `--seconds` of load at the full rate and drift of a shared machine
(other jobs, thermal, page cache) lands on both alike; back-to-back runs would
charge a drift to whichever mode ran during it. The first `--warmup` seconds per
mode are discarded.

Latency is measured client-side from the moment a request is handed to the
client (its dispatch) to the full response; the client's lateness against the
schedule (dispatch lag) is reported separately, so a client that cannot keep up
shows as lag, not as server latency. The load generator shares the machine's
cores with both servers: its own CPU use and each server's CPU per request
(API process + engine process, from /proc) are printed too.

Before the load, an idle baseline: `--idle-requests` (200) requests per mode one
at a time, modes alternating: the gateway's own cost with no queueing at all.
Under load a mode counts as saturated when its p50 is over 10x its idle p50 (or it
answers under 90% of the offered rate): its loaded latency is then queueing.

Targets (issue 7, 2-core machine): added latency (on - off) p50 <= 2 ms, p99 <= 10 ms.
Exit status: 0 PASS, 1 FAIL, 2 setup failed, 3 the "on" server could not be set up
(only "off" measured), 4 inconclusive (both servers saturated at this rate: the loaded
numbers are queueing; the idle baseline, one request at a time, still shows the gateway's
own per-request cost).
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

from lockgate.bench.procs import ServerProcess, children
from lockgate.stats import percentile

TARGET_P50_MS = 2.0
TARGET_P99_MS = 10.0
PROMPT = "Write one word about the sea."
ENV_DROP = ("LOCKGATE_ADMIN_KEY", "LOCKGATE_API_KEY", "LOCKGATE_DATA_DIR")


# ---- servers ---------------------------------------------------------------------------------
class SetupError(RuntimeError):
    pass


class Server(ServerProcess):
    """One `python -m lockgate.server` process (fake engine) in its own working directory."""

    def __init__(self, name: str, workdir: Path, extra: list[str], server_args: list[str]) -> None:
        self.name = name
        workdir.mkdir(parents=True)
        env = {k: v for k, v in os.environ.items() if k not in ENV_DROP}
        # cwd: the default ./lockgate-data of open mode lands in an empty directory of ours.
        super().__init__(["--load-format", "fake", "--log-level", "warning", *server_args, *extra],
                         workdir / "server.log", wait=False, cwd=workdir, env=env, die_with_parent=True)
        self.url = self.base_url

    def log_tail(self, n: int = 2500) -> str:
        return self.log_text()[-n:]

    def wait_healthy(self, timeout: float) -> None:  # type: ignore[override]
        try:
            super().wait_healthy(timeout)
        except RuntimeError:  # it exited
            tail = self.log_tail()
            hint = ""
            if "No such option" in tail and ("--admin-key" in tail or "--data-dir" in tail):
                hint = ("\n  -> this lockgate has no --admin-key/--data-dir yet (issue 7's gateway has not "
                        "landed), so the gateway cannot be switched on")
            raise SetupError(f"{self.name} server exited with {self.proc.returncode} at startup{hint}\n"
                             f"  command: {' '.join(self.cmd)}\n  log tail:\n{_indent(tail)}") from None
        except TimeoutError:
            raise SetupError(f"{self.name} server not healthy after {timeout:.0f} s\n  log tail:\n"
                             f"{_indent(self.log_tail())}") from None

    def cpu_seconds(self) -> tuple[float, float]:
        """user + system CPU seconds of the API process and of its children (the engine core), from /proc."""
        api = _proc_cpu(self.proc.pid)
        return api, sum(_proc_cpu(pid) for pid in children(self.proc.pid))


def _proc_cpu(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    except (OSError, IndexError, ValueError):
        return 0.0


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


@dataclass
class Target:
    name: str
    server: Server
    headers: dict[str, str] = field(default_factory=dict)
    model: str = ""
    tenant_id: str | None = None


def first_model(url: str, headers: dict[str, str]) -> str:
    r = httpx.get(f"{url}/v1/models", headers=headers, timeout=10)
    if r.status_code != 200:
        raise SetupError(f"GET /v1/models: {r.status_code} {r.text[:300]}")
    return r.json()["data"][0]["id"]


def setup_gateway(srv: Server, admin_key: str, rate: float, connections: int) -> Target:
    """A tenant with limits far above the offered load, a budget and prices; one inference key."""
    admin = {"Authorization": f"Bearer {admin_key}"}
    tenant = {
        "name": "bench", "models": ["*"],
        "rpm": int(rate * 60 * 10), "tpm": int(rate * 60 * 10 * 200),
        "max_concurrency": connections * 4, "max_tokens": 64,
        "budget_usd": 1_000_000.0, "budget_period": "total",
        "prices": {"*": {"prompt": 0.1, "completion": 0.2}},
    }
    r = httpx.post(f"{srv.url}/admin/tenants", json=tenant, headers=admin, timeout=10)
    if r.status_code != 201:
        raise SetupError(f"POST /admin/tenants: {r.status_code} {r.text[:500]}")
    tid = r.json()["id"]
    r = httpx.post(f"{srv.url}/admin/tenants/{tid}/keys", json={"name": "bench", "scopes": ["inference"]},
                   headers=admin, timeout=10)
    if r.status_code != 201:
        raise SetupError(f"POST /admin/tenants/{tid}/keys: {r.status_code} {r.text[:500]}")
    headers = {"Authorization": f"Bearer {r.json()['key']}"}
    return Target("on", srv, headers, first_model(srv.url, headers), tid)


def ledger_rows(target: Target, admin_key: str) -> tuple[int, float] | None:
    """(requests, cost in USD) the ledger holds for the bench tenant; None when the usage API answers otherwise."""
    time.sleep(2.0)  # the ledger is written behind the responses (writer thread, 1 s checkpoints)
    try:
        r = httpx.get(f"{target.server.url}/admin/usage",
                      params={"tenant_id": target.tenant_id, "group_by": "model", "format": "json"},
                      headers={"Authorization": f"Bearer {admin_key}"}, timeout=30)
        rows = r.json().get("data")
        if r.status_code != 200 or not isinstance(rows, list):
            return None
        return sum(int(x["requests"]) for x in rows), sum(float(x["cost_usd"] or 0) for x in rows)
    except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
        return None


# ---- load ------------------------------------------------------------------------------------
class HttpxClient:
    """httpx's AsyncClient: a bounded keep-alive pool."""

    def __init__(self, t: Target, connections: int, timeout: float, body: bytes) -> None:
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections,
                              keepalive_expiry=60)
        self.client = httpx.AsyncClient(base_url=t.server.url, limits=limits, timeout=httpx.Timeout(timeout),
                                        headers={**t.headers, "content-type": "application/json"})
        self.body = body

    async def post(self) -> int:
        r = await self.client.post("/v1/completions", content=self.body)
        return r.status_code

    async def aclose(self) -> None:
        await self.client.aclose()


class RawClient:
    """A minimal HTTP/1.1 client: one fixed POST, a bounded pool of keep-alive connections.

    Reads the status line, the headers and a Content-Length or chunked body; a
    connection the server closes (or that fails) is dropped and a new one opened."""

    def __init__(self, t: Target, connections: int, timeout: float, body: bytes) -> None:
        self.host, self.port = "127.0.0.1", t.server.port
        auth = "".join(f"{k}: {v}\r\n" for k, v in t.headers.items())
        self.request = (f"POST /v1/completions HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{auth}\r\n"
                        ).encode() + body
        self.slots = asyncio.Semaphore(connections)
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self) -> int:
        async with self.slots:
            conn = None
            while self.idle:  # most recently used first; drop those the server closed while idle
                conn = self.idle.pop()
                if not conn[0].at_eof():
                    break
                conn[1].close()
                conn = None
            if conn is not None:
                try:
                    return await self._send(conn)
                except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError) as exc:
                    if isinstance(exc, asyncio.IncompleteReadError) and exc.partial:
                        raise
                    # Closed by the server before it read this request (its keep-alive timeout racing
                    # our reuse): send it again on a fresh connection, as HTTP clients do.
            return await self._send(await asyncio.open_connection(self.host, self.port))

    async def _send(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter]) -> int:
        try:
            status, keep = await self._exchange(*conn)  # the caller bounds the whole request
        except BaseException:
            conn[1].close()
            raise
        if keep:
            self.idle.append(conn)
        else:
            conn[1].close()
        return status

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[int, bool]:
        writer.write(self.request)
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
        if headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                await reader.readexactly(size + 2)
                if size == 0:
                    break
        else:
            await reader.readexactly(int(headers.get("content-length", "0")))
        return status, headers.get("connection", "").lower() != "close"

    async def aclose(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


@dataclass
class Sample:
    mode: str
    scheduled: float
    dispatched: float
    done: float
    status: str


async def generate_load(targets: list[Target], rate: float, seconds: float, warmup: float, block: float,
                        connections: int, timeout: float, client_kind: str = "raw", idle_requests: int = 200,
                        ) -> tuple[list[Sample], list[Sample], dict[str, float]]:
    """Open-loop constant arrivals; block k of `block` seconds goes to targets[k % len(targets)]."""
    loop = asyncio.get_running_loop()
    bodies = {t.name: json.dumps({"model": t.model, "prompt": PROMPT, "max_tokens": 1}).encode() for t in targets}
    clients: dict[str, HttpxClient | RawClient] = {
        t.name: (HttpxClient if client_kind == "httpx" else RawClient)(t, connections, timeout, bodies[t.name])
        for t in targets}
    samples: list[Sample] = []
    k = len(targets)
    warm_s = warmup * k
    total_s = warm_s + seconds * k
    interval = 1.0 / rate
    meter: dict[str, float] = {f"sent_{t.name}": 0.0 for t in targets}

    idle: list[Sample] = []

    async def one(t: Target, scheduled: float, measured: bool, into: list[Sample] = samples) -> None:
        dispatched = loop.time()
        meter[f"sent_{t.name}"] += 1
        try:  # the timeout covers the wait for a pooled connection too
            status = str(await asyncio.wait_for(clients[t.name].post(), timeout))
        except (httpx.HTTPError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError,
                TimeoutError) as exc:
            status = type(exc).__name__
        if measured:
            into.append(Sample(t.name, scheduled, dispatched, loop.time(), status))

    try:
        # Open `connections / 4` keep-alive connections per server before the clock starts.
        for t in targets:
            await asyncio.gather(*(one(t, 0.0, False) for _ in range(max(1, connections // 4))))
        # Idle baseline: one request at a time, modes alternating, so no queueing at all.
        for _ in range(idle_requests):
            for t in targets:
                await one(t, loop.time(), True, idle)
        tasks: set[asyncio.Task[None]] = set()
        t0 = loop.time() + 0.05
        i = 0
        measuring = False
        while True:
            offset = i * interval
            if offset >= total_s:
                break
            scheduled = t0 + offset
            delay = scheduled - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            if not measuring and offset >= warm_s:
                measuring = True
                meter["wall0"], meter["cpu0"] = time.monotonic(), _self_cpu()
                for t in targets:
                    meter[f"api0_{t.name}"], meter[f"engine0_{t.name}"] = t.server.cpu_seconds()
            task = asyncio.create_task(one(targets[int(offset / block) % k], scheduled, offset >= warm_s))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        meter["dispatch_end"] = loop.time()
        meter["dispatch_start"] = t0 + warm_s
        await asyncio.gather(*tasks)
        meter["wall1"], meter["cpu1"] = time.monotonic(), _self_cpu()
        for t in targets:
            meter[f"api1_{t.name}"], meter[f"engine1_{t.name}"] = t.server.cpu_seconds()
    finally:
        for c in clients.values():
            await c.aclose()
    return samples, idle, meter


def _self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# ---- report ----------------------------------------------------------------------------------
def summarize(samples: list[Sample], idle: list[Sample], targets: list[Target], meter: dict[str, float],
              rate: float, seconds: float) -> dict[str, Any]:
    wall = meter["wall1"] - meter["wall0"]
    modes: dict[str, Any] = {}
    for t in targets:
        mine = [s for s in samples if s.mode == t.name]
        ok = sorted((s.done - s.dispatched) * 1000 for s in mine if s.status == "200")
        from_schedule = sorted((s.done - s.scheduled) * 1000 for s in mine if s.status == "200")
        errors: dict[str, int] = {}
        for s in mine:
            if s.status != "200":
                errors[s.status] = errors.get(s.status, 0) + 1
        api_cpu = meter[f"api1_{t.name}"] - meter[f"api0_{t.name}"]
        engine_cpu = meter[f"engine1_{t.name}"] - meter[f"engine0_{t.name}"]
        srv_cpu = api_cpu + engine_cpu
        idle_ok = sorted((s.done - s.dispatched) * 1000 for s in idle if s.mode == t.name and s.status == "200")
        modes[t.name] = {
            "requests": len(mine), "ok": len(ok), "errors": errors,
            # Each mode had the stream for half the measured wall time (blocks alternate).
            "achieved_rps": len(ok) / (wall / len(targets)) if wall > 0 else math.nan,
            "latency_ms": {f"p{q}": percentile(ok, q, empty=math.nan) for q in (50, 90, 99)}
            | {"max": ok[-1] if ok else math.nan},
            "latency_from_schedule_ms": {f"p{q}": percentile(from_schedule, q, empty=math.nan) for q in (50, 99)},
            "idle_latency_ms": {f"p{q}": percentile(idle_ok, q, empty=math.nan) for q in (50, 90, 99)}
            | {"n": len(idle_ok)},
            "server_cpu_ms_per_request": srv_cpu * 1000 / len(mine) if mine else math.nan,
            "api_cpu_ms_per_request": api_cpu * 1000 / len(mine) if mine else math.nan,
            "engine_cpu_ms_per_request": engine_cpu * 1000 / len(mine) if mine else math.nan,
            "server_cpu_cores": srv_cpu / (wall / len(targets)) if wall > 0 else math.nan,
        }
    lags = sorted((s.dispatched - s.scheduled) * 1000 for s in samples)
    span = meter["dispatch_end"] - meter["dispatch_start"]
    client_cpu = meter["cpu1"] - meter["cpu0"]
    client = {
        "target_rps": rate,
        "dispatched_rps": len(samples) / span if span > 0 else math.nan,
        "dispatch_lag_ms": {"p50": percentile(lags, 50, empty=math.nan), "p99": percentile(lags, 99, empty=math.nan),
                            "max": lags[-1] if lags else math.nan},
        "cpu_cores": client_cpu / wall if wall > 0 else math.nan,
        "cpu_ms_per_request": client_cpu * 1000 / len(samples) if samples else math.nan,
    }
    client["sustained"] = client["dispatched_rps"] >= 0.97 * rate
    out: dict[str, Any] = {"modes": modes, "client": client, "measured_wall_s": wall}
    # A server that answers well under the offered rate is overloaded: its latency is queueing.
    # With the modes interleaved, a server that falls behind in its block catches up in the other's,
    # so the achieved rate hides saturation: a loaded p50 far above the idle p50 shows it.
    out["overloaded"] = [name for name, m in modes.items() if m["achieved_rps"] < 0.9 * rate
                         or m["latency_ms"]["p50"] > max(10 * m["idle_latency_ms"]["p50"], 20.0)]
    if "on" in modes and "off" in modes:
        off, on = modes["off"]["latency_ms"], modes["on"]["latency_ms"]
        added = {"p50": on["p50"] - off["p50"], "p99": on["p99"] - off["p99"]}
        out["added_ms"] = added
        i_off, i_on = modes["off"]["idle_latency_ms"], modes["on"]["idle_latency_ms"]
        out["added_idle_ms"] = {"p50": i_on["p50"] - i_off["p50"], "p99": i_on["p99"] - i_off["p99"]}
        out["added_server_cpu_ms_per_request"] = (modes["on"]["server_cpu_ms_per_request"]
                                                  - modes["off"]["server_cpu_ms_per_request"])
        errors = any(m["errors"] for m in modes.values())
        out["pass"] = added["p50"] <= TARGET_P50_MS and added["p99"] <= TARGET_P99_MS and not errors
        out["inconclusive"] = len(out["overloaded"]) == len(modes)  # both drowned: the difference is noise
    return out


def print_report(res: dict[str, Any], args: argparse.Namespace, cores: int) -> None:
    print(f"\ngateway overhead: {args.rate:g} req/s offered, open loop, constant arrivals, /v1/completions "
          f"max_tokens=1, non-streaming, {args.seconds:g} s per mode after {args.warmup:g} s warm-up, "
          f"modes interleaved in {args.block:g} s blocks, {args.client} client with {args.connections} keep-alive "
          f"connections per server, "
          f"fake engine (no model), {cores} CPU cores shared by client and servers\n")
    head = (f"{'mode':<5} {'requests':>8} {'ok':>7} {'errors':<18} {'achieved/s':>10} {'p50 ms':>7} {'p90 ms':>7} "
            f"{'p99 ms':>7} {'max ms':>7} {'CPU ms/req api+engine':>21}")
    print(head)
    print("-" * len(head))
    for name, m in res["modes"].items():
        errs = ", ".join(f"{k}:{v}" for k, v in sorted(m["errors"].items())) or "-"
        lat = m["latency_ms"]
        print(f"{name:<5} {m['requests']:>8} {m['ok']:>7} {errs:<18} {m['achieved_rps']:>10.1f} {lat['p50']:>7.2f} "
              f"{lat['p90']:>7.2f} {lat['p99']:>7.2f} {lat['max']:>7.1f} "
              f"{m['api_cpu_ms_per_request']:>12.2f}+{m['engine_cpu_ms_per_request']:<8.2f}")
    print(f"\nidle baseline ({args.idle_requests} requests per mode, one at a time, modes alternating; "
          f"no queueing):")
    for name, m in res["modes"].items():
        i = m["idle_latency_ms"]
        print(f"  {name:<4} p50 {i['p50']:.2f} ms, p90 {i['p90']:.2f} ms, p99 {i['p99']:.2f} ms")
    if "added_idle_ms" in res:
        a = res["added_idle_ms"]
        print(f"  added (on - off): p50 {a['p50']:+.2f} ms, p99 {a['p99']:+.2f} ms")
    c = res["client"]
    print(f"\nclient: dispatched {c['dispatched_rps']:.1f} req/s of {c['target_rps']:g} offered; dispatch lag "
          f"p50 {c['dispatch_lag_ms']['p50']:.2f} ms, p99 {c['dispatch_lag_ms']['p99']:.2f} ms, "
          f"max {c['dispatch_lag_ms']['max']:.1f} ms; its own CPU {c['cpu_cores']:.2f} cores "
          f"({c['cpu_ms_per_request']:.2f} ms per request)")
    if not c["sustained"]:
        print(f"  NOTE: the load generator could not sustain {c['target_rps']:g} req/s on this machine (it shares "
              f"the cores with both servers): it offered {c['dispatched_rps']:.1f} req/s")
    elif c["dispatch_lag_ms"]["p99"] > 10:
        print("  note: the client kept the rate but was often late (CPU-starved); latency is counted from dispatch, "
              "so its lateness is not in the table")
    for name in res["overloaded"]:
        m = res["modes"][name]
        print(f"  NOTE: '{name}' is saturated at {c['target_rps']:g} req/s (answered {m['achieved_rps']:.1f} req/s; "
              f"loaded p50 {m['latency_ms']['p50']:.1f} ms vs {m['idle_latency_ms']['p50']:.2f} ms idle; "
              f"{m['server_cpu_ms_per_request']:.2f} ms of server CPU per request on a machine the client and "
              f"the other server share): its loaded latencies are mostly queueing")
    if "added_ms" in res:
        a = res["added_ms"]
        ok50, ok99 = a["p50"] <= TARGET_P50_MS, a["p99"] <= TARGET_P99_MS
        print(f"\nadded latency (on - off): p50 {a['p50']:+.2f} ms (target <= {TARGET_P50_MS:g}: "
              f"{'PASS' if ok50 else 'FAIL'}), p99 {a['p99']:+.2f} ms (target <= {TARGET_P99_MS:g}: "
              f"{'PASS' if ok99 else 'FAIL'}); added server CPU {res['added_server_cpu_ms_per_request']:+.2f} ms "
              f"per request")
        if res.get("ledger") is not None:
            n, cost = res["ledger"]
            print(f"ledger for the bench tenant: {n} requests, ${cost:.6f} "
                  f"(requests sent to 'on', warm-ups included: {res['on_requests_total']})")
        if any(m["errors"] for m in res["modes"].values()):
            print("errors above: a run with errors does not PASS (the gateway must reject nothing here)")
        if res["inconclusive"]:
            print("\nRESULT: INCONCLUSIVE (both servers overloaded: lower --rate, or run on a quieter machine)")
        else:
            print(f"\nRESULT: {'PASS' if res['pass'] else 'FAIL'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rate", type=float, default=500.0, help="offered requests per second (constant arrivals)")
    ap.add_argument("--seconds", type=float, default=20.0, help="measured seconds per mode")
    ap.add_argument("--warmup", type=float, default=2.0, help="discarded seconds per mode before measuring")
    ap.add_argument("--block", type=float, default=0.5, help="seconds per alternating block (off, on, off, ...)")
    ap.add_argument("--connections", type=int, default=64, help="keep-alive connection pool per server")
    ap.add_argument("--client", choices=("raw", "httpx"), default="raw",
                    help="load generator's HTTP client (raw: minimal asyncio HTTP/1.1; httpx: AsyncClient)")
    ap.add_argument("--idle-requests", type=int, default=200,
                    help="sequential requests per mode first (one at a time: the gateway's cost with no queueing)")
    ap.add_argument("--timeout", type=float, default=15.0,
                    help="per-request timeout in seconds, waiting for a pooled connection included")
    ap.add_argument("--startup-timeout", type=float, default=300.0)
    ap.add_argument("--server-arg", action="append", default=[], help="extra `lockgate serve` argument for both "
                    "servers (repeatable; e.g. --server-arg=--max-num-seqs=512)")
    ap.add_argument("--only-off", action="store_true", help="measure the gateway-off server alone")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the servers' logs and data dirs")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below on SIGTERM too
    if args.rate <= 0 or args.seconds <= 0 or args.warmup < 0 or args.block <= 0 or args.connections < 1:
        ap.error("--rate, --seconds, --block and --connections must be positive, --warmup >= 0")

    tmp = Path(tempfile.mkdtemp(prefix="lockgate-gw-bench-"))
    admin_key = "adm-" + secrets.token_urlsafe(24)
    servers: list[Server] = []
    on_error: str | None = None
    code = 0
    try:
        off_srv = Server("off", tmp / "off", [], args.server_arg)
        servers.append(off_srv)
        on_srv = None
        if not args.only_off:
            on_srv = Server("on", tmp / "on", ["--admin-key", admin_key, "--data-dir", str(tmp / "on" / "data")],
                            args.server_arg)
            servers.append(on_srv)
        print(f"starting servers (fake engine) ... logs under {tmp}", flush=True)
        off_srv.wait_healthy(args.startup_timeout)
        targets = [Target("off", off_srv, {}, first_model(off_srv.url, {}))]
        if on_srv is not None:
            try:
                on_srv.wait_healthy(args.startup_timeout)
                targets.append(setup_gateway(on_srv, admin_key, args.rate, args.connections))
            except SetupError as exc:
                on_error = str(exc)
                print(f"\nGATEWAY-ON SERVER UNAVAILABLE: {on_error}\n\nmeasuring the 'off' half alone.\n", flush=True)
                on_srv.stop()
        modes = " and ".join(t.name for t in targets)
        print(f"running {modes}: {args.rate:g} req/s, {args.warmup:g}+{args.seconds:g} s per mode ...", flush=True)
        samples, idle, meter = asyncio.run(generate_load(targets, args.rate, args.seconds, args.warmup, args.block,
                                                         args.connections, args.timeout, args.client,
                                                         args.idle_requests))
        res = summarize(samples, idle, targets, meter, args.rate, args.seconds)
        if len(targets) == 2:
            res["ledger"] = ledger_rows(targets[1], admin_key)
            res["on_requests_total"] = int(meter["sent_on"])
        res["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        res["on_unavailable"] = on_error
        print_report(res, args, os.cpu_count() or 0)
        if on_error is not None:
            print("\nRESULT: INCOMPLETE (only the gateway-off half ran; see GATEWAY-ON SERVER UNAVAILABLE above)")
            code = 3
        elif args.only_off:
            code = 0
        elif res["inconclusive"]:
            code = 4
        else:
            code = 0 if res["pass"] else 1
        if args.json:
            args.json.write_text(json.dumps(res, indent=2, default=str))
            print(f"wrote {args.json}")
    except SetupError as exc:
        print(f"\nSETUP FAILED: {exc}", file=sys.stderr)
        code = 2
    finally:
        for s in servers:
            s.stop()
        if args.keep or code == 2:
            print(f"server logs kept under {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
