"""`lockgate tenants | keys | usage | audit`: the admin API's operations on the store, from a shell.

Every command opens the store in `--data-dir` (default ./lockgate-data, env
LOCKGATE_DATA_DIR), or the PostgreSQL store of `--store` (env LOCKGATE_STORE_URL),
directly: it works with or without a running server (SQLite WAL lets both use
the file; every server notices admin changes within 2 s). Output is JSON
(`usage`: a table on a terminal, `--format json|csv|table` to choose); errors go
to stderr with a non-zero exit status.
The actor recorded in the audit log is "cli"; the CLI is a global admin (whoever can
open the database file can change it anyway).
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

if TYPE_CHECKING:
    from lockgate.gateway.tenants import AdminService

ACTOR = "cli"

DataDirOpt = Annotated[Optional[str], typer.Option(
    "--data-dir", envvar="LOCKGATE_DATA_DIR", show_envvar=True,
    help="directory of lockgate.db [default: ./lockgate-data]")]

StoreOpt = Annotated[Optional[str], typer.Option(
    "--store", envvar="LOCKGATE_STORE_URL", show_envvar=True,
    help="a PostgreSQL store, postgresql://USER@HOST[:PORT]/DB (instead of --data-dir; a password belongs in "
         "the environment variable, not the command line)")]

# A server that started open on this data dir stays open until restarted (gateway/gateway.py).
FIRST_TENANT_NOTE = (
    "note: this is the data directory's first tenant: a server started on it from now on requires keys. "
    "A server already running on it without --admin-key stays open (no keys needed) until it is "
    "restarted; restart it with --admin-key to keep the admin API.")

tenants_app = typer.Typer(no_args_is_help=True, help="Create, list, change and delete tenants.")
keys_app = typer.Typer(no_args_is_help=True, help="Create, list and revoke API keys (a tenant's, or global ones).")
audit_app = typer.Typer(no_args_is_help=True, help="The hash-chained audit log of admin actions.")


def register(app: typer.Typer) -> None:
    app.add_typer(tenants_app, name="tenants")
    app.add_typer(keys_app, name="keys")
    app.add_typer(usage_app, name="usage")
    app.add_typer(audit_app, name="audit")


def _fail(msg: str, code: int = 1) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _print(value: Any) -> None:
    typer.echo(value if isinstance(value, str) else json.dumps(value, indent=2, ensure_ascii=False))


@contextmanager
def open_cli_store(data_dir: str | None, store_url: str | None = None) -> Iterator[Any]:
    """The store of `--data-dir` or `--store` for one command; a failure to open or use it is a clean
    `error:` line and exit 1, never a traceback (also for `lockgate alerts`)."""
    import sqlite3

    from lockgate.store.schema import SchemaError
    from lockgate.store.sqlite import StoreError, open_store

    try:
        if store_url:
            from lockgate.store.postgres import PostgresStore

            store = PostgresStore(store_url)
        else:
            store = open_store(data_dir)
    except (StoreError, SchemaError, OSError, sqlite3.Error) as e:
        _fail(str(e))
    try:
        yield store
    except (StoreError, sqlite3.Error) as e:
        _fail(f"database error: {e}")
    finally:
        store.close()


@contextmanager
def _service(data_dir: str | None, store_url: str | None = None) -> Iterator[AdminService]:
    from lockgate.gateway.tenants import AdminService
    from lockgate.server.errors import APIError

    with open_cli_store(data_dir, store_url) as store:
        try:
            yield AdminService(store)
        except APIError as e:
            _fail(e.message)


# ---------------------------------------------------------------- tenant options

def _json_opt(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as e:
        _fail(f"--json: not valid JSON: {e}", 2)
    if not isinstance(value, dict):
        _fail("--json: must be a JSON object", 2)
    return value


def _prices(specs: list[str] | None) -> dict[str, Any] | None:
    """MODEL=PROMPT,COMPLETION[,CACHED_PROMPT] (USD per 1M tokens) -> the prices object."""
    if not specs:
        return None
    out: dict[str, Any] = {}
    for spec in specs:
        model, sep, rates = spec.rpartition("=")
        parts = rates.split(",")
        if not sep or not model or len(parts) not in (2, 3):
            _fail(f"--price {spec!r}: expected MODEL=PROMPT,COMPLETION[,CACHED_PROMPT] (USD per 1M tokens)", 2)
        try:
            nums = [float(p) for p in parts]
        except ValueError:
            _fail(f"--price {spec!r}: prices must be numbers", 2)
        out[model] = {"prompt": nums[0], "completion": nums[1], **({"cached_prompt": nums[2]} if len(nums) == 3 else {})}
    return out


def _models(values: list[str] | None) -> list[str] | None:
    if not values:
        return None
    return [m.strip() for v in values for m in v.split(",") if m.strip()]


NameOpt = Annotated[Optional[str], typer.Option(help="display name")]
ModelsOpt = Annotated[Optional[list[str]], typer.Option(
    "--models", help="models the tenant may use, comma-separated or repeated; * = all")]
RpmOpt = Annotated[Optional[int], typer.Option(help="requests per minute")]
TpmOpt = Annotated[Optional[int], typer.Option(help="tokens per minute")]
ConcOpt = Annotated[Optional[int], typer.Option(help="requests in flight")]
MaxTokOpt = Annotated[Optional[int], typer.Option(help="cap on a request's max_tokens")]
PrioOpt = Annotated[Optional[str], typer.Option(help="priority class: interactive | standard | batch")]
WeightOpt = Annotated[Optional[float], typer.Option(
    help="fair-share weight within its class, 0.01 to 100 (default 1)")]
BudgetOpt = Annotated[Optional[float], typer.Option(help="budget in USD per period")]
PeriodOpt = Annotated[Optional[str], typer.Option(help="day | month | total")]
KeyBudgetOpt = Annotated[Optional[float], typer.Option(
    help="the key's own budget in USD per period (its tenant's holds too: the stricter wins)")]
PriceOpt = Annotated[Optional[list[str]], typer.Option(
    "--price", help="MODEL=PROMPT,COMPLETION[,CACHED_PROMPT] in USD per 1M tokens (MODEL may be *); repeatable")]
ThresholdOpt = Annotated[Optional[list[float]], typer.Option(
    "--alert-threshold", help="alert at this % of the budget, once per period, in (0, 100]; repeatable")]
WebhookOpt = Annotated[Optional[str], typer.Option(
    "--alert-webhook", help="the tenant's own alert receiver: an http(s) URL (no credentials in it)")]
HedgeOpt = Annotated[Optional[bool], typer.Option(
    "--hedge/--no-hedge", help="hedge the tenant's greedy or seeded non-streaming requests (a second copy "
    "when the first is slow; within the server's --hedge-budget)")]
JsonOpt = Annotated[Optional[str], typer.Option(
    "--json", help="the body exactly as the REST API takes it; other options override its fields")]


def _tenant_body(json_text: str | None, name: str | None, models: list[str] | None, rpm: int | None,
                 tpm: int | None, max_concurrency: int | None, max_tokens: int | None, priority: str | None,
                 budget_usd: float | None, budget_period: str | None, price: list[str] | None,
                 weight: float | None = None, alert_threshold: list[float] | None = None,
                 alert_webhook: str | None = None, hedge: bool | None = None) -> dict[str, Any]:
    body = _json_opt(json_text)
    given = {"name": name, "models": _models(models), "rpm": rpm, "tpm": tpm, "max_concurrency": max_concurrency,
             "max_tokens": max_tokens, "priority": priority, "weight": weight, "budget_usd": budget_usd,
             "budget_period": budget_period, "prices": _prices(price), "alert_thresholds": alert_threshold or None,
             "alert_webhook": alert_webhook, "hedge": hedge}
    body.update({k: v for k, v in given.items() if v is not None})
    return body


@tenants_app.command("create")
def tenants_create(
    name: NameOpt = None, models: ModelsOpt = None, rpm: RpmOpt = None, tpm: TpmOpt = None,
    max_concurrency: ConcOpt = None, max_tokens: MaxTokOpt = None, priority: PrioOpt = None,
    weight: WeightOpt = None, budget_usd: BudgetOpt = None, budget_period: PeriodOpt = None,
    price: PriceOpt = None, alert_threshold: ThresholdOpt = None, alert_webhook: WebhookOpt = None,
    hedge: HedgeOpt = None,
    json_body: JsonOpt = None, data_dir: DataDirOpt = None, store: StoreOpt = None,
) -> None:
    """Create a tenant (limits left out are unlimited); prints it with its id."""
    body = _tenant_body(json_body, name, models, rpm, tpm, max_concurrency, max_tokens, priority, budget_usd,
                        budget_period, price, weight, alert_threshold, alert_webhook, hedge)
    with _service(data_dir, store) as svc:
        first = not svc.store.list_tenants()
        _print(svc.create_tenant(body, actor=ACTOR))
    if first and not store:  # a shared store's instances turn keys on at once (docs/HORIZONTAL.md)
        typer.echo(FIRST_TENANT_NOTE, err=True)


@tenants_app.command("list")
def tenants_list(data_dir: DataDirOpt = None, store: StoreOpt = None) -> None:
    """List the tenants."""
    with _service(data_dir, store) as svc:
        _print(svc.list_tenants())


@tenants_app.command("get")
def tenants_get(tenant_id: Annotated[str, typer.Argument()], data_dir: DataDirOpt = None, store: StoreOpt = None) -> None:
    """Show one tenant."""
    with _service(data_dir, store) as svc:
        _print(svc.get_tenant(tenant_id))


@tenants_app.command("update")
def tenants_update(
    tenant_id: Annotated[str, typer.Argument()],
    name: NameOpt = None, models: ModelsOpt = None, rpm: RpmOpt = None, tpm: TpmOpt = None,
    max_concurrency: ConcOpt = None, max_tokens: MaxTokOpt = None, priority: PrioOpt = None,
    weight: WeightOpt = None, budget_usd: BudgetOpt = None, budget_period: PeriodOpt = None,
    price: PriceOpt = None, alert_threshold: ThresholdOpt = None, alert_webhook: WebhookOpt = None,
    hedge: HedgeOpt = None,
    unset: Annotated[Optional[list[str]], typer.Option(
        "--unset", help="a field to set to null (unlimited / default), e.g. --unset rpm; repeatable")] = None,
    json_body: JsonOpt = None, data_dir: DataDirOpt = None, store: StoreOpt = None,
) -> None:
    """Change only the given fields of a tenant."""
    body = _tenant_body(json_body, name, models, rpm, tpm, max_concurrency, max_tokens, priority, budget_usd,
                        budget_period, price, weight, alert_threshold, alert_webhook, hedge)
    for f in unset or []:
        body[f] = None  # an unknown name is rejected by the body model, like any typo
    with _service(data_dir, store) as svc:
        _print(svc.update_tenant(tenant_id, body, actor=ACTOR))


@tenants_app.command("delete")
def tenants_delete(tenant_id: Annotated[str, typer.Argument()], data_dir: DataDirOpt = None, store: StoreOpt = None) -> None:
    """Delete a tenant and revoke all its keys (its usage rows are kept)."""
    with _service(data_dir, store) as svc:
        _print(svc.delete_tenant(tenant_id, actor=ACTOR))


# ---------------------------------------------------------------- keys

@keys_app.command("create")
def keys_create(
    tenant_id: Annotated[Optional[str], typer.Argument(help="the key's tenant (leave out with --global)")] = None,
    global_: Annotated[bool, typer.Option(
        "--global", help="a key bound to no tenant: a global admin key (--scope admin, the default) or a "
                         "metrics scraper's (--scope metrics)")] = False,
    name: Annotated[Optional[str], typer.Option(help="display name")] = None,
    scope: Annotated[Optional[list[str]], typer.Option(
        "--scope", help="inference | admin | metrics; repeatable [default: inference; admin with --global]. "
                        "A tenant's admin key manages only that tenant")] = None,
    expires_at: Annotated[Optional[str], typer.Option(help="ISO-8601 time, e.g. 2027-01-01T00:00:00Z")] = None,
    rpm: RpmOpt = None, tpm: TpmOpt = None, max_concurrency: ConcOpt = None, max_tokens: MaxTokOpt = None,
    budget_usd: KeyBudgetOpt = None, budget_period: PeriodOpt = None, alert_threshold: ThresholdOpt = None,
    data_dir: DataDirOpt = None, store: StoreOpt = None,
) -> None:
    """Create an API key; the key itself is printed once, here, and never again."""
    if global_ == (tenant_id is not None):
        _fail("give a TENANT_ID or --global (a key bound to no tenant), not both", 2)
    given = {"name": name, "scopes": scope or None, "expires_at": expires_at, "rpm": rpm, "tpm": tpm,
             "max_concurrency": max_concurrency, "max_tokens": max_tokens, "budget_usd": budget_usd,
             "budget_period": budget_period, "alert_thresholds": alert_threshold or None}
    body = {k: v for k, v in given.items() if v is not None}
    with _service(data_dir, store) as svc:
        _print(svc.create_global_key(body, actor=ACTOR) if tenant_id is None
               else svc.create_key(tenant_id, body, actor=ACTOR))


@keys_app.command("list")
def keys_list(
    tenant: Annotated[Optional[str], typer.Argument(
        metavar="[TENANT_ID]", help="only this tenant's keys (as `keys create TENANT_ID`)")] = None,
    tenant_id: Annotated[Optional[str], typer.Option("--tenant-id", help="the same, as an option")] = None,
    data_dir: DataDirOpt = None, store: StoreOpt = None,
) -> None:
    """List keys (never the keys themselves: their prefixes)."""
    if tenant is not None and tenant_id is not None and tenant != tenant_id:
        _fail(f"TENANT_ID {tenant!r} and --tenant-id {tenant_id!r} disagree: give one", 2)
    with _service(data_dir, store) as svc:
        _print(svc.list_keys(tenant if tenant is not None else tenant_id))


@keys_app.command("update")
def keys_update(
    key_id: Annotated[str, typer.Argument()],
    name: Annotated[Optional[str], typer.Option(help="display name")] = None,
    expires_at: Annotated[Optional[str], typer.Option(help="ISO-8601 time, e.g. 2027-01-01T00:00:00Z")] = None,
    rpm: RpmOpt = None, tpm: TpmOpt = None, max_concurrency: ConcOpt = None, max_tokens: MaxTokOpt = None,
    budget_usd: KeyBudgetOpt = None, budget_period: PeriodOpt = None, alert_threshold: ThresholdOpt = None,
    unset: Annotated[Optional[list[str]], typer.Option(
        "--unset", help="a field to set to null (a limit unlimited, no budget, no thresholds, never expires), "
                        "e.g. --unset budget_usd; repeatable")] = None,
    json_body: JsonOpt = None, data_dir: DataDirOpt = None, store: StoreOpt = None,
) -> None:
    """Change only the given fields of a key (limits, budget, alert thresholds, name, expiry)."""
    body = _json_opt(json_body)
    given = {"name": name, "expires_at": expires_at, "rpm": rpm, "tpm": tpm, "max_concurrency": max_concurrency,
             "max_tokens": max_tokens, "budget_usd": budget_usd, "budget_period": budget_period,
             "alert_thresholds": alert_threshold or None}
    body.update({k: v for k, v in given.items() if v is not None})
    for f in unset or []:
        body[f] = None  # an unknown name is rejected by the body model, like any typo
    if not body:
        _fail("nothing to change: give at least one option (see --help)", 2)
    with _service(data_dir, store) as svc:
        _print(svc.update_key(key_id, body, actor=ACTOR))


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument()], data_dir: DataDirOpt = None, store: StoreOpt = None) -> None:
    """Revoke a key at once."""
    with _service(data_dir, store) as svc:
        _print(svc.revoke_key(key_id, actor=ACTOR))


# ---------------------------------------------------------------- usage and audit

usage_app = typer.Typer(help="The usage ledger: rows, totals per group, and `compare`.")
TextOpt = Optional[str]


@usage_app.callback(invoke_without_command=True)
def usage(
    ctx: typer.Context,
    tenant_id: Annotated[TextOpt, typer.Option("--tenant-id")] = None,
    key_id: Annotated[TextOpt, typer.Option("--key-id")] = None,
    model: Annotated[TextOpt, typer.Option()] = None,
    version: Annotated[TextOpt, typer.Option(help="NAME@VERSION (or VERSION of any model)")] = None,
    user: Annotated[TextOpt, typer.Option(help="the requests' OpenAI `user` field (the tenant's end user)")] = None,
    outcome: Annotated[TextOpt, typer.Option(help="a finish reason (stop, length, abort, error, rejected, "
                                                  "interrupted), ok or error")] = None,
    since: Annotated[TextOpt, typer.Option(help="ISO-8601 date/time or Unix seconds (inclusive)")] = None,
    until: Annotated[TextOpt, typer.Option(help="ISO-8601 date/time or Unix seconds (exclusive)")] = None,
    group_by: Annotated[str, typer.Option(
        "--group-by", help="request (the rows), refusals (refused requests, per hour), or totals per "
                           "tenant, key, model, version, class, user, day, hour, outcome, comma-separated "
                           "(tenant,model)")] = "request",
    format: Annotated[TextOpt, typer.Option(
        "--format", help="table | json | csv (default: table on a terminal, else json)")] = None,
    limit: Annotated[int, typer.Option(help="at most this many rows or groups")] = 1000,
    data_dir: DataDirOpt = None, store: StoreOpt = None,
) -> None:
    """The usage ledger: one row per request (newest first), or totals per group with the grand total."""
    if ctx.invoked_subcommand is not None:  # `usage [--data-dir D] compare ...`: only where the store is
        given = [n for n, v in (("--tenant-id", tenant_id), ("--key-id", key_id), ("--model", model),
                                ("--version", version), ("--user", user), ("--outcome", outcome),
                                ("--since", since), ("--until", until), ("--format", format)) if v is not None]
        if given or group_by != "request" or limit != 1000:
            _fail(f"{', '.join(given) or '--group-by/--limit'}: give {ctx.invoked_subcommand}'s options after "
                  f"`{ctx.invoked_subcommand}`", 2)
        ctx.obj = {"data_dir": data_dir, "store": store}
        return
    fmt = _usage_format(format)
    with _service(data_dir, store) as svc:
        out = svc.usage(tenant_id=tenant_id, key_id=key_id, model=model, version=version, user=user,
                        outcome=outcome, since=since, until=until, group_by=group_by,
                        format="csv" if fmt == "csv" else "json", limit=limit)
    if isinstance(out, str):
        typer.echo(out, nl=False)
    elif fmt == "json":
        _print(out)
    else:
        _usage_table(out)


@usage_app.command("compare")
def usage_compare(
    ctx: typer.Context,
    a_since: Annotated[TextOpt, typer.Option("--a-since", help="window A's start (ISO-8601 or Unix seconds)")] = None,
    a_until: Annotated[TextOpt, typer.Option("--a-until", help="window A's end (exclusive)")] = None,
    b_since: Annotated[TextOpt, typer.Option("--b-since", help="window B's start")] = None,
    b_until: Annotated[TextOpt, typer.Option("--b-until", help="window B's end (exclusive)")] = None,
    a_version: Annotated[TextOpt, typer.Option("--a-version", help="version A, NAME@VERSION")] = None,
    b_version: Annotated[TextOpt, typer.Option("--b-version", help="version B, NAME@VERSION")] = None,
    tenant_id: Annotated[TextOpt, typer.Option("--tenant-id", help="both sides: this tenant only")] = None,
    key_id: Annotated[TextOpt, typer.Option("--key-id", help="both sides: this key only")] = None,
    model: Annotated[TextOpt, typer.Option(help="both sides: this model only")] = None,
    since: Annotated[TextOpt, typer.Option(help="both sides (unless --a-/--b-since): from this time")] = None,
    until: Annotated[TextOpt, typer.Option(help="both sides (unless --a-/--b-until): before this time")] = None,
    format: Annotated[TextOpt, typer.Option(
        "--format", help="table | json (default: table on a terminal, else json)")] = None,
    data_dir: DataDirOpt = None, store: StoreOpt = None,
) -> None:
    """Two time windows or two model versions side by side, and the change B vs A.

    Requests, tokens, cost per 1k tokens, TTFT/TPOT p50/p95/p99 and error rate: the cost of a change
    (a quantized version, a router rule), to pair with `lockgate eval` for its quality."""
    fmt = _usage_format(format, ("table", "json"))
    outer = ctx.obj if isinstance(ctx.obj, dict) else {}
    with _service(data_dir or outer.get("data_dir"), store or outer.get("store")) as svc:
        out = svc.usage_compare(tenant_id=tenant_id, key_id=key_id, model=model, since=since, until=until,
                                a_since=a_since, a_until=a_until, b_since=b_since, b_until=b_until,
                                a_version=a_version, b_version=b_version)
    if fmt == "json":
        _print(out)
    else:
        _compare_table(out)


def _usage_format(value: str | None, allowed: tuple[str, ...] = ("table", "json", "csv")) -> str:
    import sys

    fmt = value or ("table" if sys.stdout.isatty() else "json")
    if fmt not in allowed:
        _fail(f"--format: must be {', '.join(allowed)}", 2)
    return fmt


def _console() -> Any:
    import sys

    from rich.console import Console

    # A terminal's own width; piped (a file, a test), wide enough that no cell is cut.
    return Console() if sys.stdout.isatty() else Console(width=240)


def _usage_table(out: dict[str, Any]) -> None:
    """Rows or groups as a rich table: costs rounded ($0.000056), the grand total last."""
    from rich.table import Table

    from lockgate.gateway.usage_view import usd_rounded

    rows = out["data"]
    columns = [c for c in (rows[0] if rows else {}) if c not in ("cost_nusd", "replica", "queue_time_s")]
    table = Table(title=f"usage by {out['group_by']}", show_footer="total" in out and bool(rows))
    total = out.get("total") or {}
    for i, c in enumerate(columns):
        footer = "total" if i == 0 else usd_rounded(total["cost_nusd"]) if c == "cost_usd" and total \
            else str(total[c]) if c in total else ""
        numeric = c not in ("request_id",) and bool(rows) and isinstance(rows[0][c], (int, float))
        table.add_column(c, footer=footer, justify="right" if numeric or c == "cost_usd" else "left")
    for r in rows:
        cost = r.get("cost_nusd")
        table.add_row(*["" if r[c] is None else usd_rounded(cost) if c == "cost_usd" else str(r[c])
                        for c in columns])
    console = _console()
    if rows:
        console.print(table)
    else:
        console.print(f"no usage for these filters (group by {out['group_by']})")


def _compare_table(out: dict[str, Any]) -> None:
    """A and B side by side with the change, B vs A, in percent."""
    from rich.table import Table

    from lockgate.gateway.usage_view import usd_rounded

    a, b, ch = out["a"], out["b"], out["change"]

    def num(v: Any, kind: str) -> str:
        if v is None:
            return "-"
        if kind == "usd":
            return usd_rounded(v)
        if kind == "rate":
            return f"{v:.2%}"
        if kind == "s":
            return f"{v * 1000:.1f} ms"
        return f"{v:,}"

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{v:+.1%}"

    table = Table(title="usage compare (B vs A)")
    for name in ("", f"A: {a['label']}", f"B: {b['label']}", "change"):
        table.add_column(name, justify="left" if not name else "right")
    per_1k = [None if s["cost_per_1k_tokens_usd"] is None else round(s["cost_per_1k_tokens_usd"] * 1e9)
              for s in (a, b)]
    lines: list[tuple[str, Any, Any, float | None, str]] = [
        ("requests", a["requests"], b["requests"], ch["requests"], "int"),
        ("prompt tokens", a["prompt_tokens"], b["prompt_tokens"], ch["prompt_tokens"], "int"),
        ("completion tokens", a["completion_tokens"], b["completion_tokens"], ch["completion_tokens"], "int"),
        ("cost", a["cost_nusd"], b["cost_nusd"], ch["cost_usd"], "usd"),
        ("cost per 1k tokens", per_1k[0], per_1k[1], ch["cost_per_1k_tokens_usd"], "usd"),
        ("error rate", a["error_rate"], b["error_rate"], ch["error_rate"], "rate")]
    for metric in ("ttft_s", "tpot_s"):
        for p in a[metric]:
            lines.append((f"{metric[:-2].upper()} {p}", a[metric][p], b[metric][p], ch[metric][p], "s"))
    for label, va, vb, change, kind in lines:
        table.add_row(label, num(va, kind), num(vb, kind), pct(change))
    console = _console()
    console.print(table)
    if out.get("note"):
        console.print(out["note"])


@audit_app.command("list")
def audit_list(
    since_id: Annotated[int, typer.Option("--since-id", help="records after this id")] = 0,
    limit: Annotated[int, typer.Option()] = 1000,
    data_dir: DataDirOpt = None, store: StoreOpt = None,
) -> None:
    """Audit records, oldest first."""
    with _service(data_dir, store) as svc:
        _print(svc.audit_list(since_id, limit))


@audit_app.command("verify")
def audit_verify(data_dir: DataDirOpt = None, store: StoreOpt = None) -> None:
    """Check the hash chain; exit status 1 (and the first bad record id) if it is broken."""
    with _service(data_dir, store) as svc:
        result = svc.audit_verify()
    _print(result)
    if not result["ok"]:
        typer.secho(f"audit log broken at record {result['first_bad']}", fg=typer.colors.RED, err=True)
        raise typer.Exit(1)
