"""Tail latency and cost from the gateway's policies (issue 27): hedged requests, fallbacks under
overload and the response cache, in one run on fake-engine servers.

    .venv/bin/python benchmarks/tail.py [--requests 2000] [--concurrency 16] [--hedge-budget 0.1]
        [--overload-seconds 20] [--zipf-requests 2000] [--zipf-prompts 1000] [--zipf-s 1.1] [--out DIR]

The fake engine (`--load-format fake`) runs no model: each engine step sleeps a fixed time, so a
server's costs are known and written down here:

- Hedging. Model `chat` has two versions taking half the traffic each (sticky on the request's
  `user`, random per request). Version `a` stalls 5% of its requests for 2 s (`fake_stall_fraction
  0.05`, `fake_stall_s 2`: their outputs reach the API process 2 s late, as from a replica with GC
  pauses or a noisy neighbour); `b` never stalls. Each step sleeps 10 ms; a request asks for 32
  tokens (greedy, not streamed), so it takes about 0.35 s. `--concurrency` closed-loop clients
  send `--requests` requests without hedging (`x-lockgate-hedge: false`) and as many with it
  (`true`), alternating in 4 rounds of each (a drift of the machine lands on both alike), after a
  warm-up that fills the class's TTFT window. Target: with hedging, p99 at most 1.5x p50, at no
  more than 10% extra load (hedge copies sent / requests; `--hedge-budget` caps it).
- Fallbacks under overload. Models `solo` and `primary` are the same engine (4 requests at once,
  20 ms steps, 16 tokens each: about 12 req/s); `primary` falls back to `backup` (the same again),
  `solo` has no fallback. Poisson arrivals at twice `solo`'s measured capacity for
  `--overload-seconds` each, to `solo`, then to `primary`. SLO admission refuses what cannot start
  within the class's TTFT target (429 slo_unattainable / queue_full); with fallbacks those go to
  `backup`. Goodput: requests answered 200 per second.
- Response cache. A second server with `--response-cache 64MiB`: `--zipf-requests` greedy requests
  over `--zipf-prompts` distinct prompts drawn from a Zipf(`--zipf-s`) distribution (repeated
  questions, as real traffic has). Hit rate (`x-lockgate-cache: hit`), and the cost saved at
  list prices of $0.50 / $1.50 per 1M prompt / completion tokens with the default cache-hit
  price of 0: the hits' token cost over the cost of running every request.

The load generator is this asyncio process (httpx), sharing the machine's cores with the servers.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from lockgate.bench.procs import ServerProcess, parse_metrics
from lockgate.stats import percentile

PRICE_PROMPT, PRICE_COMPLETION = 0.50, 1.50  # USD per 1M tokens (list prices for the cost figure)
SLOW = {"max_num_seqs": 4, "fake_step_delay_s": 0.02}
CONFIG = {"models": [
    {"name": "chat", "versions": [
        {"version": "a", "traffic": 50, "engine": {"fake_step_delay_s": 0.01, "fake_stall_fraction": 0.05,
                                                   "fake_stall_s": 2.0}},
        {"version": "b", "traffic": 50, "engine": {"fake_step_delay_s": 0.01}}]},
    {"name": "solo", "versions": [{"version": "v1", "engine": SLOW}]},
    {"name": "primary", "versions": [{"version": "v1", "engine": SLOW}], "fallbacks": ["backup"]},
    {"name": "backup", "versions": [{"version": "v1", "engine": SLOW}]},
]}


@dataclass
class Result:
    latencies: list[float] = field(default_factory=list)  # seconds, successful requests
    statuses: dict[int, int] = field(default_factory=dict)
    models: dict[str, int] = field(default_factory=dict)
    cache: dict[str, int] = field(default_factory=dict)
    usage: list[tuple[int, int, bool]] = field(default_factory=list)  # (prompt, completion, hit)

    def add(self, r: httpx.Response, took: float) -> None:
        self.statuses[r.status_code] = self.statuses.get(r.status_code, 0) + 1
        if r.status_code != 200:
            return
        self.latencies.append(took)
        body = r.json()
        self.models[body["model"]] = self.models.get(body["model"], 0) + 1
        state = r.headers.get("x-lockgate-cache", "none")
        self.cache[state] = self.cache.get(state, 0) + 1
        u = body["usage"]
        self.usage.append((u["prompt_tokens"], u["completion_tokens"], state == "hit"))


def body(model: str, text: str, max_tokens: int, user: str | None = None) -> dict:
    b = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
         "temperature": 0}
    if user is not None:
        b["user"] = user
    return b


async def send(client: httpx.AsyncClient, payload: dict, out: Result, headers: dict[str, str] | None = None) -> None:
    t0 = time.perf_counter()
    try:
        r = await client.post("/v1/chat/completions", json=payload, headers=headers)
    except httpx.HTTPError:
        out.statuses[0] = out.statuses.get(0, 0) + 1
        return
    out.add(r, time.perf_counter() - t0)


async def closed_loop(client: httpx.AsyncClient, n: int, concurrency: int, make: callable, out: Result,
                      headers: dict[str, str] | None = None) -> None:
    left = iter(range(n))

    async def worker() -> None:
        for i in left:
            await send(client, make(i), out, headers)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def metric(text: str, name: str, **labels: str) -> float:
    want = {f'{k}="{v}"' for k, v in labels.items()}
    total = 0.0
    for key, value in parse_metrics(text).items():
        if key.startswith(name + "{") and want <= set(key[len(name) + 1:-1].split(",")):
            total += value
    return total


def pct(values: list[float], q: float) -> float:
    return percentile(values, q) if values else float("nan")


async def hedging(srv: ServerProcess, args: argparse.Namespace) -> dict:
    rng = random.Random(1)
    make = lambda i: body("chat", f"question {rng.randrange(10**9)}", 32, user=f"u{rng.randrange(10**9)}")  # noqa: E731
    off, on = Result(), Result()
    async with httpx.AsyncClient(base_url=srv.base_url, timeout=60) as client:
        await closed_loop(client, 300, args.concurrency, make, Result(), {"x-lockgate-hedge": "false"})  # warm-up
        sent_before = metric(srv.metrics_text(), "lockgate:hedged_requests_total", outcome="sent")
        per_round = args.requests // 4
        for _ in range(4):
            await closed_loop(client, per_round, args.concurrency, make, off, {"x-lockgate-hedge": "false"})
            await closed_loop(client, per_round, args.concurrency, make, on, {"x-lockgate-hedge": "true"})
        text = srv.metrics_text()
    sent = metric(text, "lockgate:hedged_requests_total", outcome="sent") - sent_before
    won = metric(text, "lockgate:hedged_requests_total", outcome="won")
    skipped = metric(text, "lockgate:hedged_requests_total", outcome="skipped")
    rows = {}
    for name, r in (("without hedging", off), ("with hedging", on)):
        p50, p99, p999 = (pct(r.latencies, q) for q in (50, 99, 99.9))
        rows[name] = {"requests": sum(r.statuses.values()), "ok": len(r.latencies), "p50_s": p50, "p99_s": p99,
                      "p99.9_s": p999, "p99/p50": p99 / p50}
    rows["with hedging"]["extra_load"] = sent / max(1, sum(on.statuses.values()))
    rows["with hedging"]["hedges_won"] = won
    rows["with hedging"]["hedges_skipped"] = skipped
    return rows


async def overload(srv: ServerProcess, args: argparse.Namespace) -> dict:
    async with httpx.AsyncClient(base_url=srv.base_url, timeout=120,
                                 limits=httpx.Limits(max_connections=1000)) as client:
        cap = Result()
        t0 = time.perf_counter()
        await closed_loop(client, 60, 4, lambda i: body("solo", f"cap {i}", 16), cap)
        capacity = len(cap.latencies) / (time.perf_counter() - t0)
        rate = 2.0 * capacity
        rows = {"capacity_req_s": capacity, "offered_req_s": rate}
        for model in ("solo", "primary"):
            rng = random.Random(2)
            out = Result()
            tasks = []
            start = time.perf_counter()
            at = 0.0
            i = 0
            while at < args.overload_seconds:
                at += rng.expovariate(rate)
                delay = start + at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(send(client, body(model, f"over {model} {i}", 16), out)))
                i += 1
            await asyncio.gather(*tasks)
            wall = time.perf_counter() - start
            rows["with fallbacks" if model == "primary" else "without fallbacks"] = {
                "sent": i, "ok": len(out.latencies), "goodput_req_s": len(out.latencies) / wall,
                "statuses": out.statuses, "served_by": out.models, "p99_s": pct(out.latencies, 99)}
        return rows


async def cache(srv: ServerProcess, args: argparse.Namespace) -> dict:
    rng = random.Random(3)
    weights = [1.0 / (k ** args.zipf_s) for k in range(1, args.zipf_prompts + 1)]
    picks = rng.choices(range(args.zipf_prompts), weights=weights, k=args.zipf_requests)
    out = Result()
    async with httpx.AsyncClient(base_url=srv.base_url, timeout=60) as client:
        await closed_loop(client, len(picks), args.concurrency,
                          lambda i: body("chat", f"frequently asked question number {picks[i]}", 32), out)
    cost = [(p * PRICE_PROMPT + c * PRICE_COMPLETION) / 1e6 for p, c, _ in out.usage]
    saved = sum(x for x, (_p, _c, hit) in zip(cost, out.usage) if hit)
    hits = out.cache.get("hit", 0)
    hit_lat = [t for t, (_p, _c, h) in zip(out.latencies, out.usage) if h]
    miss_lat = [t for t, (_p, _c, h) in zip(out.latencies, out.usage) if not h]
    if len(out.latencies) != len(picks):
        raise RuntimeError(f"cache phase: {out.statuses}")
    return {"requests": len(picks), "distinct": len(set(picks)), "hit_rate": hits / max(1, len(out.latencies)),
            "ideal_hit_rate": 1 - len(set(picks)) / len(picks), "cost_without_cache_usd": sum(cost),
            "cost_saved_usd": saved, "cost_saved_share": saved / max(1e-12, sum(cost)),
            "p50_hit_s": pct(hit_lat, 50), "p50_miss_s": pct(miss_lat, 50)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--hedge-budget", type=float, default=0.10)
    ap.add_argument("--overload-seconds", type=float, default=20.0)
    ap.add_argument("--zipf-requests", type=int, default=2000)
    ap.add_argument("--zipf-prompts", type=int, default=1000)
    ap.add_argument("--zipf-s", type=float, default=1.1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lockgate-tail-"))
    (tmp / "models.json").write_text(json.dumps(CONFIG))
    common = ["--load-format", "fake", "--num-kv-blocks", "2048", "--max-num-seqs", "64", "--request-log", "off"]
    results: dict = {}
    srv = ServerProcess(["--config", str(tmp / "models.json"), "--hedge-budget", str(args.hedge_budget), *common],
                        tmp / "policies.log")
    try:
        results["hedging"] = asyncio.run(hedging(srv, args))
        results["overload"] = asyncio.run(overload(srv, args))
    finally:
        srv.stop()
    srv = ServerProcess(["--response-cache", "64MiB", "--fake-step-delay", "0.01", "--served-model-name", "chat",
                         *common], tmp / "cache.log")
    try:
        results["cache"] = asyncio.run(cache(srv, args))
    finally:
        srv.stop()
    report(results)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "tail.json").write_text(json.dumps(results, indent=2))


def report(r: dict) -> None:
    h = r["hedging"]
    print("\n## Hedged requests (chat: version a stalls 5% of its requests for 2 s)")
    print("| | requests | p50 | p99 | p99.9 | p99/p50 |")
    print("|---|---|---|---|---|---|")
    for name, x in h.items():
        print(f"| {name} | {x['requests']} | {x['p50_s'] * 1000:.0f} ms | {x['p99_s'] * 1000:.0f} ms | "
              f"{x['p99.9_s'] * 1000:.0f} ms | {x['p99/p50']:.2f}x |")
    on = h["with hedging"]
    print(f"hedges won {on['hedges_won']:.0f}, skipped {on['hedges_skipped']:.0f} (budget or nowhere to go)")
    print(f"extra load: {on['extra_load']:.1%} (hedge copies / requests); target p99 <= 1.5x p50 at <= 10%: "
          f"{'met' if on['p99/p50'] <= 1.5 and on['extra_load'] <= 0.10 else 'NOT met'}")
    o = r["overload"]
    print(f"\n## Fallbacks at 2x overload (capacity {o['capacity_req_s']:.1f} req/s, offered {o['offered_req_s']:.1f})")
    print("| | sent | answered | goodput | statuses | served by |")
    print("|---|---|---|---|---|---|")
    for name in ("without fallbacks", "with fallbacks"):
        x = o[name]
        print(f"| {name} | {x['sent']} | {x['ok']} | {x['goodput_req_s']:.1f} req/s | {x['statuses']} | "
              f"{x['served_by']} |")
    ratio = o["with fallbacks"]["goodput_req_s"] / max(1e-9, o["without fallbacks"]["goodput_req_s"])
    print(f"goodput with / without fallbacks: {ratio:.2f}x")
    c = r["cache"]
    print(f"\n## Response cache (Zipf-distributed prompts: {c['distinct']} distinct in {c['requests']} requests)")
    print(f"hit rate {c['hit_rate']:.1%} (ideal {c['ideal_hit_rate']:.1%}); cost ${c['cost_without_cache_usd']:.6f} "
          f"without the cache, ${c['cost_saved_usd']:.6f} saved ({c['cost_saved_share']:.1%}); "
          f"p50 hit {c['p50_hit_s'] * 1000:.1f} ms vs miss {c['p50_miss_s'] * 1000:.1f} ms")


if __name__ == "__main__":
    main()
