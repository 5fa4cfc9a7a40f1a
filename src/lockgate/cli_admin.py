"""`lockgate tenants | keys | usage | audit`: the admin API's operations on the store, from a shell.

Every command opens the store in `--data-dir` (default ./lockgate-data, env
LOCKGATE_DATA_DIR), or the PostgreSQL store of `--store` (env LOCKGATE_STORE_URL),
directly: it works with or without a running server (SQLite WAL lets both use
the file; every server notices admin changes within 2 s). Output is JSON
(CSV for `usage --format csv`); errors go to stderr with a non-zero exit status.
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

tenants_app = typer.Typer(no_args_is_help=True, help="Create, list, change and delete tenants.")
keys_app = typer.Typer(no_args_is_help=True, help="Create, list and revoke API keys (a tenant's, or global ones).")
audit_app = typer.Typer(no_args_is_help=True, help="The hash-chained audit log of admin actions.")


def register(app: typer.Typer) -> None:
    app.add_typer(tenants_app, name="tenants")
    app.add_typer(keys_app, name="keys")
    app.command("usage")(usage)
    app.add_typer(audit_app, name="audit")


def _fail(msg: str, code: int = 1) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _print(value: Any) -> None:
    typer.echo(value if isinstance(value, str) else json.dumps(value, indent=2, ensure_ascii=False))


@contextmanager
def _service(data_dir: str | None, store_url: str | None = None) -> Iterator[AdminService]:
    import sqlite3

    from lockgate.gateway.tenants import AdminService
    from lockgate.server.errors import APIError
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
        yield AdminService(store)
    except APIError as e:
        _fail(e.message)
    except (StoreError, sqlite3.Error) as e:
        _fail(f"database error: {e}")
    finally:
        store.close()


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
PriceOpt = Annotated[Optional[list[str]], typer.Option(
    "--price", help="MODEL=PROMPT,COMPLETION[,CACHED_PROMPT] in USD per 1M tokens (MODEL may be *); repeatable")]
JsonOpt = Annotated[Optional[str], typer.Option(
    "--json", help="the body exactly as the REST API takes it; other options override its fields")]


def _tenant_body(json_text: str | None, name: str | None, models: list[str] | None, rpm: int | None,
                 tpm: int | None, max_concurrency: int | None, max_tokens: int | None, priority: str | None,
                 budget_usd: float | None, budget_period: str | None, price: list[str] | None,
                 weight: float | None = None) -> dict[str, Any]:
    body = _json_opt(json_text)
    given = {"name": name, "models": _models(models), "rpm": rpm, "tpm": tpm, "max_concurrency": max_concurrency,
             "max_tokens": max_tokens, "priority": priority, "weight": weight, "budget_usd": budget_usd,
             "budget_period": budget_period, "prices": _prices(price)}
    body.update({k: v for k, v in given.items() if v is not None})
    return body


@tenants_app.command("create")
def tenants_create(
    name: NameOpt = None, models: ModelsOpt = None, rpm: RpmOpt = None, tpm: TpmOpt = None,
    max_concurrency: ConcOpt = None, max_tokens: MaxTokOpt = None, priority: PrioOpt = None,
    weight: WeightOpt = None, budget_usd: BudgetOpt = None, budget_period: PeriodOpt = None,
    price: PriceOpt = None, json_body: JsonOpt = None, data_dir: DataDirOpt = None, store: StoreOpt = None,
) -> None:
    """Create a tenant (limits left out are unlimited); prints it with its id."""
    body = _tenant_body(json_body, name, models, rpm, tpm, max_concurrency, max_tokens, priority, budget_usd,
                        budget_period, price, weight)
    with _service(data_dir, store) as svc:
        _print(svc.create_tenant(body, actor=ACTOR))


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
    price: PriceOpt = None, unset: Annotated[Optional[list[str]], typer.Option(
        "--unset", help="a field to set to null (unlimited / default), e.g. --unset rpm; repeatable")] = None,
    json_body: JsonOpt = None, data_dir: DataDirOpt = None, store: StoreOpt = None,
) -> None:
    """Change only the given fields of a tenant."""
    body = _tenant_body(json_body, name, models, rpm, tpm, max_concurrency, max_tokens, priority, budget_usd,
                        budget_period, price, weight)
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
    data_dir: DataDirOpt = None, store: StoreOpt = None,
) -> None:
    """Create an API key; the key itself is printed once, here, and never again."""
    if global_ == (tenant_id is not None):
        _fail("give a TENANT_ID or --global (a key bound to no tenant), not both", 2)
    given = {"name": name, "scopes": scope or None, "expires_at": expires_at, "rpm": rpm, "tpm": tpm,
             "max_concurrency": max_concurrency, "max_tokens": max_tokens}
    body = {k: v for k, v in given.items() if v is not None}
    with _service(data_dir, store) as svc:
        _print(svc.create_global_key(body, actor=ACTOR) if tenant_id is None
               else svc.create_key(tenant_id, body, actor=ACTOR))


@keys_app.command("list")
def keys_list(
    tenant_id: Annotated[Optional[str], typer.Option("--tenant-id", help="only this tenant's keys")] = None,
    data_dir: DataDirOpt = None, store: StoreOpt = None,
) -> None:
    """List keys (never the keys themselves: their prefixes)."""
    with _service(data_dir, store) as svc:
        _print(svc.list_keys(tenant_id))


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument()], data_dir: DataDirOpt = None, store: StoreOpt = None) -> None:
    """Revoke a key at once."""
    with _service(data_dir, store) as svc:
        _print(svc.revoke_key(key_id, actor=ACTOR))


# ---------------------------------------------------------------- usage and audit

def usage(
    tenant_id: Annotated[Optional[str], typer.Option("--tenant-id")] = None,
    model: Annotated[Optional[str], typer.Option()] = None,
    since: Annotated[Optional[str], typer.Option(help="ISO-8601 date/time or Unix seconds (inclusive)")] = None,
    until: Annotated[Optional[str], typer.Option(help="ISO-8601 date/time or Unix seconds (exclusive)")] = None,
    group_by: Annotated[str, typer.Option(
        "--group-by", help="request | day | model | refusals (refused requests, per hour)")] = "request",
    format: Annotated[str, typer.Option("--format", help="json | csv")] = "json",
    limit: Annotated[int, typer.Option(help="at most this many rows")] = 1000,
    data_dir: DataDirOpt = None, store: StoreOpt = None,
) -> None:
    """The usage ledger: one row per request (newest first), or totals per day or per model."""
    with _service(data_dir, store) as svc:
        out = svc.usage(tenant_id=tenant_id, model=model, since=since, until=until, group_by=group_by,
                        format=format, limit=limit)
    if isinstance(out, str):
        typer.echo(out, nl=False)
    else:
        _print(out)


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
