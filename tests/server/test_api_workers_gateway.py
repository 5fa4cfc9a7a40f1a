"""The gateway behind `--api-workers 2` on the embedded SQLite store: two API processes write one
file, and a tenant's budget and rpm hold for the server as a whole, whichever worker a request
lands on (the store decides: gateway/shared.py); the ledger has one row per admitted request."""
from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.server.conftest import ServerProcess, start_server, wait_for

ADMIN = "workers-admin-key"
WORKER = "x-lockgate-worker"


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("workers_gw")
    s = start_server(tmp, "--load-format", "fake", "--fake-step-delay", "0.01", "--api-workers", "2",
                     "--admin-key", ADMIN, "--data-dir", str(tmp / "data"), "--no-slo-admission")
    s.data_dir = tmp / "data"  # type: ignore[attr-defined]
    seen: set[str] = set()

    def both_up() -> bool:
        with httpx.Client(timeout=5) as c:  # a connection of its own each time
            seen.add(c.get(f"{s.base_url}/health").headers.get(WORKER, ""))
        return {"0", "1"} <= seen

    assert wait_for(both_up, 30)
    yield s
    s.stop()


def _tenant(srv: ServerProcess, **body: Any) -> tuple[str, str]:
    c = httpx.Client(base_url=srv.base_url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30)
    tid = c.post("/admin/tenants", json={"name": f"t{time.monotonic_ns()}", **body}).json()["id"]
    key = c.post(f"/admin/tenants/{tid}/keys", json={"name": "k"}).json()["key"]
    return tid, key  # the other worker knows it at once (an unknown key makes it look: refresh_on_miss)


def _complete(srv: ServerProcess, key: str, **body: Any) -> httpx.Response:
    with httpx.Client(timeout=30) as c:  # a connection of its own: the kernel picks the worker
        return c.post(f"{srv.base_url}/v1/completions", headers={"Authorization": f"Bearer {key}"},
                      json={"prompt": [1], "max_tokens": 2, **body})


def _rows(srv: ServerProcess, tid: str) -> list[tuple]:
    with sqlite3.connect(srv.data_dir / "lockgate.db") as db:  # type: ignore[attr-defined]
        return db.execute("SELECT request_id, cost_usd FROM usage WHERE tenant_id = ?", (tid,)).fetchall()


def test_a_budget_for_four_admits_exactly_four_through_one_port(srv: ServerProcess) -> None:
    # The kernel picks the worker of each connection: a burst it happens to give to one worker
    # proves nothing across workers, so a fresh tenant's burst is tried again (each one exact).
    for _ in range(4):
        tid, key = _tenant(srv, budget_usd=0.046, budget_period="total",
                           prices={"*": {"prompt": 1000, "completion": 1000}})
        barrier = threading.Barrier(20)

        def one(_: int) -> httpx.Response:
            barrier.wait()
            return _complete(srv, key, max_tokens=10, ignore_eos=True)

        with ThreadPoolExecutor(20) as pool:
            rs = list(pool.map(one, range(20)))
        statuses = [r.status_code for r in rs]
        assert statuses.count(200) == 4 and statuses.count(429) == 16, statuses
        assert {r.json()["error"]["code"] for r in rs if r.status_code == 429} == {"budget_exceeded"}
        assert wait_for(lambda: len(_rows(srv, tid)) == 4, 10)
        assert sum(cost for _, cost in _rows(srv, tid)) == pytest.approx(4 * 0.011)
        if len({r.headers[WORKER] for r in rs}) == 2:
            break
    assert len({r.headers[WORKER] for r in rs}) == 2  # both workers answered


def test_rpm_holds_for_the_server_not_per_worker(srv: ServerProcess) -> None:
    _, key = _tenant(srv, rpm=6)
    rs = [_complete(srv, key) for _ in range(8)]
    assert [r.status_code for r in rs] == [200] * 6 + [429] * 2  # per worker, each would allow 6
    assert rs[-1].json()["error"]["code"] == "rate_limit_exceeded"
