"""Two gateway instances on one real PostgreSQL: limits, budgets and the ledger hold for their sum;
admin changes reach the other within 2 s; a SIGKILLed instance's requests are settled by the
other; a PostgreSQL outage gives 503 store_unavailable and service resumes by itself.

Fake engines: what is checked is accounting across processes, not the model's tokens."""
from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from lockgate.bench.pgserver import PgServer
from tests.server.conftest import ServerProcess, wait_for

ADMIN = "horizontal-admin-key"
FAKE = ["--load-format", "fake", "--fake-step-delay", "0.01", "--no-slo-admission", "--max-model-len", "1024"]
LEASE_S = 3  # LOCKGATE_LEASE_TIMEOUT_S: how soon a dead instance's requests are swept (60 s in production;
# leases renew, and sweeps run, every timeout/3 at most)


def _instance(tmp: Path, name: str, url: str, *extra: str) -> ServerProcess:
    env = {**os.environ, "LOCKGATE_LEASE_TIMEOUT_S": str(LEASE_S)}
    d = tmp / name
    d.mkdir()
    return ServerProcess([*FAKE, "--admin-key", ADMIN, "--store", url, "--data-dir", str(d / "data"), *extra],
                         d / "server.log", env=env)


class Pair:
    """Two instances, A and B, on one database (what a load balancer spreads requests over)."""

    def __init__(self, a: ServerProcess, b: ServerProcess, url: str) -> None:
        self.a, self.b, self.url = a, b, url
        self.admin_a = httpx.Client(base_url=a.base_url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)

    def tenant(self, **body: Any) -> tuple[str, str]:
        r = self.admin_a.post("/admin/tenants", json={"name": f"t{time.monotonic_ns()}", **body})
        assert r.status_code == 201, r.text
        tid = r.json()["id"]
        r = self.admin_a.post(f"/admin/tenants/{tid}/keys", json={"name": "k"})
        assert r.status_code == 201, r.text
        return tid, r.json()["key"]  # B knows it at once: an unknown key makes it look (refresh_on_miss)

    def sql(self, query: str, *args: Any) -> list[tuple]:
        with psycopg.connect(self.url, autocommit=True) as c:
            return c.execute(query, args).fetchall()

    def rows(self, tid: str) -> list[tuple]:
        return self.sql("SELECT request_id, finish_reason, cost_usd, completion_tokens FROM usage "
                        "WHERE tenant_id = %s", tid)

    def open_reservations(self, tid: str) -> int:
        return self.sql("SELECT count(*) FROM reservations WHERE tenant_id = %s", tid)[0][0]


@pytest.fixture(scope="module")
def pair(pg_server: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pair]:
    url = pg_server.create_database(f"horiz{os.getpid()}")
    tmp = tmp_path_factory.mktemp("horizontal")
    with ThreadPoolExecutor(2) as pool:  # both start at once: migrations run once, under the lock
        a_f, b_f = pool.submit(_instance, tmp, "a", url), pool.submit(_instance, tmp, "b", url)
        a, b = a_f.result(), b_f.result()
    yield Pair(a, b, url)
    a.stop()
    b.stop()


def _complete(srv: ServerProcess, key: str, **body: Any) -> httpx.Response:
    return httpx.post(f"{srv.base_url}/v1/completions", headers={"Authorization": f"Bearer {key}"},
                      json={"prompt": [1], "max_tokens": 2, **body}, timeout=60)


def _error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code, r.text


def test_both_instances_started_together_migrated_once(pair: Pair) -> None:
    versions = [v for (v,) in pair.sql("SELECT version FROM lockgate_schema ORDER BY version")]
    assert versions == list(range(1, len(versions) + 1))  # each migration once, in order
    live = pair.sql("SELECT count(*) FROM instances")[0][0]
    assert live == 2


def test_a_budget_for_four_admits_exactly_four_across_both(pair: Pair) -> None:
    # Worst case per request: 1 prompt + 10 completion tokens at $1,000 per 1M = $0.011; $0.046 covers 4.
    tid, key = pair.tenant(budget_usd=0.046, budget_period="total", prices={"*": {"prompt": 1000, "completion": 1000}})
    barrier = threading.Barrier(20)

    def one(i: int) -> httpx.Response:
        barrier.wait()
        return _complete(pair.a if i % 2 else pair.b, key, max_tokens=10, ignore_eos=True)

    with ThreadPoolExecutor(20) as pool:
        rs = list(pool.map(one, range(20)))
    statuses = [r.status_code for r in rs]
    assert statuses.count(200) == 4 and statuses.count(429) == 16, statuses
    for r in rs:
        if r.status_code == 429:
            assert r.json()["error"]["code"] == "budget_exceeded"
    assert wait_for(lambda: len(pair.rows(tid)) == 4 and pair.open_reservations(tid) == 0, 20), pair.rows(tid)
    spent = sum(cost for _, _, cost, _ in pair.rows(tid))
    assert spent == pytest.approx(4 * 0.011) and spent <= 0.046
    # The refused are counted (per instance, flushed to the store), never ledger rows.
    assert wait_for(lambda: pair.sql("SELECT coalesce(sum(count), 0) FROM refusals WHERE tenant_id = %s "
                                     "AND code = 'budget_exceeded'", tid)[0][0] == 16, 10)


def test_rpm_is_the_sum_over_both_instances(pair: Pair) -> None:
    tid, key = pair.tenant(rpm=10)
    statuses = [_complete(pair.a if i % 2 else pair.b, key).status_code for i in range(10)]
    assert statuses == [200] * 10
    for srv in (pair.a, pair.b):  # the 11th, wherever it lands
        r = _complete(srv, key)
        _error(r, 429, "rate_limit_exceeded")
        assert int(r.headers["retry-after"]) >= 1 and r.headers["x-ratelimit-limit-requests"] == "10"


def test_a_concurrency_limit_holds_across_instances(pair: Pair) -> None:
    _, key = pair.tenant(max_concurrency=2)
    barrier = threading.Barrier(6)

    def one(i: int) -> int:
        barrier.wait()  # 40 tokens at 10 ms a step: all six overlap
        return _complete(pair.a if i % 2 else pair.b, key, max_tokens=40, ignore_eos=True).status_code

    with ThreadPoolExecutor(6) as pool:
        statuses = list(pool.map(one, range(6)))
    assert 1 <= statuses.count(200) <= 2 and statuses.count(429) >= 4, statuses


def test_a_key_revoked_through_one_is_refused_by_the_other_within_2_s(pair: Pair) -> None:
    tid, key = pair.tenant()
    assert _complete(pair.b, key).status_code == 200  # made through A a moment ago: B knows it at once
    key_id = pair.admin_a.get(f"/admin/tenants/{tid}/keys").json()["data"][0]["id"]
    assert pair.admin_a.delete(f"/admin/keys/{key_id}").status_code == 200
    t0 = time.monotonic()
    assert wait_for(lambda: _complete(pair.b, key).status_code == 401, 5)
    assert time.monotonic() - t0 <= 2.0
    # A new limit set through B reaches A as quickly.
    b_admin = httpx.Client(base_url=pair.b.base_url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)
    tid2, key2 = pair.tenant()
    assert b_admin.patch(f"/admin/tenants/{tid2}", json={"max_tokens": 1}).status_code == 200
    t0 = time.monotonic()
    assert wait_for(lambda: _complete(pair.a, key2, max_tokens=2).status_code == 400, 5)
    assert time.monotonic() - t0 <= 2.0


def test_sigkill_of_one_instance_its_requests_are_settled_by_the_other(pair: Pair) -> None:
    """Last of the pair's tests: A dies here."""
    a, b = pair.a, pair.b
    tid, key = pair.tenant(prices={"*": {"prompt": 1000, "completion": 1000}})
    started = threading.Barrier(4)

    def stream() -> None:  # on A: 500 tokens at 10 ms a step, cut by the kill
        try:
            with httpx.stream("POST", f"{a.base_url}/v1/completions", timeout=30,
                              headers={"Authorization": f"Bearer {key}"},
                              json={"prompt": [1], "max_tokens": 500, "ignore_eos": True, "stream": True}) as r:
                for n, _ in enumerate(r.iter_lines()):
                    if n == 5:
                        started.wait()
        except (httpx.HTTPError, threading.BrokenBarrierError):
            pass

    threads = [threading.Thread(target=stream) for _ in range(3)]
    for t in threads:
        t.start()
    started.wait(timeout=20)
    time.sleep(1.2)  # at least one checkpoint of the streamed tokens
    assert pair.open_reservations(tid) == 3
    a.proc.send_signal(signal.SIGKILL)
    a.proc.wait()
    for t in threads:
        t.join(10)
    assert _complete(b, key).status_code == 200  # B serves on
    # B's sweep settles A's three once A's lease is older than the timeout.
    assert wait_for(lambda: pair.open_reservations(tid) == 0, LEASE_S + 12), pair.rows(tid)
    rows = pair.rows(tid)
    assert len(rows) == 4 and len({r[0] for r in rows}) == 4
    interrupted = [r for r in rows if r[1] == "interrupted"]
    assert len(interrupted) == 3
    for _, _, cost, completion in interrupted:  # billed for the checkpointed tokens
        assert completion > 0 and cost == pytest.approx((1 + completion) * 1000 / 1e6)
    time.sleep(2.5)  # more sweep rounds (every second here): nothing is settled twice
    assert len(pair.rows(tid)) == 4
    assert "settled 3 request(s) of gateway instances" in b.log_text()


def test_a_postgresql_outage_gives_503_and_service_resumes_by_itself(tmp_path: Path) -> None:
    pg = PgServer(durable=False).start()  # its own server: the outage touches no other test
    try:
        url = pg.create_database("outage")
        srv = _instance(tmp_path, "a", url)
        try:
            pair = Pair(srv, srv, url)
            tid, key = pair.tenant(rpm=1000, prices={"*": {"prompt": 1, "completion": 1}})
            assert _complete(srv, key).status_code == 200
            done: list[int] = []

            def long_stream() -> None:  # admitted before the outage, finishes during it
                r = _complete(srv, key, max_tokens=150, ignore_eos=True)
                done.append(r.status_code)

            t = threading.Thread(target=long_stream)
            t.start()
            time.sleep(0.5)
            pg.stop()
            outage = time.monotonic()
            statuses = set()
            while time.monotonic() - outage < 2:
                r = _complete(srv, key)
                statuses.add(r.status_code)
                if r.status_code == 503:
                    assert r.json()["error"]["code"] == "store_unavailable" and int(r.headers["retry-after"]) >= 1
                time.sleep(0.2)
            assert statuses == {503}, statuses  # nothing served unbilled
            assert httpx.get(f"{srv.base_url}/health").status_code == 200  # the process is fine
            t.join(30)
            assert done == [200]
            pg.start()
            assert wait_for(lambda: _complete(srv, key).status_code == 200, 20)  # no restart
            # The stream that finished during the outage was written once the store came back.
            assert wait_for(lambda: len(pair.rows(tid)) == 3 and pair.open_reservations(tid) == 0, 20), \
                pair.rows(tid)
            assert sorted(r[3] for r in pair.rows(tid)) == [2, 2, 150]
        finally:
            srv.stop()
    finally:
        pg.close()
