"""Versioned output schemas: registration (admin REST and CLI) and resolution by name for requests.

Namespaces: `global` (shared: registered by global admin keys and the CLI) and one per tenant
(registered by the tenant's admin keys, or by a global admin naming the tenant). A request's
`response_format.json_schema.name` (`invoice`, `invoice@3`) is looked up in its tenant's namespace
first, then in the global one; without `@version` it means the newest. Who may read: admin keys
(a tenant's admin key: its own namespace and the global one); inference keys use schemas by name
in requests but cannot list them (the admin API needs the admin scope).

A new version is compared with the previous one (schema_compat.py) inside the store's
registering transaction: breaking differences are a 409 listing each with its JSON path unless
`force` is true; either way every difference goes into the `schema.register` audit record.

`SchemaResolver` caches lookups per process so that a request naming a schema does not read the
store: an exact version forever (versions never change), the newest version and unknown names
for `LATEST_TTL_S` (another instance's new version is seen within that time; this process's
own registrations clear the cache at once).
"""
from __future__ import annotations

import json
import re
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from lockgate.bodies import parse_body
from lockgate.engine.structured.grammar import validate as validate_structured
from lockgate.engine.structured_params import MAX_SPEC_CHARS, StructuredOutputs
from lockgate.errors import APIError, bad_request, field_error
from lockgate.gateway import schema_compat
from lockgate.gateway.admin_scope import AdminReach, forbidden
from lockgate.store.schema_ops import OutputSchema, SchemaConflict

GLOBAL = "global"  # the shared namespace's name in the API ('' in the store)
NAME_RE = re.compile(r"^[a-zA-Z0-9_.-]{1,64}$")
MAX_VERSION = 2**31 - 1
LATEST_TTL_S = 2.0
MAX_CACHED = 4096

SchemaName = Annotated[str, StringConstraints(pattern=NAME_RE.pattern)]
Namespace = Annotated[str, StringConstraints(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_.-]+$")]


class SchemaCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: SchemaName = Field(description="1-64 characters of [a-zA-Z0-9_.-]")
    schema_: dict[str, Any] = Field(alias="schema", description="A JSON schema (an object)")
    force: bool = False
    namespace: Namespace | None = None  # "global" or a tenant id; None: the caller's own


@dataclass(frozen=True, slots=True)
class SchemaRef:
    name: str
    version: int | None  # None: the newest


@dataclass(frozen=True, slots=True)
class ResolvedSchema:
    namespace: str  # '' global, else the tenant id
    name: str
    version: int
    text: str  # compact JSON
    schema: dict[str, Any]  # parsed once; shared by every request that names it: never changed

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"


def parse_ref(ref: str, param: str) -> SchemaRef:
    """`name` or `name@version` (version 1..2^31-1), else a 400 naming `param`."""
    if not isinstance(ref, str) or len(ref) > 80:
        raise bad_request(f"{param}: expected NAME or NAME@VERSION (at most 64 characters of [a-zA-Z0-9_.-])",
                          param=param, code="invalid_value")
    name, sep, version = ref.partition("@")
    if not NAME_RE.match(name):
        raise bad_request(f"{param}: a schema name is 1-64 characters of [a-zA-Z0-9_.-]", param=param,
                          code="invalid_value")
    if not sep:
        return SchemaRef(name, None)
    if not version.isascii() or not version.isdigit() or len(version) > 10 or not 1 <= int(version) <= MAX_VERSION:
        raise bad_request(f"{param}: the version after '@' must be an integer in [1, {MAX_VERSION}]", param=param,
                          code="invalid_value")
    return SchemaRef(name, int(version))


def _shown_ns(namespace: str) -> str:
    return namespace or GLOBAL


def schema_json(schema: Any, param: str = "schema") -> str:
    """A schema as compact JSON text: an object, finite numbers, at most `MAX_SPEC_CHARS` characters."""
    if not isinstance(schema, dict):
        raise bad_request(f"{param} must be a JSON schema object, got {type(schema).__name__}", param=param)
    try:
        text = json.dumps(schema, separators=(",", ":"), allow_nan=False)
    except (ValueError, RecursionError):
        raise bad_request(f"{param} must hold only finite numbers and be nested less deeply", param=param) from None
    if len(text) > MAX_SPEC_CHARS:
        raise bad_request(f"{param} must be at most {MAX_SPEC_CHARS} characters of JSON, got {len(text)}",
                          param=param, code="invalid_value")
    return text


def check_compiles(text: str, param: str = "schema") -> None:
    """The grammar engine accepts it (what a request naming it will be constrained by)."""
    try:
        validate_structured(StructuredOutputs(json=text))
    except ValueError as exc:
        message = re.sub(r"^structured_outputs(\.\w+)?", param, str(exc), count=1)
        raise bad_request(message[:400], param=param, code="invalid_value") from None


class IncompatibleSchema(APIError):
    """409 with every difference in the error object (`error.differences`: path, change, breaking, detail)."""

    def __init__(self, message: str, differences: list[dict[str, Any]]) -> None:
        super().__init__(409, message, param="schema", code="incompatible_schema")
        self.differences = differences

    def body(self) -> dict[str, Any]:
        out = super().body()
        out["error"]["differences"] = self.differences
        return out


@dataclass(frozen=True, slots=True)
class Registration:
    """A checked body, ready to write (`SchemaService.prepare`, CPU only: run it off the event loop)."""

    name: str
    text: str
    force: bool
    namespace: str | None  # as asked ("global", a tenant id) or None


def _view(s: OutputSchema, with_schema: bool = True) -> dict[str, Any]:
    out: dict[str, Any] = {"object": "schema", "name": s.name, "version": s.version, "ref": f"{s.name}@{s.version}",
                           "namespace": _shown_ns(s.namespace), "created_at": s.created_at,
                           "created_by": s.created_by, "forced": s.forced}
    if with_schema:
        out["schema"] = json.loads(s.schema)
    return out


class SchemaService:
    """The admin side: register, list, show. Methods but `prepare` touch the store (call them off
    the event loop); `reach` is the caller's (None: a global admin, as the CLI)."""

    def __init__(self, store: Any, reach: AdminReach | None = None) -> None:
        self.store = store
        self.reach = reach or AdminReach()

    @staticmethod
    def prepare(body: Mapping[str, Any] | bytes | str) -> Registration:
        req = parse_body(SchemaCreate, body, errors=field_error)
        text = schema_json(req.schema_)
        check_compiles(text)
        return Registration(req.name, text, req.force, req.namespace)

    def _write_namespace(self, asked: str | None) -> str:
        if self.reach.is_global:
            if asked is None or asked == GLOBAL:
                return ""
            if self.store.get_tenant(asked) is None:
                raise APIError(404, f"tenant {asked!r} not found", param="namespace", code="not_found")
            return asked
        if asked == GLOBAL:
            raise forbidden("namespace: global schemas are registered by a global admin key; a tenant's admin key "
                            "registers in its own tenant's namespace", param="namespace")
        if asked not in (None, self.reach.tenant_id):
            raise APIError(404, f"tenant {asked!r} not found", param="namespace", code="not_found")
        assert self.reach.tenant_id is not None
        return self.reach.tenant_id

    def register(self, reg: Registration, *, actor: str) -> dict[str, Any]:
        namespace = self._write_namespace(reg.namespace)

        def check(previous: str) -> list[dict[str, Any]]:
            return [d.to_dict() for d in schema_compat.differences(json.loads(previous), json.loads(reg.text))]

        try:
            row, diffs = self.store.register_schema(namespace, reg.name, reg.text, actor, check, reg.force)
        except SchemaConflict as exc:
            broken = [d for d in exc.differences if d.get("breaking")]
            raise IncompatibleSchema(f"schema {reg.name!r} version {exc.previous + 1} is incompatible with version "
                                f"{exc.previous}: {len(broken)} breaking difference(s) ("
                                + "; ".join(f"{d['path']}: {d['detail']}" for d in broken[:5])
                                + ("; ..." if len(broken) > 5 else "") + "); send \"force\": true to register it "
                                "anyway", exc.differences) from None
        invalidate(self.store)
        return {**_view(row), "differences": diffs}

    def _read_namespaces(self, asked: str | None) -> list[str]:
        """Where a read looks, in order: the asked namespace, else the caller's own then global."""
        if asked is not None:
            ns = "" if asked == GLOBAL else asked
            if not self.reach.is_global and ns not in ("", self.reach.tenant_id):
                raise APIError(404, f"tenant {asked!r} not found", param="namespace", code="not_found")
            return [ns]
        return [""] if self.reach.is_global else [self.reach.tenant_id or "", ""]

    def list(self, namespace: str | None = None) -> dict[str, Any]:
        if namespace is None and self.reach.is_global:
            rows = self.store.list_schemas(None)
        else:
            rows = self.store.list_schemas(self._read_namespaces(namespace))
        data = [{"object": "schema_name", "name": r.name, "namespace": _shown_ns(r.namespace), "latest": r.latest,
                 "ref": f"{r.name}@{r.latest}", "versions": r.versions, "updated_at": r.updated_at} for r in rows]
        return {"object": "list", "data": data}

    def versions(self, name: str, namespace: str | None = None) -> dict[str, Any]:
        ref = parse_ref(name, "name")
        if ref.version is not None:
            return self.show(name, namespace)
        for ns in self._read_namespaces(namespace):
            rows = self.store.list_schema_versions(ns, ref.name)
            if rows:
                return {"object": "list", "name": ref.name, "namespace": _shown_ns(ns), "latest": rows[-1].version,
                        "data": [_view(r) for r in rows]}
        raise APIError(404, f"schema {ref.name!r} not found", param="name", code="not_found")

    def show(self, ref_text: str, namespace: str | None = None) -> dict[str, Any]:
        ref = parse_ref(ref_text, "name")
        for ns in self._read_namespaces(namespace):
            row = self.store.get_schema(ns, ref.name, ref.version)
            if row is not None:
                return _view(row)
        what = ref.name if ref.version is None else f"{ref.name}@{ref.version}"
        raise APIError(404, f"schema {what!r} not found", param="name", code="not_found")


# ---------------------------------------------------------------- resolution for requests


class SchemaResolver:
    """`invoice@3` / `invoice` for a tenant: its namespace first, then global; cached (module docstring)."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self._cache: dict[tuple[str, str, int | None], tuple[ResolvedSchema | None, float]] = {}

    def cached(self, tenant_id: str | None, ref: SchemaRef) -> tuple[bool, ResolvedSchema | None]:
        """(hit, value): a hit may be a cached 'unknown' (None)."""
        entry = self._cache.get((tenant_id or "", ref.name, ref.version))
        if entry is None or entry[1] < time.monotonic():
            return False, None
        return True, entry[0]

    def lookup(self, tenant_id: str | None, ref: SchemaRef) -> ResolvedSchema | None:
        """Reads the store (call it off the event loop) and caches what it found."""
        found = None
        for ns in ([tenant_id, ""] if tenant_id else [""]):
            row = self.store.get_schema(ns, ref.name, ref.version)
            if row is not None:
                found = ResolvedSchema(row.namespace, row.name, row.version, row.schema, json.loads(row.schema))
                break
        ttl = float("inf") if found is not None and ref.version is not None else LATEST_TTL_S
        if len(self._cache) >= MAX_CACHED:
            self._cache.clear()  # bounded: a tenant sending many unknown names cannot grow it
        self._cache[(tenant_id or "", ref.name, ref.version)] = (found, time.monotonic() + ttl)
        return found

    def clear(self) -> None:
        self._cache.clear()


_RESOLVERS: weakref.WeakKeyDictionary[Any, SchemaResolver] = weakref.WeakKeyDictionary()


def resolver_for(store: Any) -> SchemaResolver:
    """The process's one resolver for `store` (its cache shared by every request)."""
    r = _RESOLVERS.get(store)
    if r is None:
        r = _RESOLVERS[store] = SchemaResolver(store)
    return r


def invalidate(store: Any) -> None:
    r = _RESOLVERS.get(store)
    if r is not None:
        r.clear()


async def resolve(astore: Any, store: Any, tenant_id: str | None, ref_text: str, param: str) -> ResolvedSchema:
    """A request's named schema, or a 400 naming `param` (unknown name or version). Reads the store
    only on a cache miss (through `astore`, never on the event loop)."""
    ref = parse_ref(ref_text, param)
    resolver = resolver_for(store)
    hit, found = resolver.cached(tenant_id, ref)
    if not hit:
        found = await astore.call(resolver.lookup, tenant_id, ref)
    if found is None:
        what = ref.name if ref.version is None else f"{ref.name}@{ref.version}"
        raise bad_request(f"{param}: no registered schema {what!r} (register it with POST /admin/schemas, or send "
                          "the schema itself in response_format.json_schema.schema)", param=param,
                          code="invalid_value")
    return found
