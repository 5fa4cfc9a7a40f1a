"""The autoscaler's real run (the second part of benchmarks/autoscale.py): a live server whose
replicas are Ray actors (or local processes with `--local`), fake engines of known capacity, and a
step load 1x -> 4x -> 1x of one replica's capacity.

    .venv/bin/python benchmarks/autoscale.py --real [--local] [--phase-s 60] [--out DIR]

The replica: a fake engine core (no model) whose step sleeps `STEP_S`, at most `MAX_SEQS` requests
in its batch, every request `OUTPUT` tokens (ignore_eos): a request takes about (OUTPUT + 1) steps,
so one replica serves MAX_SEQS / ((OUTPUT + 1) * STEP_S) requests/s at most; 1x is `UNIT` of that
(a replica at 1x keeps its TTFT inside the interactive class's 0.5 s target). Requests are
`interactive`, streamed, from Poisson arrivals; the load generator is this asyncio process.

The version's autoscaler: min 1, max `MAX_REPLICAS`, an in-flight target of 75% of `MAX_SEQS`, the
default policy and panic window (6 s), a
stable window and scale-down cooldown of `STABLE_S` (the defaults, 60 s and 120 s, would not scale
down inside a 3-minute run; the simulator part runs the defaults).

Reported: per 10 s window the offered rate, replicas ready (sampled from /admin/models each second),
TTFT p95 and failures; the scale events; requests lost (accepted, then failed or cut short: must be
0; a 429 at admission is a refusal, counted apart); every replica's cold start (decision to ready:
core process start and model load, then the warm-up). A PNG timeline (load, replicas, TTFT p95).
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from lockgate.bench.procs import ServerProcess
from lockgate.stats import percentile

STEP_S = 0.02
MAX_SEQS = 4
OUTPUT = 24
UNIT = 0.6  # 1x: this fraction of one replica's most
MAX_REPLICAS = 6
STABLE_S = 30.0
PROMPT = "Tell me about the weather in the mountains today"
ADMIN = "sk-admin-autoscale-bench"


def replica_capacity() -> float:
    return MAX_SEQS / ((OUTPUT + 1) * STEP_S)


@dataclass
class Result:
    sent_at: float
    status: int = 0
    ttft_s: float | None = None
    error: str | None = None
    complete: bool = False


@dataclass
class Timeline:
    samples: list[tuple[float, int, int, int]] = field(default_factory=list)  # (t, ready, starting, desired)


def _config(tmp: Path, ray: bool) -> Path:
    version: dict[str, Any] = {
        "version": "v1", "path": "default",
        "engine": {"load_format": "fake", "fake_step_delay_s": STEP_S, "max_num_seqs": MAX_SEQS},
        "autoscale": {"min_replicas": 1, "max_replicas": MAX_REPLICAS, "stable_window_s": STABLE_S,
                      "scale_down_cooldown_s": STABLE_S, "interval_s": 1.0,
                      # A replica runs MAX_SEQS requests at once: its concurrency target (Knative's
                      # container concurrency) is 75% of that, not the default 16.
                      "target_in_flight": 0.75 * MAX_SEQS},
    }
    if ray:
        version["placement"] = {"num_cpus": 0.25}
    path = tmp / "autoscale-models.json"
    path.write_text(json.dumps({"models": [{"name": "step", "versions": [version]}]}))
    return path


async def _one(http: httpx.AsyncClient, t0: float, res: Result) -> None:
    body = {"model": "step", "prompt": PROMPT, "max_tokens": OUTPUT, "stream": True, "ignore_eos": True}
    try:
        async with http.stream("POST", "/v1/completions", json=body,
                               headers={"x-lockgate-priority": "interactive"}) as r:
            res.status = r.status_code
            if r.status_code != 200:
                res.error = (await r.aread()).decode(errors="replace")[:200]
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    res.complete = True
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    res.error = json.dumps(chunk["error"])[:200]
                    return
                if res.ttft_s is None and chunk.get("choices") and chunk["choices"][0].get("text"):
                    res.ttft_s = time.monotonic() - t0 - res.sent_at
    except httpx.HTTPError as exc:
        res.error = f"{type(exc).__name__}: {exc}"


async def _watch(admin: httpx.AsyncClient, t0: float, tl: Timeline, stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            v = (await admin.get("/admin/models/step")).json()["versions"][0]["replicas"]
            tl.samples.append((time.monotonic() - t0, v["ready"], v["starting"], v["desired"]))
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        await asyncio.sleep(1.0)


async def _drive(base_url: str, phases: list[tuple[float, float]], seed: int) -> tuple[list[Result], Timeline]:
    rng = random.Random(seed)
    results: list[Result] = []
    tl = Timeline()
    limits = httpx.Limits(max_connections=400, max_keepalive_connections=400)
    async with httpx.AsyncClient(base_url=base_url, timeout=30, headers={"Authorization": f"Bearer {ADMIN}"}) as a:
        tenant = (await a.post("/admin/tenants", json={"name": "bench", "priority": "interactive"})).json()
        key = (await a.post(f"/admin/tenants/{tenant['id']}/keys", json={"name": "bench"})).json()["key"]
    admin = httpx.AsyncClient(base_url=base_url, timeout=30, headers={"Authorization": f"Bearer {ADMIN}"})
    async with httpx.AsyncClient(base_url=base_url, timeout=120, limits=limits,
                                 headers={"Authorization": f"Bearer {key}"}) as http, admin:
        stop = asyncio.Event()
        t0 = time.monotonic()
        watcher = asyncio.create_task(_watch(admin, t0, tl, stop))
        tasks: list[asyncio.Task[None]] = []
        start = 0.0
        for duration, rate in phases:
            t = start
            while True:
                t += rng.expovariate(rate)
                if t >= start + duration:
                    break
                delay = t - (time.monotonic() - t0)
                if delay > 0:
                    await asyncio.sleep(delay)
                res = Result(sent_at=time.monotonic() - t0)
                results.append(res)
                tasks.append(asyncio.create_task(_one(http, t0, res)))
            start += duration
        await asyncio.gather(*tasks)
        await asyncio.sleep(2.0)
        stop.set()
        await watcher
    return results, tl


def _windows(results: list[Result], tl: Timeline, phases: list[tuple[float, float]], width: float = 10.0
             ) -> list[dict[str, Any]]:
    end = sum(d for d, _ in phases)
    rows = []
    t = 0.0
    while t < end:
        inside = [r for r in results if t <= r.sent_at < t + width]
        ttfts = [r.ttft_s for r in inside if r.ttft_s is not None]
        reps = [s[1] for s in tl.samples if t <= s[0] < t + width]
        rows.append({"t": t, "sent": len(inside), "rate": len(inside) / width,
                     "ttft_p95_s": percentile(ttfts, 95) if ttfts else None,
                     "refused_429": sum(r.status == 429 for r in inside),
                     "lost": sum(_lost(r) for r in inside),
                     "replicas_ready": max(reps) if reps else None})
        t += width
    return rows


def _lost(r: Result) -> bool:
    """Accepted and not completed: anything but a full stream or a refusal at admission."""
    return r.status != 429 and not (r.status == 200 and r.complete and r.error is None)


def real_run(out: Path, *, ray: bool = True, phase_s: float = 60.0, seed: int = 1) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    cap = replica_capacity()
    unit = UNIT * cap
    phases = [(phase_s, unit), (phase_s, 4 * unit), (phase_s, unit)]
    args = ["--config", str(_config(out, ray)), "--max-queued-requests", "4096", "--admin-key", ADMIN,
            "--data-dir", str(out / "data")]
    if ray:
        args += ["--ray", "local"]
    srv = ServerProcess(args, out / "autoscale-server.log")
    try:
        results, tl = asyncio.run(_drive(srv.base_url, phases, seed))
        model = httpx.get(f"{srv.base_url}/admin/models/step", timeout=30,
                          headers={"Authorization": f"Bearer {ADMIN}"}).json()
    finally:
        srv.stop()
    replicas = model["versions"][0]["replicas"]
    rows = _windows(results, tl, phases)
    ttfts = [r.ttft_s for r in results if r.ttft_s is not None]
    report = {
        "mode": "ray" if ray else "local", "replica_capacity_rps": cap, "unit_rps": unit,
        "phases": [{"seconds": d, "rate": r} for d, r in phases],
        "requests": len(results), "lost": sum(_lost(r) for r in results),
        "refused_429": sum(r.status == 429 for r in results),
        "interactive_within_0.5s": sum(t <= 0.5 for t in ttfts) / max(1, len(results)),
        "ttft_p95_s": percentile(ttfts, 95) if ttfts else None,
        "max_ready": max((s[1] for s in tl.samples), default=0),
        "scale_events": replicas.get("autoscale", {}).get("scale_events"),
        "cold_start_s": replicas.get("cold_start_s", []),
        "windows": rows,
        "errors": sorted({r.error for r in results if r.error})[:10],
    }
    (out / "autoscale-real.json").write_text(json.dumps(report, indent=2))
    report["png"] = str(_plot(out / "autoscale-real.png", rows, tl, phases))
    return report


def _plot(path: Path, rows: list[dict[str, Any]], tl: Timeline, phases: list[tuple[float, float]]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(3, 1, figsize=(9, 7), sharex=True)
    xs = [r["t"] + 5 for r in rows]
    a.step(xs, [r["rate"] for r in rows], where="mid")
    a.set_ylabel("requests/s")
    b.plot([s[0] for s in tl.samples], [s[1] for s in tl.samples], label="ready")
    b.plot([s[0] for s in tl.samples], [s[3] for s in tl.samples], label="desired", linestyle="--")
    b.set_ylabel("replicas")
    b.legend()
    c.plot(xs, [r["ttft_p95_s"] if r["ttft_p95_s"] is not None else float("nan") for r in rows], marker="o")
    c.axhline(0.5, color="grey", linestyle=":")
    c.set_ylabel("TTFT p95 (s)")
    c.set_xlabel("seconds")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def print_report(rep: dict[str, Any]) -> None:
    print(f"\nreal run ({rep['mode']}): one replica serves {rep['replica_capacity_rps']:.1f} req/s at most; "
          f"1x = {rep['unit_rps']:.1f} req/s")
    print(f"{'t(s)':>5} {'req/s':>6} {'ready':>5} {'TTFT p95':>9} {'429':>4} {'lost':>4}")
    for r in rep["windows"]:
        p95 = f"{r['ttft_p95_s']:.3f}" if r["ttft_p95_s"] is not None else "-"
        print(f"{r['t']:>5.0f} {r['rate']:>6.1f} {r['replicas_ready'] if r['replicas_ready'] is not None else '-':>5} "
              f"{p95:>9} {r['refused_429']:>4} {r['lost']:>4}")
    print(f"requests {rep['requests']}, lost {rep['lost']} (target 0), refused at admission {rep['refused_429']}, "
          f"interactive within 0.5 s {rep['interactive_within_0.5s']:.1%}, most replicas ready {rep['max_ready']}, "
          f"scale events {rep['scale_events']}")
    cold = rep["cold_start_s"]
    if cold:
        print(f"cold start (decision to ready), s: {', '.join(f'{x:.2f}' for x in cold)}")
    if rep["errors"]:
        print("errors:", *rep["errors"], sep="\n  ")
    print(f"timeline: {rep['png']}")
