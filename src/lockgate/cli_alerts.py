"""`lockgate alerts secret | list`: the alert webhooks' signing secret and the alerts raised, from a shell.

Both open the store in `--data-dir` (or the PostgreSQL store of `--store`), as the admin
commands do; whoever can open the database owns it anyway.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Annotated, Any, Optional

import typer

from lockgate.cli_admin import DataDirOpt, StoreOpt, open_cli_store

alerts_app = typer.Typer(no_args_is_help=True, help="Budget and anomaly alerts: the webhook signing secret, "
                                                    "alerts raised and their deliveries.")

KINDS = ("budget", "anomaly")


def register(app: typer.Typer) -> None:
    app.add_typer(alerts_app, name="alerts")


def _fail(msg: str, code: int = 2) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@alerts_app.command("secret")
def secret(data_dir: DataDirOpt = None, store: StoreOpt = None) -> None:
    """Print the secret alert webhooks are signed with (HMAC-SHA256 keyed by this text's UTF-8 bytes;
    made once per store, shared by every instance). $LOCKGATE_ALERT_SECRET, when the server has it, wins."""
    from lockgate.gateway.webhooks import SECRET_ENV, store_secret

    if os.environ.get(SECRET_ENV):
        typer.secho(f"note: {SECRET_ENV} is set here; a server started with it signs with that value, "
                    "not with the store's secret below", err=True)
    with open_cli_store(data_dir, store) as st:
        typer.echo(store_secret(st))


@alerts_app.command("list")
def list_alerts(
    data_dir: DataDirOpt = None, store: StoreOpt = None,
    kind: Annotated[Optional[str], typer.Option(help="budget | anomaly")] = None,
    tenant: Annotated[Optional[str], typer.Option(help="only this tenant's alerts (its id)")] = None,
    since_hours: Annotated[Optional[float], typer.Option(help="only alerts raised in the last N hours")] = None,
    limit: Annotated[int, typer.Option(help="at most this many (1-10000), newest first")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of lines")] = False,
) -> None:
    """Recent alerts, newest first, with each receiver's delivery state."""
    if kind is not None and kind not in KINDS:
        _fail(f"--kind: must be one of {', '.join(KINDS)}, got {kind!r}")
    if not 1 <= limit <= 10_000:
        _fail(f"--limit: must be in [1, 10000], got {limit}")
    since = None
    if since_hours is not None:
        if not math.isfinite(since_hours) or since_hours <= 0:
            _fail(f"--since-hours: must be a positive number, got {since_hours}")
        since = time.time() - since_hours * 3600.0
    with open_cli_store(data_dir, store) as st:
        alerts = st.list_alerts(kind=kind, tenant_id=tenant, since=since, limit=limit)
    if as_json:
        typer.echo(json.dumps(alerts, indent=2, ensure_ascii=False))
        return
    if not alerts:
        typer.echo("no alerts")
        return
    for a in alerts:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(a["created_at"]))
        typer.echo(f"{when}Z  {a['id']}  {_summary(a['payload'])}")
        for d in a["deliveries"]:
            err = f"  ({d['last_error']})" if d["last_error"] else ""
            typer.echo(f"    {d['state']:<9} {d['attempts']} attempt(s)  {d['url']}{err}")
        if not a["deliveries"]:
            typer.echo("    no receivers (audit log only)")


def _summary(p: dict[str, Any]) -> str:
    from lockgate.gateway.usage_view import usd_rounded
    from lockgate.store.money import nano

    if p.get("kind") == "budget":
        who = f"key {p.get('key_id')}" if p.get("scope") == "key" else f"tenant {p.get('tenant_name')}"
        return (f"{who}: {p.get('threshold_pct'):g}% of {p.get('period')} budget "
                f"{usd_rounded(nano(p.get('budget_usd')))} (spent {usd_rounded(nano(p.get('spent_usd')))})")
    return str(p.get("summary") or p.get("message") or p.get("kind") or "")
