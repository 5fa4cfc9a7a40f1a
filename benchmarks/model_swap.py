"""A model swap under steady load: hot-load a new version, canary it at 10%, promote it, unload
the old one, and see what the clients saw in each window.

    .venv/bin/python benchmarks/model_swap.py [--engine fake|model] [--rate R] [--seconds S]
                                              [--max-tokens N] [--new-quantization int8] [--json out.json]

One real server (`python -m lockgate.server`, keyed mode) starts with `smol@v1`. Poisson
arrivals of streamed completions (each from its own `user`, so the split spreads them)
run throughout; meanwhile the script:
1. before:    measures `--seconds`;
2. load:      POSTs `smol@v2` and waits until it is ready (loaded and warmed);
3. canary:    PATCHes traffic to v1 90 / v2 10 and measures `--seconds`;
4. promoted:  PATCHes v2 to 100, DELETEs v1 (drained, then unloaded) and measures `--seconds`.
A request counts in the window it started in. Per window: requests, errors (any non-200 or
an error event in the stream), time to first token p50/p99, and the share served by v2.
Targets (issue 10): no request fails, and TTFT p99 during the load at most 1.2x before.

Engines: `fake` (default): both versions without a model (`--load-format fake`, 20 ms per
step): what the server itself costs, loading included. `model`: the embedded SmolLM2-135M
for real, one thread per engine (`--num-threads 1`), v2 int8 by default: on a 2-core
machine the new engine's load competes for CPU with the serving one.
Exit status: 0 PASS, 1 FAIL, 2 setup failed.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from lockgate.bench.procs import ServerProcess
from lockgate.stats import percentile

ADMIN = "model-swap-admin"
MODEL = "smol"
ENGINES = {
    "fake": {"server": ["--load-format", "fake", "--fake-step-delay", "0.02"], "new": {"load_format": "fake",
             "fake_step_delay_s": 0.02}, "rate": 8.0, "max_tokens": 32},
    # No SLO admission: with one thread the 2 s TTFT target of the default class is near what one
    # request takes, and the subject here is the swap, not admission.
    "model": {"server": ["--num-threads", "1", "--no-slo-admission"], "new": {"num_threads": 1}, "rate": 0.5,
              "max_tokens": 16},
}
WINDOWS = ("before", "load", "canary", "promoted")


@dataclass(slots=True)
class Result:
    start: float
    ttft: float | None
    ok: bool
    version: str | None
    error: str | None = None


async def one(client: httpx.AsyncClient, key: str, i: int, max_tokens: int, results: list[Result]) -> None:
    t0 = time.monotonic()
    body = {"model": MODEL, "prompt": f"Request {i}: tell me a story about the sea", "max_tokens": max_tokens,
            "stream": True, "user": f"user-{i}", "ignore_eos": True}
    ttft, version, err = None, None, None
    try:
        async with client.stream("POST", "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                                 timeout=300) as r:
            version = r.headers.get("x-lockgate-model-version")
            if r.status_code != 200:
                err = f"{r.status_code} {(await r.aread())[:200]!r}"
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                if '"error"' in line:
                    err = line[:200]
                elif ttft is None and '"text":""' not in line.replace(" ", ""):
                    ttft = time.monotonic() - t0
    except httpx.HTTPError as exc:
        err = repr(exc)
    results.append(Result(t0, ttft, err is None, version, err))


async def load(base: str, key: str, rate: float, max_tokens: int, stop: asyncio.Event, results: list[Result]) -> None:
    rng = random.Random(7)
    async with httpx.AsyncClient(base_url=base, limits=httpx.Limits(max_connections=512)) as client:
        tasks: set[asyncio.Task[None]] = set()
        i = 0
        next_at = time.monotonic()
        while not stop.is_set():
            next_at += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            t = asyncio.create_task(one(client, key, i, max_tokens, results))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
            i += 1
        if tasks:
            await asyncio.gather(*tasks)


async def scenario(base: str, key: str, args: argparse.Namespace, engine: dict) -> tuple[dict[str, float], dict]:
    h = {"Authorization": f"Bearer {ADMIN}"}
    marks: dict[str, float] = {}
    results: list[Result] = []
    stop = asyncio.Event()
    runner = asyncio.create_task(load(base, key, args.rate, args.max_tokens, stop, results))
    info: dict = {}
    async with httpx.AsyncClient(base_url=base, headers=h, timeout=60) as admin:
        async def state(v: str) -> str | None:
            m = (await admin.get(f"/admin/models/{MODEL}")).json()
            return next((x["state"] for x in m["versions"] if x["version"] == v), None)

        await asyncio.sleep(args.warmup)
        marks["before"] = time.monotonic()
        await asyncio.sleep(args.seconds)
        marks["load"] = time.monotonic()
        new = {"name": MODEL, "version": "v2", "path": args.new_path, **engine["new"]}
        if args.new_quantization:
            new["quantization"] = args.new_quantization
        r = await admin.post("/admin/models", json=new)
        assert r.status_code == 202, r.text
        while (s := await state("v2")) in ("loading", "warming"):
            await asyncio.sleep(0.2)
        if s != "ready":
            raise RuntimeError(f"v2 did not load: {(await admin.get(f'/admin/models/{MODEL}')).text}")
        info["load_seconds"] = time.monotonic() - marks["load"]
        marks["canary"] = time.monotonic()
        r = await admin.patch(f"/admin/models/{MODEL}", json={"traffic": {"v1": 90, "v2": 10}})
        assert r.status_code == 200, r.text
        await asyncio.sleep(args.seconds)
        marks["promoted"] = time.monotonic()
        assert (await admin.patch(f"/admin/models/{MODEL}", json={"traffic": {"v2": 100}})).status_code == 200
        assert (await admin.delete(f"/admin/models/{MODEL}/versions/v1")).status_code == 202
        await asyncio.sleep(args.seconds)
        marks["end"] = time.monotonic()
        stop.set()
        await runner
        info["versions_after"] = [x["version"] for x in (await admin.get(f"/admin/models/{MODEL}")).json()["versions"]]
    return marks, {"results": results, **info}


def summarize(marks: dict[str, float], results: list[Result]) -> list[dict]:
    bounds = [(w, marks[w], marks[n]) for w, n in zip(WINDOWS, (*WINDOWS[1:], "end"))]
    rows = []
    for w, a, b in bounds:
        rs = [r for r in results if a <= r.start < b]
        ttfts = [r.ttft for r in rs if r.ok and r.ttft is not None]
        rows.append({"window": w, "seconds": round(b - a, 1), "requests": len(rs),
                     "errors": sum(not r.ok for r in rs), "ttft_p50_s": percentile(ttfts, 50, empty=None),
                     "ttft_p99_s": percentile(ttfts, 99, empty=None),
                     "v2_share": round(sum(r.version == "v2" for r in rs) / len(rs), 3) if rs else None,
                     "error_samples": [r.error for r in rs if not r.ok][:3]})
    return rows


def start_server(args: argparse.Namespace, engine: dict, data: Path) -> ServerProcess:
    return ServerProcess(["--admin-key", ADMIN, "--data-dir", str(data), "--model", f"{MODEL}@v1=default",
                          "--request-log", "off", "--drain-timeout", "60", *engine["server"]],
                         data / "server.log", timeout=300)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=sorted(ENGINES), default="fake")
    p.add_argument("--rate", type=float, help="requests per second (default: per engine)")
    p.add_argument("--seconds", type=float, default=20.0, help="length of the before/canary/promoted windows")
    p.add_argument("--warmup", type=float, default=5.0)
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--new-quantization", choices=["int8", "int4"], help="v2's quantization (model engine: int8)")
    p.add_argument("--new-path", default="default",
                   help="v2's checkpoint (default: the embedded model, as v1: its tokenizer is shared, not reloaded)")
    p.add_argument("--json", help="write the windows and settings here")
    args = p.parse_args()
    engine = ENGINES[args.engine]
    args.rate = args.rate or engine["rate"]
    args.max_tokens = args.max_tokens or engine["max_tokens"]
    if args.engine == "model" and args.new_quantization is None:
        args.new_quantization = "int8"
    data = Path(tempfile.mkdtemp(prefix="model-swap-"))
    srv = None
    try:
        srv = start_server(args, engine, data)
        base = srv.base_url
        t = httpx.post(f"{base}/admin/tenants", json={"name": "load"}, headers={"Authorization": f"Bearer {ADMIN}"})
        key = httpx.post(f"{base}/admin/tenants/{t.json()['id']}/keys", json={"name": "k"},
                         headers={"Authorization": f"Bearer {ADMIN}"}).json()["key"]
        marks, out = asyncio.run(scenario(base, key, args, engine))
    except Exception as exc:  # noqa: BLE001
        print(f"setup failed: {exc}", file=sys.stderr)
        return 2
    finally:
        if srv is not None:
            srv.stop(signal.SIGTERM, timeout=60)
        shutil.rmtree(data, ignore_errors=True)
    rows = summarize(marks, out["results"])
    before = rows[0]["ttft_p99_s"]
    print(f"engine {args.engine}, {args.rate:g} req/s, {args.max_tokens} tokens each, v2 ({args.new_path}"
          f"{', ' + args.new_quantization if args.new_quantization else ''}) loaded in {out['load_seconds']:.1f} s")
    print(f"{'window':<10} {'s':>6} {'requests':>8} {'errors':>6} {'TTFT p50':>9} {'TTFT p99':>9} {'p99/before':>10} "
          f"{'on v2':>6}")
    for r in rows:
        def ms(x: float | None) -> str:
            return "-" if x is None else f"{x * 1000:.0f} ms"
        ratio = "-" if not before or r["ttft_p99_s"] is None else f"{r['ttft_p99_s'] / before:.2f}x"
        print(f"{r['window']:<10} {r['seconds']:>6} {r['requests']:>8} {r['errors']:>6} {ms(r['ttft_p50_s']):>9} "
              f"{ms(r['ttft_p99_s']):>9} {ratio:>10} {r['v2_share']!s:>6}")
    errors = sum(r["errors"] for r in rows)
    load_ratio = rows[1]["ttft_p99_s"] / before if before and rows[1]["ttft_p99_s"] else None
    passed = errors == 0 and load_ratio is not None and load_ratio <= 1.2 and out["versions_after"] == ["v2"]
    print(f"errors {errors}; TTFT p99 during load {load_ratio and f'{load_ratio:.2f}'}x before (target <= 1.2x); "
          f"versions after: {out['versions_after']}: {'PASS' if passed else 'FAIL'}")
    for r in rows:
        for e in r["error_samples"]:
            print(f"  {r['window']}: {e}")
    if args.json:
        Path(args.json).write_text(json.dumps({"settings": vars(args), "load_seconds": out["load_seconds"],
                                               "windows": rows, "passed": passed}, indent=2))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
