"""`lockgate alerts secret | list`: the store's signing secret (stable, the one the server signs with)
and recent alerts with their delivery state; bad options exit 2 with a clear message."""
from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from lockgate.cli import app
from lockgate.gateway.webhooks import load_secret
from lockgate.store.alert_ops import Alert
from lockgate.store.sqlite import open_store

runner = CliRunner()


def _run(data_dir: Path, *args: str, env: dict[str, str] | None = None):  # noqa: ANN202
    return runner.invoke(app, ["alerts", *args, "--data-dir", str(data_dir)], env=env)


def test_secret_is_made_once_and_is_what_the_server_signs_with(tmp_path: Path) -> None:
    d = tmp_path / "d"
    first = _run(d, "secret", env={"LOCKGATE_ALERT_SECRET": ""})
    assert first.exit_code == 0, first.output
    secret = first.stdout.strip()
    assert len(secret) == 64 and int(secret, 16) >= 0
    assert _run(d, "secret").stdout.strip() == secret
    store = open_store(d)
    try:
        assert load_secret(store) == secret.encode()
    finally:
        store.close()


def test_list_shows_alerts_and_deliveries(tmp_path: Path) -> None:
    d = tmp_path / "d"
    store = open_store(d)
    try:
        store.raise_alert(Alert("budget:t:t1:80:0", "budget", "t1", None,
                                {"kind": "budget", "scope": "tenant", "tenant_name": "acme", "threshold_pct": 80.0,
                                 "period": "month", "budget_usd": 10.0, "spent_usd": 8.5}), ["https://h.example/x"])
        store.delivery_abandoned("budget:t:t1:80:0", "https://h.example/x", "HTTP 500", 1.0)
    finally:
        store.close()
    r = _run(d, "list")
    assert r.exit_code == 0, r.output
    assert "budget:t:t1:80:0" in r.stdout and "80% of month budget $10.00" in r.stdout
    assert "failed" in r.stdout and "HTTP 500" in r.stdout
    data = json.loads(_run(d, "list", "--json").stdout)
    assert data[0]["deliveries"][0]["state"] == "failed" and data[0]["deliveries"][0]["attempts"] == 1
    assert _run(d, "list", "--kind", "anomaly").stdout.strip() == "no alerts"


def test_bad_options_exit_2(tmp_path: Path) -> None:
    d = tmp_path / "d"
    for args, what in ((("--kind", "nope"), "--kind"), (("--limit", "0"), "--limit"),
                       (("--limit", str(2 ** 70)), ""), (("--since-hours", "nan"), "--since-hours"),
                       (("--since-hours", "-1"), "--since-hours")):
        r = _run(d, "list", *args)
        assert r.exit_code == 2, (args, r.output)
        assert what in r.output and "Traceback" not in r.output
