"""Budget alerts: thresholds raised once per threshold and period (across scans and instances),
delivered by signed webhooks to a real local receiver, retried with backoff until it answers,
private addresses refused, the audit log, and a hanging receiver never delaying a request."""
from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from lockgate.gateway.alerts import AlertScanner, AlertSettings, budget_statuses, crossed, valid_thresholds
from lockgate.gateway.webhooks import (
    ALERT_ID_HEADER,
    SIGNATURE_HEADER,
    SenderSettings,
    WebhookSender,
    _public,
    body_of,
    check_url,
    load_secret,
    sign,
    verify,
)
from lockgate.store.models import ApiKey, Tenant, UsageRecord
from lockgate.store.sqlite import open_store
from tests.gateway.webhook_receiver import Receiver

JAN = datetime(2030, 1, 15, 12, tzinfo=UTC).timestamp()  # mid-month: day and month periods both hold
FEB = datetime(2030, 2, 3, 9, tzinfo=UTC).timestamp()


def _spend(store: Any, tenant: str, key: str | None, usd: float, at: float) -> None:
    store.settle([UsageRecord(f"r-{uuid.uuid4().hex}", tenant, key, "m", 10, 5, 0, None, None, None, "stop", 200,
                              usd, created_at=at)])


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Any]:
    st = open_store(tmp_path / "data")
    st.create_tenant(Tenant("t1", "acme", budget_usd=1.0, budget_period="month",
                            alert_thresholds=[50, 80, 100], alert_webhook="http://tenant.example/hook"), "test")
    st.create_key(ApiKey("k1", "t1", "ci", "lg-x", "h1", budget_usd=0.2, budget_period="day",
                         alert_thresholds=[50]), "test")
    st.create_tenant(Tenant("t2", "quiet", budget_usd=5.0, alert_thresholds=[]), "test")  # gauges only
    yield st
    st.close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


def _ids(store: Any) -> set[str]:
    return {a["id"] for a in store.list_alerts()}


def test_each_threshold_once_per_period_across_scans_and_instances(store: Any, tmp_path: Path) -> None:
    scanner = AlertScanner(AlertSettings(receivers=["http://ops.example/a"]))
    _spend(store, "t1", None, 0.4, JAN - 3600)
    assert scanner.scan(store, JAN) == 0  # 40 %: nothing crossed
    _spend(store, "t1", None, 0.6, JAN - 60)  # 40 % -> 100 %: 50, 80 and 100 each raised
    assert scanner.scan(store, JAN) == 3
    start = int(datetime(2030, 1, 1, tzinfo=UTC).timestamp())
    assert _ids(store) == {f"budget:t:t1:{p}:{start}" for p in (50, 80, 100)}
    assert scanner.scan(store, JAN + 5) == 0  # a second scan: nothing new
    other = open_store(tmp_path / "data")  # a second instance on the same store
    try:
        assert AlertScanner(AlertSettings()).scan(other, JAN + 10) == 0
    finally:
        other.close()
    a100 = next(a for a in store.list_alerts() if a["id"].startswith("budget:t:t1:100:"))
    p = a100["payload"]
    assert (p["kind"], p["scope"], p["tenant_id"], p["tenant_name"], p["key_id"]) == ("budget", "tenant", "t1",
                                                                                       "acme", None)
    assert (p["threshold_pct"], p["budget_usd"], p["spent_usd"], p["remaining_usd"]) == (100, 1.0, 1.0, 0.0)
    assert p["period"] == "month" and p["period_start"] == "2030-01-01T00:00:00Z"
    # Receivers: the server's and the tenant's own webhook.
    assert {d["url"] for d in a100["deliveries"]} == {"http://ops.example/a", "http://tenant.example/hook"}
    # A new month starts from zero, and crossing again raises again (new ids).
    assert scanner.scan(store, FEB) == 0
    _spend(store, "t1", None, 0.55, FEB - 60)
    assert scanner.scan(store, FEB) == 1
    feb = int(datetime(2030, 2, 1, tzinfo=UTC).timestamp())
    assert f"budget:t:t1:50:{feb}" in _ids(store) and len(_ids(store)) == 4


def test_key_budget_alert_and_exact_sums(store: Any) -> None:
    scanner = AlertScanner(AlertSettings())
    for _ in range(10):  # 10 x 0.01 = 0.1: exactly half the key's 0.2 day budget (floats would drift)
        _spend(store, "t1", "k1", 0.01, JAN - 30)
    _spend(store, "t1", "k1", 5.0, JAN - 86400 * 2)  # an earlier day: not in the key's period
    assert scanner.scan(store, JAN) == 4  # the key's 50 %, and its tenant's month is over 100 %
    day = int(datetime(2030, 1, 15, tzinfo=UTC).timestamp())
    (a,) = [x for x in store.list_alerts() if x["key_id"] == "k1"]
    assert a["id"] == f"budget:k:k1:50:{day}" and a["payload"]["spent_usd"] == 0.1
    assert a["payload"]["scope"] == "key" and a["payload"]["key_name"] == "ci"
    st = {(s.scope, (s.key or s.tenant).id): s for s in budget_statuses(store, JAN)}
    assert st[("key", "k1")].spent_nusd == 100_000_000
    assert st[("tenant", "t1")].spent_nusd == 5_100_000_000  # the month holds both days
    assert st[("tenant", "t2")].spent_nusd == 0 and st[("tenant", "t2")].thresholds == []


def test_audit_log_has_the_alert(store: Any) -> None:
    _spend(store, "t1", None, 0.5, JAN - 1)
    AlertScanner(AlertSettings()).scan(store, JAN)
    recs = [r for r in store.list_audit() if r.action == "alert.budget"]
    assert len(recs) == 1 and recs[0].details["alert_id"].startswith("budget:t:t1:50:")
    assert recs[0].details["threshold_pct"] == 50 and recs[0].actor == "system"
    assert store.verify_audit()[0]


def test_thresholds_and_crossing_are_checked_exactly() -> None:
    assert valid_thresholds([math.nan, -1, 0, 150, "50", True, 2 ** 70, 50, 50.0, 33.3, math.inf]) == [33.3, 50.0]
    assert valid_thresholds("50,80") == [] and valid_thresholds(None) == []
    assert crossed(500_000_000, 1_000_000_000, 50) and not crossed(499_999_999, 1_000_000_000, 50)
    assert crossed(333_000_000, 1_000_000_000, 33.3) and not crossed(332_999_999, 1_000_000_000, 33.3)


def _sender(secret: bytes, **kw: Any) -> tuple[WebhookSender, list[str]]:
    results: list[str] = []

    async def run_store(fn: Any, *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    settings = SenderSettings(**{"timeout_s": 0.5, "poll_s": 0.02, "base_backoff_s": 0.05, **kw})
    return WebhookSender(settings, secret, run_store, results.append), results


async def _until_settled(sender: WebhookSender, store: Any, deadline_s: float = 15.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        await sender.send_due(store)
        states = [d["state"] for a in store.list_alerts() for d in a["deliveries"]]
        if states and "pending" not in states:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("deliveries still pending")


def test_delivery_is_signed_and_retried_until_the_receiver_answers(store: Any, receiver: Receiver) -> None:
    receiver.script = ["500", "hang", "ok"]
    receiver.hang_s = 3.0
    tenant = store.get_tenant("t1")
    tenant.alert_webhook = None  # only the local receiver here
    store.update_tenant(tenant, {"alert_webhook": None}, "test")
    _spend(store, "t1", None, 0.5, JAN - 1)
    AlertScanner(AlertSettings(receivers=[receiver.url])).scan(store, JAN)
    secret = load_secret(store)
    assert secret == load_secret(store) and len(secret) == 64  # made once per store, hex text

    async def go() -> list[str]:
        sender, results = _sender(secret, allow_private=True)
        first = time.time()
        await sender.send_due(store, first)  # 500: retried later, not at once
        assert await sender.send_due(store, time.time()) == 0  # backing off: not due again at once
        await _until_settled(sender, store)
        await sender.aclose()
        return results

    results = asyncio.run(go())
    mine = [g for g in receiver.got if g.path == "/hook"]
    assert len(mine) == 3, [g.headers for g in mine]  # 500, timeout, then 204: delivered at least once
    ids = {g.headers[ALERT_ID_HEADER.lower()] for g in mine}
    assert len(ids) == 1 and ids.pop().startswith("budget:t:t1:50:")
    for g in mine:
        assert verify(secret, g.body, g.headers[SIGNATURE_HEADER.lower()])
        assert not verify(secret, g.body + b" ", g.headers[SIGNATURE_HEADER.lower()])
        assert json.loads(g.body)["threshold_pct"] == 50
    assert [g.headers["x-lockgate-delivery-attempt"] for g in mine] == ["1", "2", "3"]
    assert mine[1].at - mine[0].at >= 0.02  # backed off (jittered half of 0.05 s at least)
    (a,) = store.list_alerts()
    (d,) = [d for d in a["deliveries"] if d["url"] == receiver.url]
    assert d["state"] == "delivered" and d["attempts"] == 3 and d["last_error"] is None
    assert results.count("delivered") == 1 and results.count("failed") >= 2


def test_private_receivers_are_refused_without_the_flag(store: Any, receiver: Receiver) -> None:
    _spend(store, "t1", None, 0.5, JAN - 1)
    localhost = receiver.url.replace("127.0.0.1", "localhost")  # a name resolving to loopback
    AlertScanner(AlertSettings(receivers=[receiver.url, localhost])).scan(store, JAN)

    async def go() -> list[str]:
        sender, results = _sender(b"s", max_attempts=3)
        await _until_settled(sender, store)
        await sender.aclose()
        return results

    results = asyncio.run(go())
    assert receiver.got == []  # nothing reached it
    (a,) = store.list_alerts()
    by_url = {d["url"]: d for d in a["deliveries"]}
    for url in (receiver.url, localhost):
        d = by_url[url]
        assert d["state"] == "failed" and d["attempts"] == 1 and "--alert-allow-private" in d["last_error"], d
    assert results.count("refused") == 2
    # A name that does not resolve (DNS may be down) is retried, then given up after max_attempts.
    d = by_url["http://tenant.example/hook"]
    assert d["state"] == "failed" and d["attempts"] == 3 and d["last_error"].startswith("gave up after 3"), d
    assert results.count("gave_up") == 1


def test_address_classification_and_url_checks() -> None:
    for addr in ("127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "0.0.0.0", "::1", "::",
                 "fe80::1", "fc00::1", "::ffff:127.0.0.1", "100.64.0.1", "224.0.0.1"):
        assert not _public(addr), addr
    for addr in ("8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"):
        assert _public(addr), addr
    check_url("https://hooks.example.com/x?y=1")
    for bad in ("ftp://x/", "http://", "file:///etc/passwd", "javascript:alert(1)", "http://a b/", "x" * 10_000_000,
                "http://h:99999/", "", "http://h/\n"):
        with pytest.raises(ValueError):
            check_url(bad)


def test_signature_is_over_the_exact_body_and_time() -> None:
    body = body_of({"b": 1, "a": "é"})
    assert body == '{"a":"é","b":1}'.encode()
    now = int(time.time())
    header = sign(b"k", body, now)
    assert header.startswith(f"t={now},v1=") and verify(b"k", body, header)
    assert not verify(b"other", body, header)
    assert not verify(b"k", body, sign(b"k", body, now - 3600))  # an old replay
    assert not verify(b"k", body, "garbage") and not verify(b"k", body, "t=x,v1=00")


def test_period_spend_and_alert_dedup_on_postgresql(pg_url: str) -> None:
    from lockgate.store.postgres import PostgresStore

    a, b = PostgresStore(pg_url), PostgresStore(pg_url)  # two instances on one store
    try:
        a.create_tenant(Tenant("t1", "acme", budget_usd=0.3, budget_period="day", alert_thresholds=[50, 100]),
                        "test")
        for _ in range(3):
            _spend(a, "t1", None, 0.1, JAN - 10)  # 0.1 + 0.1 + 0.1 == 0.3 exactly in nano-USD
        got = a.period_spend("tenant", ["t1", "nobody"], JAN - 3600, JAN - 86400, True)
        assert got["t1"].day == 300_000_000 and "nobody" not in got
        raised = [AlertScanner(AlertSettings()).scan(s, JAN) for s in (a, b)]
        assert sorted(raised) == [0, 2] and len(b.list_alerts()) == 2
    finally:
        a.close()
        b.close()


def test_a_hanging_receiver_never_delays_requests(tmp_path: Path, receiver: Receiver) -> None:
    from tests.server.conftest import start_server, wait_for

    receiver.script = ["hang"] * 50
    receiver.hang_s = 30.0
    admin = "alert-admin-key"
    srv = start_server(tmp_path, "--load-format", "fake", "--admin-key", admin, "--data-dir", str(tmp_path / "d"),
                       "--alert-webhook", receiver.url, "--alert-allow-private", "--alert-interval", "0.2",
                       "--no-slo-admission")
    try:
        h = {"Authorization": f"Bearer {admin}"}
        with httpx.Client(base_url=srv.base_url, headers=h, timeout=30) as c:
            r = c.post("/admin/tenants", json={"name": "acme", "budget_usd": 0.01, "alert_thresholds": [1],
                                               "prices": {"*": {"prompt": 100.0, "completion": 100.0}}})
            assert r.status_code == 201, r.text
            tid = r.json()["id"]
            r = c.post(f"/admin/tenants/{tid}/keys", json={"name": "k"})
            assert r.status_code == 201, r.text
            key = r.json()["key"]
        with httpx.Client(base_url=srv.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as c:
            c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4}).raise_for_status()
            assert wait_for(lambda: len(receiver.got) >= 1, 15), "the alert never reached the receiver"
            # The receiver now hangs on the alert; requests go on at full speed meanwhile.
            took = []
            for _ in range(5):
                t0 = time.monotonic()
                c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2}).raise_for_status()
                took.append(time.monotonic() - t0)
            assert max(took) < 2.0, took
            assert not receiver.release.is_set()  # still hanging when the requests finished
        with httpx.Client(base_url=srv.base_url, headers=h, timeout=30) as c:
            r = c.get("/admin/alerts")
            assert r.status_code == 200 and r.json()["data"][0]["tenant_id"] == tid
            text = c.get("/metrics").text
            assert 'lockgate:alerts_raised_total{kind="budget"} 1.0' in text
            assert f'lockgate:tenant_budget_usd{{period="month",tenant="{tid}"}} 0.01' in text
    finally:
        receiver.release.set()
        srv.stop()


def test_dns_is_checked_and_the_checked_address_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """A name resolving to any private address is refused; a public one is pinned (Host and SNI keep
    the name), so a second lookup at connect time cannot swap in another address."""
    answers = {"hooks.example.com": ["93.184.216.34"], "rebind.example.com": ["93.184.216.34", "10.0.0.5"],
               "v6.example.com": ["2606:2800:220:1::1"]}

    async def fake_getaddrinfo(self: Any, host: str, port: int, **kw: Any) -> list[Any]:
        return [(0, 0, 0, "", (a, port)) for a in answers[host]]

    monkeypatch.setattr(asyncio.BaseEventLoop, "getaddrinfo", fake_getaddrinfo)
    sender, _ = _sender(b"s")

    async def go() -> None:
        url, ext, host = await sender._target("https://user:pw@hooks.example.com/x?q=1")
        assert (url, ext, host) == ("https://user:pw@93.184.216.34:443/x?q=1", {"sni_hostname": "hooks.example.com"},
                                    "hooks.example.com")
        url, ext, host = await sender._target("http://v6.example.com:8080/")
        assert (url, ext, host) == ("http://[2606:2800:220:1::1]:8080/", {}, "v6.example.com:8080")
        with pytest.raises(Exception, match="10.0.0.5"):
            await sender._target("https://rebind.example.com/")
        await sender.aclose()

    asyncio.run(go())


def test_anomalies_are_raised_as_alerts_once_when_due(store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop's side of the detector's interface (`scan(store, now) -> [Anomaly]`): each finding an
    alert to the server's and the tenant's receivers, once, and the detector asked only when due."""
    from lockgate.gateway import anomaly

    class Found:
        id, tenant_id, key_id = "anomaly:t:t1:cost:1:spike", "t1", None

        def payload(self) -> dict[str, Any]:
            return {"kind": "anomaly", "id": self.id, "direction": "spike", "observed": 9.0}

    calls: list[float] = []
    monkeypatch.setattr(anomaly, "scan", lambda st, now: calls.append(now) or [Found()])
    scanner = AlertScanner(AlertSettings(receivers=["http://ops.example/a"], anomaly_interval_s=60))
    assert scanner.scan(store, JAN) == 1 and scanner.scan(store, JAN + 61) == 0  # the same id: once
    scanner.scan(store, JAN + 62)  # not due yet: the detector is not asked
    assert calls == [JAN, JAN + 61]
    (a,) = store.list_alerts(kind="anomaly")
    assert a["payload"]["direction"] == "spike" and a["key_id"] is None
    assert {d["url"] for d in a["deliveries"]} == {"http://ops.example/a", "http://tenant.example/hook"}
