"""Which PostgreSQL driver, and which interface shape, for the store: measured, not guessed.

    .venv/bin/python benchmarks/pg_driver.py [--n 3000] [--concurrency 16]

Starts a throwaway PostgreSQL (lockgate/bench/pgserver.py, durable defaults) and
times, from an asyncio loop as the server runs them, `--n` round trips with
`--concurrency` in flight:
- psycopg3 (sync) on a thread pool: what store/postgres.py does, one code path
  shared with the CLI; a round trip releases the GIL;
- asyncpg on the event loop (needs `pip install asyncpg`; skipped without it);
- the store's own `charge_requests` and `admit` (one transaction of a few
  statements each), through AsyncStore.hot, as a request pays them.
Prints per-call latency (p50/p99) and CPU per call of this process (what an
API process pays), and the ratio asyncpg/psycopg.
"""
from __future__ import annotations

import argparse
import asyncio
import resource
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from lockgate.bench.pgserver import PgServer
from lockgate.stats import percentile


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def timed(n: int, conc: int, call) -> dict[str, float]:  # noqa: ANN001
    lat: list[float] = []
    sem = asyncio.Semaphore(conc)

    async def one(i: int) -> None:
        async with sem:
            t = time.perf_counter()
            await call(i)
            lat.append(time.perf_counter() - t)

    c0, t0 = cpu_s(), time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(n)))
    wall, cpu = time.perf_counter() - t0, cpu_s() - c0
    return {"p50_ms": percentile(lat, 50) * 1e3, "p99_ms": percentile(lat, 99) * 1e3,
            "cpu_ms_per_call": cpu / n * 1e3, "calls_per_s": n / wall}


async def main(args: argparse.Namespace) -> None:
    import psycopg

    from lockgate.store.models import Reservation, Tenant
    from lockgate.store.postgres import PostgresStore
    from lockgate.store.shared_ops import AdmitRequest
    from lockgate.store.writer import AsyncStore

    with PgServer() as pg:
        url = pg.create_database("bench")
        results: dict[str, dict[str, float]] = {}
        pool = ThreadPoolExecutor(args.concurrency)
        conns = [psycopg.connect(url, autocommit=True) for _ in range(args.concurrency)]
        free = list(conns)
        loop = asyncio.get_running_loop()

        def q(_: int) -> None:
            c = free.pop()
            try:
                c.execute("SELECT 1").fetchone()
            finally:
                free.append(c)

        results["psycopg sync + threads: SELECT 1"] = await timed(
            args.n, args.concurrency, lambda i: loop.run_in_executor(pool, q, i))
        try:
            import asyncpg
        except ImportError:
            asyncpg = None
        if asyncpg is not None:
            apool = await asyncpg.create_pool(url, min_size=args.concurrency, max_size=args.concurrency)

            async def aq(_: int) -> None:
                async with apool.acquire() as c:
                    await c.fetchval("SELECT 1")

            results["asyncpg on the loop: SELECT 1"] = await timed(args.n, args.concurrency, aq)
            await apool.close()
        store = PostgresStore(url, pool_size=args.concurrency)
        store.create_tenant(Tenant(id="t", name="t"), "bench")
        astore = AsyncStore(store, checkpoint_interval_s=None, hot_threads=args.concurrency)
        scopes = [("t:t", 10**9), ("k:k", 10**9)]
        results["store.charge_requests (rpm, 2 buckets)"] = await timed(
            args.n, args.concurrency, lambda i: astore.hot(store.charge_requests, scopes))

        def adm(i: int):  # noqa: ANN202
            r = Reservation(uuid.uuid4().hex, "t", "k", "m", 0.001, 10, instance_id="i")
            return astore.hot(store.admit, AdmitRequest(r, 1e9, "total", None, 10**6, 10**6, [("t:t", 10**9)]))

        results["store.admit (concurrency, tpm, budget, row)"] = await timed(args.n, args.concurrency, adm)
        await astore.aclose()
        store.close()
        for c in conns:
            c.close()
    print(f"{'call':48s} {'p50 ms':>8s} {'p99 ms':>8s} {'CPU ms/call':>12s} {'calls/s':>9s}")
    for name, r in results.items():
        print(f"{name:48s} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f} {r['cpu_ms_per_call']:12.3f} {r['calls_per_s']:9.0f}")
    a, p = results.get("asyncpg on the loop: SELECT 1"), results["psycopg sync + threads: SELECT 1"]
    if a:
        print(f"asyncpg / psycopg: CPU per call {a['cpu_ms_per_call'] / p['cpu_ms_per_call']:.2f}x, "
              f"p50 {a['p50_ms'] / p['p50_ms']:.2f}x")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=16)
    asyncio.run(main(ap.parse_args()))
