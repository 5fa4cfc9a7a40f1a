"""`lockgate schemas register | list | show`: versioned output schemas from a shell.

Over the store in `--data-dir` (or `--store`), as a global admin (whoever can open the database owns
it): `register` writes the global namespace, or a tenant's with `--tenant-id`, with the same checks
as `POST /admin/schemas` (a JSON object the grammar engine compiles, at most 256 KB, compatible with
the previous version unless `--force`). Bad input exits 2, an incompatible version 1.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from lockgate.cli_admin import DataDirOpt, StoreOpt, open_cli_store
from lockgate.engine.structured_params import MAX_SPEC_CHARS
from lockgate.errors import APIError

# gateway.schemas (jsonschema and friends) is imported by each command: `lockgate --help` stays fast.
GLOBAL = "global"  # gateway/schemas.py's GLOBAL (tests/test_cli_fast.py checks that they agree)

schemas_app = typer.Typer(no_args_is_help=True, help="Versioned output schemas (response_format by name).")

TenantOpt = Annotated[Optional[str], typer.Option(
    "--tenant-id", help="the tenant's namespace (its id) instead of the global one")]
CLI_ACTOR = "cli"


def register(app: typer.Typer) -> None:
    app.add_typer(schemas_app, name="schemas")


def _fail(msg: str, code: int = 2) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _echo(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, ensure_ascii=False))


@schemas_app.command("register")
def register_schema(
    name: Annotated[str, typer.Argument(help="1-64 characters of [a-zA-Z0-9_.-]")],
    file: Annotated[Path, typer.Option("--file", help="the JSON schema (a JSON object)")],
    tenant_id: TenantOpt = None,
    force: Annotated[bool, typer.Option("--force", help="register over breaking differences (audited)")] = False,
    data_dir: DataDirOpt = None, store: StoreOpt = None,
) -> None:
    """Register the next version of NAME; prints it (with the differences from the previous one)."""
    from lockgate.gateway.schemas import IncompatibleSchema, SchemaService

    try:
        if file.stat().st_size > 4 * MAX_SPEC_CHARS:
            _fail(f"--file: {file} is larger than {4 * MAX_SPEC_CHARS} bytes")
        schema = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        _fail(f"--file: cannot read a JSON schema from {file}: {str(exc)[:200]}")
    body = {"name": name, "schema": schema, "force": force, "namespace": tenant_id or GLOBAL}
    try:
        reg = SchemaService.prepare(body)
        with open_cli_store(data_dir, store) as st:
            _echo(SchemaService(st).register(reg, actor=CLI_ACTOR))
    except IncompatibleSchema as exc:
        typer.secho(f"error: {exc.message}", fg=typer.colors.RED, err=True)
        for d in exc.differences:
            mark = "BREAKING" if d.get("breaking") else "ok      "
            typer.echo(f"  {mark} {d['path']}: {d['detail']}", err=True)
        raise typer.Exit(1) from None
    except APIError as exc:
        _fail(exc.message)


@schemas_app.command("list")
def list_schemas(tenant_id: TenantOpt = None, data_dir: DataDirOpt = None, store: StoreOpt = None) -> None:
    """Every schema name with its newest version (all namespaces, or one with --tenant-id)."""
    from lockgate.gateway.schemas import SchemaService

    try:
        with open_cli_store(data_dir, store) as st:
            _echo(SchemaService(st).list(tenant_id)["data"])
    except APIError as exc:
        _fail(exc.message)


@schemas_app.command("show")
def show_schema(
    ref: Annotated[str, typer.Argument(help="NAME (every version) or NAME@VERSION")],
    tenant_id: TenantOpt = None, data_dir: DataDirOpt = None, store: StoreOpt = None,
) -> None:
    """A schema's versions, or one version with its schema (global namespace unless --tenant-id)."""
    from lockgate.gateway.schemas import SchemaService

    try:
        with open_cli_store(data_dir, store) as st:
            _echo(SchemaService(st).versions(ref, tenant_id or GLOBAL))
    except APIError as exc:
        _fail(exc.message)
