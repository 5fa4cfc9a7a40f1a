"""A key's own budget beside its tenant's: both hold, the stricter wins, reserved in one step.

The race (20 concurrent requests against a key budget that covers exactly 4) runs through
`Gateway.reserve` and the ledger: in memory (one process, SQLite file) and on PostgreSQL with
two gateway instances sharing the store (the store decides: store/shared_ops.py and the
server-side `lockgate_admit`). Then the stricter-wins cases and a key's period rolling over,
in memory and in the shared store's statements on both backends."""
from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from lockgate.errors import APIError
from lockgate.gateway.budget import BudgetBook, key_book
from lockgate.gateway.gateway import Gateway, GatewayConfig
from lockgate.gateway.lease import Lease
from lockgate.gateway.tenants import AdminService
from lockgate.store.models import ApiKey, Reservation, Tenant, UsageRecord
from lockgate.store.shared_ops import AdmitRequest
from lockgate.store.sqlite import open_store

ADMIN = "root-key"
PRICES = {"*": {"prompt": 0.0, "completion": 1000.0}}  # $0.001 per completion token
WORST = 10  # max_tokens: a worst case of $0.01 per request
DAY = datetime(2026, 12, 5, 12, 0, tzinfo=UTC).timestamp()


async def _requests(gws: list[Gateway], key: str, n: int, completion: int = 5) -> list[APIError | None]:
    """n requests at once, alternating between the gateways: reserve, then (if admitted) generate
    `completion` tokens and settle, once every request was decided (all in flight together)."""
    decided, all_decided = [0], asyncio.Event()

    def done() -> None:
        decided[0] += 1
        if decided[0] == n:
            all_decided.set()

    async def one(i: int) -> APIError | None:
        gw = gws[i % len(gws)]
        principal = gw.authenticate(f"Bearer {key}".encode())
        lease = Lease()
        meter = gw.open_meter(lease, principal, f"req-{i}-{time.monotonic_ns()}")
        assert meter is not None
        meter.model = "m"
        try:
            gw.reserve(lease, meter, 1, WORST)
            await meter.reservation
        except APIError as e:
            lease.status, lease.code = e.status, e.code
            lease.release("rejected")
            done()
            return e
        done()
        await all_decided.wait()
        gw.on_tokens(meter, completion, 0)
        lease.status = 200
        lease.release("ok")
        return None

    out = await asyncio.gather(*(one(i) for i in range(n)))
    for gw in gws:
        await gw.ledger.drain()
    return list(out)


def _setup(store, tenant_budget: float | None, key_budget: float | None, tenant_period: str = "total",
           key_period: str = "total") -> tuple[str, str, str]:
    svc = AdminService(store)
    t = svc.create_tenant({"name": "acme", "budget_usd": tenant_budget, "budget_period": tenant_period,
                           "prices": PRICES}, actor="test")
    k = svc.create_key(t["id"], {"name": "ci", "budget_usd": key_budget, "budget_period": key_period},
                       actor="test")
    return t["id"], k["id"], k["key"]


async def _gateway(config: GatewayConfig) -> Gateway:
    gw = Gateway(config)
    await gw.start()
    return gw


def _admitted(results: list[APIError | None]) -> int:
    return sum(r is None for r in results)


# ---- the race ------------------------------------------------------------------------------------

def test_key_budget_race_in_memory(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    tid, kid, key = _setup(store, 1.0, 0.04)
    store.close()

    async def go() -> None:
        gw = await _gateway(GatewayConfig(data_dir=str(tmp_path), admin_key=ADMIN))
        try:
            results = await _requests([gw], key, 20)
            assert _admitted(results) == 4
            refused = [r for r in results if r is not None]
            assert all(r.status == 429 and r.code == "budget_exceeded" and r.type == "insufficient_quota"
                       for r in refused)
            assert "the key's total budget of $0.04" in refused[0].message and kid in refused[0].message
            key_obj = gw.latest_key(ApiKey(kid, tid, "", "", "", []))
            assert gw.budgets.remaining_key(key_obj) == pytest.approx(0.02)  # 4 x $0.005 spent
            assert gw.budgets.reserved(key_book(kid)) == pytest.approx(0.0)
            assert gw.budgets.reserved(tid) == pytest.approx(0.0)
            sums = gw.store.spend_sums("key_id", [kid], time.time())[kid]
            assert sums.spent_nusd["total"] == 20_000_000 and sums.reserved_nusd == 0  # exact nano-USD
            assert gw.store.list_reservations() == []
        finally:
            await gw.stop()

    asyncio.run(go())


def test_key_budget_race_on_postgresql_with_two_instances(pg_url: str) -> None:
    from lockgate.store.postgres import PostgresStore

    store = PostgresStore(pg_url)
    tid, kid, key = _setup(store, 1.0, 0.04)
    store.close()

    async def go() -> None:
        a = await _gateway(GatewayConfig(store_url=pg_url, admin_key=ADMIN))
        b = await _gateway(GatewayConfig(store_url=pg_url, admin_key=ADMIN))
        try:
            results = await _requests([a, b], key, 20)
            assert _admitted(results) == 4
            refused = [r for r in results if r is not None]
            assert all(r.status == 429 and r.code == "budget_exceeded" for r in refused)
            assert any("the key's total budget" in r.message for r in refused)
            assert a.store.list_reservations() == []
            sums = a.store.spend_sums("key_id", [kid], time.time())[kid]
            assert sums.spent_nusd["total"] == 20_000_000 and sums.reserved_nusd == 0
            # The key's book in the store was kept by settlement: $0.02 left, so 2 more fit, not 3.
            results = await _requests([b, a], key, 3)
            assert _admitted(results) == 2
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(go())


# ---- the stricter wins ---------------------------------------------------------------------------

@pytest.mark.parametrize("tenant_budget,key_budget,admitted,words", [
    (0.03, 0.04, 3, "of the day budget of $0.03"),  # the tenant's (a day) is stricter
    (1.0, 0.02, 2, "the key's month budget of $0.02"),  # the key's is stricter
])
def test_the_stricter_budget_wins_in_memory(tmp_path: Path, tenant_budget: float, key_budget: float,
                                            admitted: int, words: str) -> None:
    store = open_store(tmp_path)
    tid, kid, key = _setup(store, tenant_budget, key_budget, tenant_period="day", key_period="month")
    store.close()

    async def go() -> None:
        gw = await _gateway(GatewayConfig(data_dir=str(tmp_path), admin_key=ADMIN))
        try:
            results = await _requests([gw], key, 10)
            assert _admitted(results) == admitted
            assert all(words in r.message for r in results if r is not None)
        finally:
            await gw.stop()

    asyncio.run(go())


def test_a_key_budget_set_later_counts_what_is_in_flight() -> None:
    book = BudgetBook()
    tenant = Tenant(id="t", name="t", budget_usd=None)
    key = ApiKey("k", "t", "k", "p", "h", ["inference"], budget_period="total")
    book.roll("t", "total", DAY)
    book.roll(key_book("k"), "total", DAY)
    book.reserve(tenant, 0.03, key)  # no key budget yet: held all the same
    key.budget_usd = 0.04
    with pytest.raises(APIError) as e:
        book.reserve(tenant, 0.02, key)
    assert "key's total budget" in e.value.message
    book.settle("t", 0.03, 0.01, DAY, "k")
    book.reserve(tenant, 0.02, key)
    assert book.remaining_key(key) == pytest.approx(0.01) and book.reserved("t") == pytest.approx(0.02)


# ---- a key's period rolls over -------------------------------------------------------------------

def test_key_day_budget_rolls_over_in_memory() -> None:
    book = BudgetBook()
    tenant = Tenant(id="t", name="t", budget_usd=None)
    key = ApiKey("k", "t", "k", "p", "h", ["inference"], budget_usd=0.02, budget_period="day")
    for day in (DAY, DAY + 86400):
        book.roll("t", "total", day)
        book.roll(key_book("k"), "day", day)
        book.reserve(tenant, 0.01, key)
        book.settle("t", 0.01, 0.01, day, "k")
        book.reserve(tenant, 0.01, key)
        book.settle("t", 0.01, 0.01, day, "k")
        with pytest.raises(APIError):
            book.reserve(tenant, 0.01, key)  # today's $0.02 is spent ...
    assert book.remaining_key(key) == pytest.approx(0.0)  # ... and the next day started empty again


@pytest.fixture(params=["sqlite", "postgresql"])
def shared_store(request: pytest.FixtureRequest, tmp_path: Path):
    if request.param == "sqlite":
        store = open_store(tmp_path)
        store.shared = True
    else:
        from lockgate.store.postgres import PostgresStore

        store = PostgresStore(request.getfixturevalue("pg_url"))
    yield store
    store.close()


def test_key_day_budget_rolls_over_in_the_shared_store(shared_store) -> None:
    store = shared_store
    tid, kid, _ = _setup(store, None, 0.02, key_period="day")

    def admit(rid: str, now: float):
        return store.admit(AdmitRequest(Reservation(rid, tid, kid, "m", 0.01, 1, created_at=now, instance_id="i"),
                                        None, "total", None), now)

    for day in (DAY, DAY + 86400):
        for i in range(2):
            assert admit(f"{day}-{i}", day) is None
            store.settle([UsageRecord(f"{day}-{i}", tid, kid, "m", 1, 10, 0, None, None, None, "stop", 200,
                                      0.01, day)])
        refusal = admit(f"{day}-over", day)
        assert refusal is not None and refusal.kind == "budget" and refusal.scope == f"k:{kid}"
        assert refusal.left_usd == pytest.approx(0.0)
    # The store's key book holds the second day only.
    row = store._q("SELECT period, spent FROM budget_books WHERE tenant_id = ?", (f"k:{kid}",)).fetchone()
    assert row[0] == "day" and float(row[1]) == pytest.approx(0.02)


def test_shared_store_stricter_budget_wins(shared_store) -> None:
    store = shared_store
    tid, kid, _ = _setup(store, 0.05, 0.03)

    def admit(rid: str, tenant_budget: float):
        return store.admit(AdmitRequest(Reservation(rid, tid, kid, "m", 0.01, 1, instance_id="i"),
                                        tenant_budget, "total", None))

    assert [admit(f"r{i}", 0.05) is None for i in range(4)] == [True, True, True, False]  # the key's $0.03
    r = admit("x", 0.05)
    assert r is not None and r.scope == f"k:{kid}"
    r = admit("y", 0.025)  # the tenant's budget now stricter: $0.025 - 0.03 held < the key's 0
    assert r is not None and r.scope == f"t:{tid}"
