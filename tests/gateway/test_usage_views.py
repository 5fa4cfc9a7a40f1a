"""Usage views against a ledger of known rows: group-by fields and combinations, filters, the grand
total, exact nano-USD sums, and the 400s, on SQLite and on PostgreSQL (the same statements)."""
from __future__ import annotations

import csv
import io
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from lockgate.errors import APIError
from lockgate.gateway.admin_scope import AdminReach
from lockgate.gateway.tenants import AdminService
from lockgate.store.models import UsageQuery, UsageRecord
from lockgate.store.money import nano
from lockgate.store.sqlite import open_store

H = 3600.0
T0 = 20000 * 86400.0  # 2024-10-04T00:00:00Z, a UTC midnight


def _row(rid: str, tenant: str, key: str, model: str, version: str | None, user: str | None, cls: str,
         prompt: int, completion: int, cost: float, at: float, finish: str = "stop", status: int = 200,
         ttft: float | None = 0.1, e2e: float | None = 1.0) -> UsageRecord:
    return UsageRecord(rid, tenant, key, model, prompt, completion, prompt // 10, None, ttft, e2e, finish, status,
                       cost, at, model_version=version, user=user, priority_class=cls)


ROWS = [
    _row("r1", "ten_a", "key_1", "m1", "v1", "alice", "interactive", 100, 10, 0.000056, T0 + 10),
    _row("r2", "ten_a", "key_1", "m1", "v2", "bob", "interactive", 200, 20, 0.000112, T0 + H + 5),
    _row("r3", "ten_a", "key_2", "m2", "v1", None, "batch", 300, 30, 0.25, T0 + H + 6, finish="error", status=500),
    _row("r4", "ten_b", "key_3", "m1", "v1", "alice", "standard", 400, 40, 1.5, T0 + 86400 + 7),
    _row("r5", "ten_b", "key_3", "m1", "v2", "carol", "standard", 500, 50, 0.75, T0 + 86400 + H, finish="length"),
    _row("r6", "ten_b", "key_4", "m2", None, "alice", "batch", 600, 60, 0.0, T0 + 86400 + 2 * H,
         finish="interrupted", status=200),
    _row("r7", "ten_a", "key_2", "m2", "v1", "bob", "batch", 700, 70, 0.03, T0 + 2 * 86400, finish="abort",
         status=499),
]
ERRORS = {"r3", "r6"}  # finish error/interrupted, or status >= 500


def _open(request: pytest.FixtureRequest, path: Path, url_fixture: str):
    if request.param == "sqlite":
        return open_store(path)
    from lockgate.store.postgres import PostgresStore

    return PostgresStore(request.getfixturevalue(url_fixture))


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """The known rows, read only (one database per backend for the module)."""
    s = _open(request, tmp_path_factory.mktemp("views"), "pg_module_url")
    s.settle(ROWS)
    yield s
    s.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator:
    """The known rows in a database of the test's own, for tests that add rows."""
    s = _open(request, tmp_path, "pg_url")
    s.settle(ROWS)
    yield s
    s.close()


@pytest.fixture
def svc(store) -> AdminService:
    return AdminService(store)


@pytest.fixture(scope="module")
def sqlite_svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AdminService]:
    """Input checks come before any SQL: one backend is enough for them."""
    s = open_store(tmp_path_factory.mktemp("bad"))
    yield AdminService(s)
    s.close()


def _field(r: UsageRecord, f: str) -> str | None:
    version = r.model if r.model_version is None else f"{r.model}@{r.model_version}"
    day = "2024-10-0" + str(4 + int((r.created_at - T0) // 86400))
    hour = f"{day}T{int((r.created_at - T0) % 86400 // H):02d}:00:00Z"
    return {"tenant": r.tenant_id, "key": r.key_id, "model": r.model, "version": version,
            "class": r.priority_class, "user": r.user, "day": day, "hour": hour, "outcome": r.finish_reason}[f]


def _expected(fields: tuple[str, ...], rows: list[UsageRecord]) -> dict[tuple, dict]:
    """Totals per group computed here, row by row, from the records themselves."""
    out: dict[tuple, dict] = defaultdict(lambda: {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0,
                                                  "cached_tokens": 0, "cost_nusd": 0, "errors": 0})
    for r in rows:
        t = out[tuple(_field(r, f) for f in fields)]
        t["requests"] += 1
        t["prompt_tokens"] += r.prompt_tokens
        t["completion_tokens"] += r.completion_tokens
        t["cached_tokens"] += r.cached_tokens
        t["cost_nusd"] += nano(r.cost_usd)
        t["errors"] += r.request_id in ERRORS
    return dict(out)


@pytest.mark.parametrize("group_by", ["tenant", "key", "model", "version", "class", "user", "day", "hour",
                                      "outcome", "tenant,model", "key,version", "day,model", "user,class,outcome"])
def test_group_totals_match_the_rows(store, group_by: str) -> None:
    fields = tuple(group_by.split(","))
    got = store.query_usage(UsageQuery(group_by=group_by))
    want = _expected(fields, ROWS)
    assert {tuple(g[f] for f in fields): {k: g[k] for k in want[next(iter(want))]} for g in got} == want
    for g in got:
        assert g["cost_usd"] == g["cost_nusd"] / 1e9 and isinstance(g["cost_nusd"], int)
    keys = [tuple(g[f] for f in fields) for g in got]
    assert len(keys) == len(set(keys))


def test_order_time_newest_first_others_by_cost_then_key_nulls_last(fresh) -> None:
    store = fresh
    assert [g["day"] for g in store.query_usage(UsageQuery(group_by="day"))] == [
        "2024-10-06", "2024-10-05", "2024-10-04"]
    assert [g["hour"] for g in store.query_usage(UsageQuery(group_by="hour", tenant_id="ten_a"))] == [
        "2024-10-06T00:00:00Z", "2024-10-04T01:00:00Z", "2024-10-04T00:00:00Z"]
    # by cost: ten_b 2.25 > ten_a 0.280168
    assert [g["tenant"] for g in store.query_usage(UsageQuery(group_by="tenant"))] == ["ten_b", "ten_a"]
    # day first (newest), then cost within the day
    assert [(g["day"], g["model"]) for g in store.query_usage(UsageQuery(group_by="day,model"))] == [
        ("2024-10-06", "m2"), ("2024-10-05", "m1"), ("2024-10-05", "m2"), ("2024-10-04", "m2"),
        ("2024-10-04", "m1")]
    # by cost first, whatever the key: the NULL user spent most here
    users = store.query_usage(UsageQuery(group_by="user", tenant_id="ten_a", until=T0 + 2 * H))
    assert [g["user"] for g in users] == [None, "bob", "alice"]
    # equal cost (0) is ordered by key, a NULL key last, on both backends
    same = store.query_usage(UsageQuery(group_by="user", outcome="interrupted"))
    assert [g["user"] for g in same] == ["alice"]
    cheap = [_row(f"z{i}", "ten_z", "k", "mz", None, u, "batch", 1, 1, 0.0, T0) for i, u in
             enumerate(["b", None, "a"])]
    store.settle(cheap)
    assert [g["user"] for g in store.query_usage(UsageQuery(group_by="user", tenant_id="ten_z"))] == [
        "a", "b", None]
    assert len(store.query_usage(UsageQuery(group_by="key", limit=2))) == 2


@pytest.mark.parametrize("q,ids", [
    (UsageQuery(key_id="key_3"), {"r4", "r5"}),
    (UsageQuery(version="m1@v2"), {"r2", "r5"}),
    (UsageQuery(version="v1"), {"r1", "r3", "r4", "r7"}),
    (UsageQuery(version="m2@v1", tenant_id="ten_a"), {"r3", "r7"}),
    (UsageQuery(user="alice"), {"r1", "r4", "r6"}),
    (UsageQuery(outcome="error"), ERRORS),
    (UsageQuery(outcome="ok"), {"r1", "r2", "r4", "r5", "r7"}),
    (UsageQuery(outcome="length"), {"r5"}),
    (UsageQuery(model="m1", since=T0 + H, until=T0 + 86400 + H), {"r2", "r4"}),
])
def test_filters(store, q: UsageQuery, ids: set[str]) -> None:
    assert {r["request_id"] for r in store.query_usage(q)} == ids
    total = store.usage_totals(q)
    assert total["requests"] == len(ids)
    assert total["cost_nusd"] == sum(nano(r.cost_usd) for r in ROWS if r.request_id in ids)
    assert sum(g["requests"] for g in store.query_usage(replace(q, group_by="model"))) == len(ids)


def test_money_is_summed_exactly(fresh) -> None:
    store = fresh
    # 1000 requests of $0.1 and 1000 of $0.000056: the float sum drifts, the nano-USD sum does not
    rows = [_row(f"x{i}", "ten_x", "k", "mx", None, None, "batch", 1, 1, 0.1 if i % 2 else 0.000056, T0 + i)
            for i in range(2000)]
    store.settle(rows)
    floats = sum(r.cost_usd for r in rows)
    assert floats != 100.056  # 100.05599999999... with floats
    (g,) = store.query_usage(UsageQuery(group_by="tenant", tenant_id="ten_x"))
    assert g["cost_nusd"] == 100_056_000_000 and g["cost_usd"] == 100.056
    assert store.usage_totals(UsageQuery(tenant_id="ten_x"))["cost_nusd"] == 100_056_000_000


def test_service_json_total_and_csv(svc: AdminService) -> None:
    out = svc.usage(group_by="tenant,model")
    assert out["group_by"] == "tenant,model" and out["object"] == "list"
    assert out["total"]["requests"] == len(ROWS) and out["total"]["errors"] == len(ERRORS)
    assert out["total"]["cost_nusd"] == sum(g["cost_nusd"] for g in out["data"]) == sum(nano(r.cost_usd)
                                                                                        for r in ROWS)
    rows = svc.usage(group_by="request", user="bob", format="json")
    assert [r["request_id"] for r in rows["data"]] == ["r7", "r2"] and rows["total"]["requests"] == 2
    assert rows["data"][0]["user"] == "bob" and rows["data"][0]["priority_class"] == "batch"
    assert rows["data"][0]["cost_nusd"] == 30_000_000
    text = svc.usage(group_by="key", format="csv", tenant_id="ten_a")
    got = list(csv.DictReader(io.StringIO(text)))
    assert list(got[0]) == ["key", "requests", "prompt_tokens", "completion_tokens", "cached_tokens", "cost_usd",
                            "cost_nusd", "errors"]
    # exact decimal text from the integer, never 0.00016799999999999999
    assert [(r["key"], r["cost_usd"], r["cost_nusd"]) for r in got] == [("key_2", "0.28", "280000000"),
                                                                        ("key_1", "0.000168", "168000")]


def test_a_tenant_admin_sees_only_its_own(store) -> None:
    mine = AdminService(store, reach=AdminReach("ten_a"))
    assert {g["tenant"] for g in mine.usage(group_by="tenant")["data"]} == {"ten_a"}
    assert mine.usage(group_by="key", key_id="key_3")["data"] == []  # another tenant's key: nothing
    with pytest.raises(APIError) as ei:
        mine.usage(tenant_id="ten_b")
    assert ei.value.status == 404


BIG = "x" * 10_000_000


@pytest.mark.parametrize("kw,param,needle", [
    ({"group_by": "week"}, "group_by", "tenant, key, model, version, class, user, day, hour, outcome"),
    ({"group_by": "tenant,tenant"}, "group_by", "more than once"),
    ({"group_by": "tenant,,model"}, "group_by", "empty"),
    ({"group_by": BIG}, "group_by", "too long"),
    ({"group_by": 7}, "group_by", "string"),
    ({"since": "2024-10-05", "until": "2024-10-04"}, "until", "later than"),
    ({"since": "1700000000", "until": "1700000000"}, "until", "later than"),
    ({"since": "nan"}, "since", ""),
    ({"until": str(2**70)}, "until", ""),
    ({"outcome": "great"}, "outcome", "stop, length"),
    ({"outcome": ["ok"]}, "outcome", "string"),
    ({"limit": 0}, "limit", ""),
    ({"limit": 2**70}, "limit", ""),
    ({"limit": "1e3"}, "limit", ""),
    ({"limit": BIG}, "limit", ""),
    ({"key_id": BIG}, "key_id", "too long"),
    ({"user": BIG}, "user", "too long"),
    ({"version": BIG}, "version", "too long"),
    ({"model": BIG}, "model", "too long"),
    ({"format": "xml"}, "format", ""),
])
def test_bad_input_is_a_400_naming_the_param(sqlite_svc: AdminService, kw: dict, param: str, needle: str) -> None:
    with pytest.raises(APIError) as ei:
        sqlite_svc.usage(**kw)
    assert ei.value.status == 400 and ei.value.param == param and needle in ei.value.message
    assert len(ei.value.message) < 400


def test_compare_two_versions_and_two_windows(svc: AdminService) -> None:
    out = svc.usage_compare(a_version="m1@v1", b_version="m1@v2")
    assert out["a"]["requests"] == 2 and out["b"]["requests"] == 2  # r1, r4 vs r2, r5
    assert out["a"]["cost_nusd"] == nano(0.000056) + nano(1.5)
    assert out["b"]["prompt_tokens"] == 700 and out["a"]["label"] == "m1@v1"
    assert out["change"]["prompt_tokens"] == pytest.approx((700 - 500) / 500)
    win = svc.usage_compare(a_since=T0, a_until=T0 + 86400, b_since=T0 + 86400, b_until=T0 + 2 * 86400,
                            tenant_id="ten_b")
    assert win["a"]["requests"] == 0 and win["b"]["requests"] == 3
    assert win["b"]["error_rate"] == pytest.approx(1 / 3) and win["change"]["requests"] is None
    for kw, param in (({}, "a_version"), ({"a_version": "m1@v1"}, "b_version"),
                      ({"a_since": "2024-10-05", "a_until": "2024-10-04", "b_version": "v1"}, "a_until"),
                      ({"a_version": BIG, "b_version": "v1"}, "a_version"),
                      ({"a_version": "v1", "b_version": "v2", "since": "x"}, "since")):
        with pytest.raises(APIError) as ei:
            svc.usage_compare(**kw)
        assert ei.value.status == 400 and ei.value.param == param


def test_compare_caps_the_latency_samples_not_the_totals(svc: AdminService, monkeypatch: pytest.MonkeyPatch) -> None:
    from lockgate.gateway import usage_compare

    monkeypatch.setattr(usage_compare, "MAX_SAMPLES", 1)
    out = svc.usage_compare(a_version="v1", b_version="m1@v2")
    assert out["a"]["requests"] == 4 and out["a"]["timed_requests"] == 1 and out["a"]["capped"] is True
    assert out["b"]["capped"] is True and "newest 1 timed" in out["note"]
