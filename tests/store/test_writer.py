"""AsyncStore: one writer thread, FIFO, group commit, every future resolves, close flushes."""
from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lockgate.store.models import Reservation, Tenant, UsageQuery, UsageRecord
from lockgate.store.sqlite import SQLiteStore, open_store
from lockgate.store.writer import AsyncStore, StoreClosed


def _usage(rid: str, cost: float = 1.0) -> UsageRecord:
    return UsageRecord(rid, "ten_a", None, "m1", 1, 1, 0, None, None, None, "stop", 200, cost)


def _res(rid: str) -> Reservation:
    return Reservation(rid, "ten_a", None, "m1", 1.0, 1)


class CountingStore(SQLiteStore):
    """Counts transactions the writer opens (no mocking of sqlite: a real file underneath)."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.batches = 0
        self.threads: set[str] = set()

    def write_batch(self, reservations, checkpoints, records) -> None:
        self.batches += 1
        self.threads.add(threading.current_thread().name)
        time.sleep(0.002)  # a commit that takes a moment, as on a real disk
        super().write_batch(reservations, checkpoints, records)


def test_group_commit_merges_concurrent_calls(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "db")
    astore = AsyncStore(store)
    n = 200

    async def one(i: int) -> None:
        await astore.add_reservations([_res(f"r{i}")])
        await astore.checkpoint_reservations([(f"r{i}", 3, 1)])
        await astore.settle([_usage(f"r{i}")])

    async def main() -> None:
        await asyncio.gather(*(one(i) for i in range(n)))

    asyncio.run(main())
    assert astore.batched_calls == 3 * n
    assert store.batches == astore.transactions < n  # far fewer commits than calls
    assert store.threads == {"lockgate-store-writer"}
    assert store.list_reservations() == []
    assert store.spent_usd("ten_a", None) == pytest.approx(n)
    astore.close()
    store.close()


def test_window_gathers_sequential_callers(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "db")
    astore = AsyncStore(store, window_s=0.2)

    async def main() -> None:
        tasks = []
        for i in range(10):  # arriving one by one, 5 ms apart
            tasks.append(astore.settle([_usage(f"r{i}")]))
            await asyncio.sleep(0.005)
        await asyncio.gather(*tasks)

    asyncio.run(main())
    assert store.batches <= 2 and astore.batched_calls == 10
    astore.close()
    store.close()


def test_call_runs_any_method_in_order_and_returns_or_raises(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    astore = AsyncStore(store)

    async def main() -> None:
        t = await astore.call(store.create_tenant, Tenant(id="ten_a", name="a"), "cli")
        assert t.id == "ten_a"
        # FIFO: the settle queued before the read is visible to it
        fut = astore.settle([_usage("r1", 2.5)])  # queued at the call, before the read below
        spent = await astore.call(store.spent_usd, "ten_a", None)
        await fut
        assert spent == pytest.approx(2.5)
        rows = await astore.call(store.query_usage, UsageQuery(tenant_id="ten_a"))
        assert len(rows) == 1
        with pytest.raises(KeyError):
            await astore.call(store.update_tenant, Tenant(id="nope", name="x"), {}, "cli")
        assert await astore.call(lambda *, x: x * 2, x=21) == 42

    asyncio.run(main())
    astore.close()
    store.close()


def test_one_bad_call_in_a_batch_fails_alone(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    astore = AsyncStore(store, window_s=0.05)
    bad = _usage("bad")
    bad.finish_reason = None  # type: ignore[assignment]  # NOT NULL violated

    async def main() -> list:
        return await asyncio.gather(astore.settle([_usage("ok1")]), astore.settle([bad]),
                                    astore.settle([_usage("ok2")]), return_exceptions=True)

    results = asyncio.run(main())
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], Exception)
    assert {r["request_id"] for r in store.query_usage(UsageQuery())} == {"ok1", "ok2"}
    astore.close()
    store.close()


def test_close_flushes_pending_and_cancelled_callers_still_write(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "db")
    astore = AsyncStore(store)

    async def main() -> None:
        tasks = [asyncio.ensure_future(astore.settle([_usage(f"r{i}")])) for i in range(50)]
        for t in tasks[::2]:
            t.cancel()  # clients that went away
        astore.submit_nowait("add_reservations", [_res("live")])
        await astore.aclose()
        await asyncio.gather(*tasks, return_exceptions=True)
        with pytest.raises(StoreClosed):
            await astore.settle([_usage("late")])

    asyncio.run(main())
    assert len(store.query_usage(UsageQuery())) == 50
    assert [r.request_id for r in store.list_reservations()] == ["live"]
    store.close()


def test_the_event_loop_is_not_blocked_by_a_slow_write(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    astore = AsyncStore(store)

    def slow() -> str:
        time.sleep(0.3)
        return "done"

    async def main() -> None:
        fut = asyncio.ensure_future(astore.call(slow))
        t0 = time.monotonic()
        ticks = 0
        while not fut.done():
            await asyncio.sleep(0.01)
            ticks += 1
        assert fut.result() == "done"
        assert ticks >= 10 and time.monotonic() - t0 >= 0.25

    asyncio.run(main())
    astore.close()
    store.close()


class CheckpointLog(SQLiteStore):
    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.log: list[tuple[str, int]] = []

    def checkpoint(self, mode: str = "PASSIVE") -> tuple[int, int, int]:
        r = super().checkpoint(mode)
        self.log.append((threading.current_thread().name, r[1]))
        return r


def test_checkpoints_run_off_the_writer_and_the_wal_restarts(tmp_path: Path) -> None:
    store = CheckpointLog(tmp_path / "db")
    astore = AsyncStore(store, checkpoint_interval_s=0.02, wal_restart_pages=20)

    async def main() -> None:
        assert await astore.call(lambda: store._conn().execute("PRAGMA wal_autocheckpoint").fetchone()[0]) == 0
        for i in range(150):  # steady load: a checkpoint from the side thread alone never catches up
            await astore.settle([_usage(f"r{i}")])
            await asyncio.sleep(0.002)

    asyncio.run(main())
    astore.close()
    bg = [n for t, n in store.log if t == "lockgate-store-checkpoint"]
    assert len(bg) >= 3 and astore.checkpoints == len(bg)
    assert any(t == "lockgate-store-writer" for t, _ in store.log)  # the finishing step
    assert any(b < a for a, b in zip(bg, bg[1:]))  # the WAL started over (frame count went down)
    assert len(store.query_usage(UsageQuery(limit=1000))) == 150
    store.close()


def test_a_killed_process_loses_no_committed_reservation(tmp_path: Path) -> None:
    code = f"""
import asyncio, os, signal
from lockgate.store.sqlite import open_store
from lockgate.store.writer import AsyncStore
from lockgate.store.models import Reservation
store = open_store({str(tmp_path)!r})
astore = AsyncStore(store)
async def main():
    await asyncio.gather(*(astore.add_reservations([Reservation(f"r{{i}}", "ten_a", None, "m1", 1.0, 5)])
                           for i in range(20)))
    await astore.checkpoint_reservations([("r3", 17, 2)])
    print("durable", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # no close, no flush, no atexit
asyncio.run(main())
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == -9 and r.stdout.strip() == "durable", r.stderr
    store = open_store(tmp_path)
    live = {x.request_id: x for x in store.list_reservations()}
    assert len(live) == 20 and live["r3"].completion_tokens == 17 and live["r3"].cached_tokens == 2
    store.close()
