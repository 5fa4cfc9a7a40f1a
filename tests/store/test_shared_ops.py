"""The shared-store statements (store/shared_ops.py) on both backends, with two store objects on one
database as two processes would hold: rpm, tpm, concurrency and budgets are exact for their sum;
settlement is exactly once; leases and the sweep of dead instances."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lockgate.store.models import Reservation, Tenant, UsageRecord
from lockgate.store.shared_ops import AdmitRequest
from lockgate.store.sqlite import open_store


@pytest.fixture(params=["sqlite", "postgresql"])
def two(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple]:
    """Two stores on one database, in shared mode (as two API processes or instances)."""
    if request.param == "sqlite":
        a, b = open_store(tmp_path), open_store(tmp_path)
        a.shared = b.shared = True
    else:
        from lockgate.store.postgres import PostgresStore

        url = request.getfixturevalue("pg_url")
        a, b = PostgresStore(url), PostgresStore(url)
    a.create_tenant(Tenant(id="t1", name="t1"), "test")
    yield a, b
    a.close()
    b.close()


def _req(rid: str, *, cost: float = 0.0, prompt: int = 1, budget: float | None = None, conc: int | None = None,
         key_conc: int | None = None, tpm: list | None = None, key: str | None = "k1",
         instance: str = "i1") -> AdmitRequest:
    r = Reservation(rid, "t1", key, "m", cost, prompt, instance_id=instance)
    return AdmitRequest(r, budget, "total", None, conc, key_conc, tpm or [])


def _usage(rid: str, cost: float, completion: int = 0) -> UsageRecord:
    return UsageRecord(rid, "t1", "k1", "m", 1, completion, 0, None, None, None, "stop", 200, cost, time.time())


def test_a_budget_for_four_admits_exactly_four_from_two_processes(two: tuple) -> None:
    a, b = two
    barrier = threading.Barrier(20)
    results: list = []

    def one(i: int) -> None:
        barrier.wait()
        results.append((a if i % 2 else b).admit(_req(f"r{i}", cost=0.011, budget=0.046)))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    admitted = [r for r in results if r is None]
    refused = [r for r in results if r is not None]
    assert len(admitted) == 4 and len(refused) == 16
    assert all(r.kind == "budget" and r.left_usd < 0.011 for r in refused)
    held = a.list_reservations()
    assert len(held) == 4
    # Settled at their real cost, the budget frees what they did not spend; once only.
    a.settle([_usage(r.request_id, 0.005) for r in held])
    b.settle([_usage(r.request_id, 0.005) for r in held])  # a retry on another instance: no second row
    assert a.spent_usd("t1", None) == pytest.approx(0.02)
    assert a.admit(_req("late", cost=0.011, budget=0.046)) is None  # 0.02 + 0.011 fits now
    assert b.admit(_req("later", cost=0.011, budget=0.046)) is None  # 0.031 + 0.011 = 0.042 fits
    refusal = a.admit(_req("over", cost=0.011, budget=0.046))
    assert refusal is not None and refusal.left_usd == pytest.approx(0.046 - 0.042)


def test_rpm_buckets_are_shared_and_refill(two: tuple) -> None:
    a, b = two
    now = 1000.0
    scopes = [("t:t1", 4), ("k:k1", 100)]
    for i in range(4):
        assert (a if i % 2 else b).charge_requests(scopes, now).refusal is None
    charge = b.charge_requests(scopes, now)
    assert charge.refusal is not None and charge.refusal.kind == "rpm" and charge.refusal.scope == "t:t1"
    assert charge.refusal.wait_s == pytest.approx(15.0)  # one request refills in 60/4 s
    assert charge.levels["k:k1"][1] == pytest.approx(96.0)  # refused: the key's bucket kept its unit
    assert a.charge_requests(scopes, now + 15.0).refusal is None
    # A changed limit starts a full bucket (as the in-memory limiter does).
    assert b.charge_requests([("t:t1", 10)], now + 15.0).levels["t:t1"] == (10.0, 9.0)


def test_concurrency_counts_open_reservations_of_every_process(two: tuple) -> None:
    a, b = two
    assert a.admit(_req("c1", conc=2)) is None
    assert b.admit(_req("c2", conc=2)) is None
    refusal = a.admit(_req("c3", conc=2))
    assert refusal is not None and refusal.kind == "concurrency" and refusal.inflight == 2
    refusal = a.admit(_req("c3", key_conc=1, key="k9"))  # the key's own limit: k9 holds none
    assert refusal is None
    refusal = b.admit(_req("c4", key_conc=1, key="k9"))
    assert refusal is not None and refusal.scope == "k:k9"
    b.settle([_usage("c1", 0.0)])
    assert a.admit(_req("c5", conc=3)) is None


def test_tpm_takes_prompt_tokens_then_streamed_completion_tokens(two: tuple) -> None:
    a, b = two
    tpm = [("t:t1", 600)]
    now = time.time()
    assert a.admit(_req("p1", prompt=400, tpm=tpm), now) is None
    refusal = b.admit(_req("p2", prompt=300, tpm=tpm), now)
    assert refusal is not None and refusal.kind == "tpm" and refusal.wait_s == pytest.approx(10.0, rel=0.01)
    refusal = b.admit(_req("p3", prompt=700, tpm=tpm), now)
    assert refusal is not None and refusal.kind == "tpm_too_large"
    a.checkpoint_reservations([("p1", 150, 0)])  # 150 streamed: 600 - 400 - 150 = 50 left
    assert b.admit(_req("p4", prompt=60, tpm=tpm), now) is not None
    a.settle([_usage("p1", 0.0, completion=190)])  # 40 more at settlement
    assert b.admit(_req("p5", prompt=11, tpm=tpm), now) is not None  # 10 left
    assert b.admit(_req("p6", prompt=10, tpm=tpm), now) is None


def test_dead_instances_reservations_are_swept_once(two: tuple) -> None:
    a, b = two
    a.register_instance("i1", "h", 1, now=100.0)
    b.register_instance("i2", "h", 2, now=100.0)
    assert a.admit(_req("d1", instance="i1")) is None
    assert b.admit(_req("d2", instance="i2")) is None
    b.add_reservations([Reservation("legacy", "t1", None, "m", 0.0, 1)])  # no instance: a single process's
    assert b.renew_instance("i2", now=200.0)
    dead = {r.request_id for r in b.dead_reservations(live_since=150.0)}
    assert dead == {"d1", "legacy"}  # i1 did not renew since 150; i2 did
    b.settle([_usage("d1", 0.0), _usage("legacy", 0.0)])
    a.settle([_usage("d1", 0.0)])  # i1 comes back from its stall and settles too: still one row
    assert {r.request_id for r in a.dead_reservations(live_since=150.0)} == set()
    assert b.forget_dead_instances(live_since=150.0) == 1
    assert [i["id"] for i in a.list_instances()] == ["i2"]
    assert a.renew_instance("i1") is False  # its lease is gone: it must register again
    from lockgate.store.models import UsageQuery

    assert sorted(r["request_id"] for r in a.query_usage(UsageQuery(tenant_id="t1"))) == ["d1", "legacy"]
