"""Cost anomaly detection (gateway/anomaly.py) on a synthetic ledger replayed into a real store.

Five tenants, three keys and two models each, 17 days of hourly traffic with a daily cycle and
Poisson noise, written as real usage rows (`store.settle`). Injected after two clean weeks: a
tenant's request count x5, a key's tokens per request x8, a shift to the expensive model, a cache
hit rate collapse and a tenant's traffic falling to near zero; each is found with its direction
and likely cause, and scanning every hour of the two clean weeks finds nothing.
"""
from __future__ import annotations

import functools
import json
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lockgate.gateway.anomaly import (
    AnomalyConfig,
    build_index,
    detect_hour,
    explain,
    last_complete_hour,
    scan,
    scan_hours,
)
from lockgate.observability.anomaly_metrics import AnomalyMetrics
from lockgate.observability.labels import TenantLabels
from lockgate.store.hourly_ops import HOUR_S, HourlyUsage
from lockgate.store.models import Price, Tenant, UsageRecord
from lockgate.store.sqlite import open_store

DAY = 24 * HOUR_S
START = 1_760_000_400 - 1_760_000_400 % DAY  # a UTC midnight
CLEAN_DAYS = 15  # day 0 is the first baseline; days 1-14 are scanned for false positives
PRICES = {"small": Price(prompt=0.5, completion=1.5, cached_prompt=0.05),
          "big": Price(prompt=2.5, completion=7.5, cached_prompt=0.25)}


@dataclass
class Profile:
    rate: float  # mean requests per hour
    prompt: tuple[int, int]
    completion: tuple[int, int]
    hit: float  # cached share of the prompt
    big: float = 0.1  # share of requests to the expensive model


PROFILES = {
    "t0": Profile(30, (400, 800), (100, 300), 0.5),
    "t1": Profile(40, (300, 900), (50, 400), 0.3),
    "t2": Profile(25, (500, 1000), (100, 200), 0.5),
    "t3": Profile(30, (2500, 3500), (30, 70), 0.95),  # retrieval-heavy: most of its prompt is cached
    "t4": Profile(35, (400, 600), (100, 300), 0.4),
}
KEY_SHARES = (("a", 0.5), ("b", 0.3), ("c", 0.2))

# The injected events: (tenant, hour offset from START)
H_REQUESTS = START + CLEAN_DAYS * DAY + 11 * HOUR_S
H_TOKENS = H_REQUESTS + 2 * HOUR_S
H_MIX = H_REQUESTS + 4 * HOUR_S
H_CACHE = H_REQUESTS + 6 * HOUR_S
H_DROP = H_REQUESTS + 8 * HOUR_S
END = START + (CLEAN_DAYS + 2) * DAY


def _hour_rows(rng: random.Random, tenant: str, hour: int, n: int, p: Profile, *, tpr: float = 1.0,
               big: float | None = None, hit: float | None = None, key_only: str | None = None) -> list[UsageRecord]:
    out = []
    big = p.big if big is None else big
    hit = p.hit if hit is None else hit
    for i in range(n):
        key = rng.choices([k for k, _ in KEY_SHARES], [w for _, w in KEY_SHARES])[0]
        scale = tpr if key_only in (None, key) else 1.0
        prompt = int(rng.randint(*p.prompt) * scale)
        completion = int(rng.randint(*p.completion) * scale)
        cached = int(prompt * hit)
        model = "big" if rng.random() < big else "small"
        cost = PRICES[model].cost(prompt, completion, cached)
        out.append(UsageRecord(f"{tenant}-{hour}-{i}", tenant, f"{tenant}-{key}", model, prompt, completion, cached,
                               None, None, None, "stop", 200, cost, hour + rng.random() * (HOUR_S - 1)))
    return out


def _poisson(rng: random.Random, lam: float) -> int:
    # Normal approximation (the rates are tens per hour), never negative.
    return max(0, round(rng.gauss(lam, math.sqrt(lam))))


@functools.cache
def ledger(seed: int = 7) -> list[UsageRecord]:
    rng = random.Random(seed)
    rows: list[UsageRecord] = []
    for tenant, p in PROFILES.items():
        for hour in range(START, END, HOUR_S):
            # A daily cycle: quiet at 03:00 UTC, busiest at 15:00 (+-30%).
            lam = p.rate * (1 + 0.3 * math.sin(2 * math.pi * ((hour % DAY) / DAY - 0.375)))
            n, kw = _poisson(rng, lam), {}
            if tenant == "t0" and hour == H_REQUESTS:
                n *= 5
            elif tenant == "t1" and hour == H_TOKENS:
                kw = {"tpr": 8.0, "key_only": "b"}
            elif tenant == "t2" and hour == H_MIX:
                kw = {"big": 0.8}
            elif tenant == "t3" and hour == H_CACHE:
                kw = {"hit": 0.0}
            elif tenant == "t4" and hour == H_DROP:
                n = max(1, n // 50)
            rows += _hour_rows(rng, tenant, hour, n, p, **kw)
    return rows


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    s = open_store(tmp_path_factory.mktemp("anomaly"))
    for tenant in PROFILES:
        s.create_tenant(Tenant(id=tenant, name=tenant, prices=dict(PRICES)), "test")
    s.settle(ledger())
    yield s
    s.close()


def _by_tenant(found: list) -> dict[str, list]:
    out: dict[str, list] = {}
    for a in found:
        out.setdefault(a.tenant_id, []).append(a)
    return out


def _one(found: list, **match: object):  # noqa: ANN202
    hits = [a for a in found if all(getattr(a, k) == v for k, v in match.items())]
    assert len(hits) == 1, (match, [a.payload() for a in found])
    return hits[0]


def test_two_clean_weeks_raise_nothing(store) -> None:  # noqa: ANN001
    first, last = START + DAY, START + CLEAN_DAYS * DAY - HOUR_S
    found = scan_hours(store, first, last)
    assert found == [], [a.payload() for a in found[:5]]
    # The quiet days were judged, not skipped: every series had its full baseline.
    index = build_index(store.hourly_usage(START, START + CLEAN_DAYS * DAY))
    assert len(index) == 5 * (1 + 3 + 2)
    # ... and the same detector with a hair trigger does flag noise there (the margin is real).
    jumpy = AnomalyConfig(spike_z=1.0, spike_ratio=1.1, min_cost_usd=0.0001, min_tokens=100, noise_z=1.0)
    assert scan_hours(store, first, first + DAY, jumpy)


def test_request_count_spike(store) -> None:  # noqa: ANN001
    found = scan(store, H_REQUESTS + HOUR_S + 5)
    assert set(_by_tenant(found)) == {"t0"}
    for metric in ("cost_usd", "tokens"):
        a = _one(found, tenant_id="t0", key_id=None, model=None, metric=metric)
        assert a.direction == "spike" and a.hour == H_REQUESTS
        assert a.cause["likely"] == "requests", a.cause
        assert 3.5 < a.ratio < 9 and a.z > 4  # x5 requests at a busy hour, against the day's median
        rq = a.cause["requests"]
        assert 3.5 < rq["observed"] / rq["baseline"] < 9
        assert a.id == f"anomaly:t:t0:{metric}:{H_REQUESTS}:spike"


def test_tokens_per_request_spike_on_one_key(store) -> None:  # noqa: ANN001
    found = scan(store, H_TOKENS + HOUR_S)
    assert set(_by_tenant(found)) == {"t1"}
    a = _one(found, key_id="t1-b", metric="tokens")
    assert a.direction == "spike" and a.cause["likely"] == "tokens_per_request", a.cause
    tpr = a.cause["tokens_per_request"]
    assert 6 < tpr["observed"] / tpr["baseline"] < 10
    assert not [x for x in found if x.key_id in ("t1-a", "t1-c")]  # the other keys are quiet


def test_model_mix_shift_to_the_expensive_model(store) -> None:  # noqa: ANN001
    found = scan(store, H_MIX + HOUR_S)
    assert set(_by_tenant(found)) == {"t2"}
    a = _one(found, tenant_id="t2", key_id=None, model=None, metric="cost_usd")
    assert a.direction == "spike" and a.cause["likely"] == "model_mix", a.cause
    mix = a.cause["model_mix"]
    assert mix["model"] == "big" and mix["baseline_share"] < 0.15 and mix["observed_share"] > 0.6
    assert "big" in a.cause["summary"]
    assert not [x for x in found if x.scope == "tenant" and x.metric == "tokens"]  # same tokens, dearer
    assert _one(found, model="big", metric="cost_usd").cause["likely"] == "requests"  # its own series grew


def test_cache_hit_rate_collapse(store) -> None:  # noqa: ANN001
    found = scan(store, H_CACHE + HOUR_S)
    assert set(_by_tenant(found)) == {"t3"}
    a = _one(found, tenant_id="t3", key_id=None, model=None, metric="cost_usd")
    assert a.direction == "spike" and a.cause["likely"] == "cache_hit_rate", a.cause
    assert a.cause["cache_hit_rate"]["observed"] == 0 and a.cause["cache_hit_rate"]["baseline"] > 0.85
    assert not [x for x in found if x.metric == "tokens"]  # as many tokens as ever


def test_traffic_drop(store) -> None:  # noqa: ANN001
    found = scan(store, H_DROP + HOUR_S)
    assert set(_by_tenant(found)) == {"t4"}
    a = _one(found, tenant_id="t4", key_id=None, model=None, metric="tokens")
    assert a.direction == "drop" and a.cause["likely"] == "requests" and a.ratio < 0.1 and a.z < -2.5
    assert a.cause["requests"]["observed"] < 0.1 * a.cause["requests"]["baseline"]
    assert all(x.direction == "drop" for x in found)
    payload = json.loads(json.dumps(a.payload()))  # JSON-able as the webhook sends it
    assert payload["direction"] == "drop" and payload["hour_utc"].endswith(":00:00Z")


def test_metrics_gauge_counts_the_last_scan(store) -> None:  # noqa: ANN001
    m = AnomalyMetrics(TenantLabels(cap=1))
    m.update(scan(store, H_REQUESTS + HOUR_S) + scan(store, H_DROP + HOUR_S))
    samples = {(s.labels["tenant"], s.labels["direction"]): s.value for fam in m.collect() for s in fam.samples}
    assert samples[("t0", "spike")] >= 2 and samples[("other", "drop")] >= 2  # t4 beyond the label cap
    m.update([])
    assert all(s.value == 0 for fam in m.collect() for s in fam.samples)  # cleared, not vanished


# ---- the rules below the store: floors, thin baselines, zeros ------------------------------------

def _rows(tenant: str, per_hour: list[tuple[int, int, int]], end: int) -> list[HourlyUsage]:
    """(requests, tokens, cost_nusd) per hour, the last one at `end`."""
    first = end - (len(per_hour) - 1) * HOUR_S
    return [HourlyUsage(tenant, "k", "m", first + i * HOUR_S, r, t, 0, 0, c)
            for i, (r, t, c) in enumerate(per_hour) if r]


def test_tiny_spend_tripling_is_not_an_alert() -> None:
    end = START
    rows = _rows("t", [(1, 10, 1000)] * 24 + [(3, 30, 3000)], end)  # $0.000001 -> $0.000003
    assert detect_hour(build_index(rows), end) == []


def test_zero_baseline_spike_has_no_ratio_and_sparse_baselines_never_drop() -> None:
    end = START
    hours = [(1, 100, 10)] + [(0, 0, 0)] * 23 + [(400, 400_000, 200_000_000)]
    found = detect_hour(build_index(_rows("t", hours, end)), end)
    assert {(a.metric, a.direction, a.ratio) for a in found if a.scope == "tenant"} == {
        ("cost_usd", "spike", None), ("tokens", "spike", None)}
    assert all(math.isfinite(a.z) for a in found)
    sparse = [(50, 50_000, 50_000_000) if i % 3 == 0 else (0, 0, 0) for i in range(24)] + [(0, 0, 0)]
    assert detect_hour(build_index(_rows("t", sparse, end)), end) == []


def test_a_new_scope_is_not_judged() -> None:
    end = START
    rows = _rows("t", [(100, 100_000, 10**8)] * 5 + [(1000, 10**6, 10**9)], end)
    assert detect_hour(build_index(rows), end) == []  # 5 hours of history < min_history_hours


def test_explain_with_no_traffic_at_all() -> None:
    cause = explain([{}] * 24, {}, "cost_usd", "drop")
    assert cause["likely"] == "requests" and json.dumps(cause)


def test_last_complete_hour() -> None:
    assert last_complete_hour(START + 3 * HOUR_S) == START + 2 * HOUR_S
    assert last_complete_hour(START + 3 * HOUR_S + 3599.9) == START + 2 * HOUR_S
    assert last_complete_hour(time.time()) % HOUR_S == 0


# ---- PostgreSQL: the same hourly aggregates ---------------------------------------------------------

def test_hourly_usage_is_the_same_on_postgresql(pg_url: str, tmp_path: Path) -> None:
    from lockgate.store.postgres import PostgresStore

    edge = START + 5 * HOUR_S
    rows = [UsageRecord("e0", "t0", "t0-a", "small", 10, 5, 2, None, None, None, "stop", 200, 0.000001, edge),
            UsageRecord("e1", "t0", "t0-a", "small", 10, 5, 2, None, None, None, "stop", 200, 0.000002, edge - 0.001),
            UsageRecord("e2", "t0", None, "big", 7, 1, 0, None, None, None, "stop", 200, 1e-9, edge + HOUR_S - 1e-3),
            UsageRecord("e3", None, None, "big", 7, 1, 0, None, None, None, "stop", 200, 0.5, edge)]  # open mode
    rows += [r for r in ledger() if r.created_at < START + DAY][::3]  # every tenant's first day, a third
    pg, lite = PostgresStore(pg_url), open_store(tmp_path)
    try:
        for s in (pg, lite):
            s.create_tenant(Tenant(id="t0", name="t0"), "test")
            s.settle(rows)
        since, until = START, START + DAY
        got = pg.hourly_usage(since, until)
        assert got == lite.hourly_usage(since, until) and got
        at_edge = [r for r in got if r.hour == edge and r.key_id == "t0-a" and r.model == "small"]
        assert len(at_edge) == 1 and at_edge[0].cost_nusd == sum(
            r.cost_nusd for r in lite.hourly_usage(edge, edge + HOUR_S) if r.key_id == "t0-a" and r.model == "small")
        assert [r for r in got if r.hour == edge and r.model == "big" and r.key_id is None][0].cost_nusd == 1
        assert all(r.tenant_id is not None for r in got)
        assert pg.hourly_usage(since, until, "t1") == lite.hourly_usage(since, until, "t1")
        assert {r.tenant_id for r in pg.hourly_usage(since, until, "t1")} == {"t1"}
        hour = START + 13 * HOUR_S
        assert [a.payload() for a in scan(pg, hour + HOUR_S)] == [a.payload() for a in scan(lite, hour + HOUR_S)]
    finally:
        pg.close()
        lite.close()


# ---- GET /admin/anomalies ------------------------------------------------------------------------

def test_admin_anomalies_route(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from lockgate.engine.config import EngineConfig
    from lockgate.server.app import build_app
    from lockgate.server.config import ServerConfig

    app = build_app(EngineConfig(load_format="fake", max_model_len=128),
                    ServerConfig(data_dir=str(tmp_path), admin_key="sk-admin-test", request_log="off",
                                 allowed_hosts=["testserver"]))
    root = {"Authorization": "Bearer sk-admin-test"}
    with TestClient(app) as client:
        ids, keys = [], {}
        for name in ("alpha", "beta"):
            t = client.post("/admin/tenants", json={"name": name}, headers=root).json()
            ids.append(t["id"])
            for scopes in (["admin"], ["inference"]):
                r = client.post(f"/admin/tenants/{t['id']}/keys", json={"name": scopes[0], "scopes": scopes},
                                headers=root)
                assert r.status_code == 201, r.text
                keys[(name, scopes[0])] = {"Authorization": f"Bearer {r.json()['key']}"}
        # 30 quiet hours, then the last complete hour at x6 for both tenants.
        now = time.time()
        spike = last_complete_hour(now)
        rows = []
        for tid in ids:
            for h in range(spike - 30 * HOUR_S, spike + HOUR_S, HOUR_S):
                for i in range(60 if h == spike else 10):
                    rows.append(UsageRecord(f"{tid}-{h}-{i}", tid, None, "m", 2000, 500, 0, None, None, None, "stop",
                                            200, 0.01, h + 60 + i))
        app.state.lockgate.gateway.store.settle(rows)

        r = client.get("/admin/anomalies", headers=root)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "list" and body["until"] == spike + HOUR_S
        seen = {(a["tenant_id"], a["metric"], a["direction"], a["hour"]) for a in body["data"] if a["scope"] == "tenant"}
        assert seen == {(t, m, "spike", spike) for t in ids for m in ("cost_usd", "tokens")}
        a = body["data"][0]
        assert a["cause"]["likely"] == "requests" and a["ratio"] == 6.0 and a["id"].startswith("anomaly:")

        only = client.get("/admin/anomalies", params={"tenant": ids[1]}, headers=root).json()["data"]
        assert only and {a["tenant_id"] for a in only} == {ids[1]}
        own = client.get("/admin/anomalies", headers=keys[("alpha", "admin")]).json()["data"]
        assert own and {a["tenant_id"] for a in own} == {ids[0]}  # a tenant admin sees its own only
        r = client.get("/admin/anomalies", params={"tenant": ids[1]}, headers=keys[("alpha", "admin")])
        assert r.status_code == 404 and r.json()["error"]["param"] == "tenant_id"
        assert client.get("/admin/anomalies", headers=keys[("alpha", "inference")]).status_code == 403

        week_ago = client.get("/admin/anomalies", params={"since": str(now - 7 * DAY + 60)}, headers=root)
        assert week_ago.status_code == 200 and len(week_ago.json()["data"]) == len(body["data"])
        for bad in ("yesterday", str(now - 7 * DAY - 60), str(now + 3600), str(2**70), "nan", "inf", "-1",
                    "9" * 5000, "2026-13-45", "\u202e1"):
            r = client.get("/admin/anomalies", params={"since": bad}, headers=root)
            assert r.status_code == 400, (bad[:40], r.text)
            err = r.json()["error"]
            assert err["param"] == "since" and err["message"], err
        r = client.get("/admin/anomalies", params={"tenant": "x" * 5000}, headers=root)
        assert r.status_code == 400 and r.json()["error"]["param"] == "tenant"
        doc = client.get("/openapi.json", headers=root).json()["paths"]["/admin/anomalies"]["get"]
        assert {p["name"] for p in doc["parameters"]} == {"since", "tenant"} and "400" in doc["responses"]
