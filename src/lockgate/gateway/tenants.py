"""`AdminService`: tenants, API keys, usage and the audit log, for the admin REST routes and the CLI.

Request bodies are strict pydantic models (unknown fields rejected, so a typo
such as "rmp" is a 400, never a silent no-op; every number bounded and finite).
Failures are `APIError`s (400 naming the field, 404 for unknown ids) that the
REST layer renders as is and the CLI prints. Every change is audited with its
actor in the same transaction as the change itself. How far the caller reaches
(a global admin, or a tenant's admin key) is `AdminReach` (admin_scope.py).

Methods are synchronous and touch disk: the server calls them through
`AsyncStore.call(...)`, never on the event loop.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import secrets
import time
import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import replace
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, field_validator

from lockgate.bodies import parse_body
from lockgate.errors import APIError, bad_request, field_error
from lockgate.gateway import usage_compare, usage_view
from lockgate.gateway.admin_scope import AdminReach, forbidden
from lockgate.gateway.classes import DEFAULT_CLASS_NAMES
from lockgate.gateway.key_bodies import AlertThresholds, Webhook, check_key_budget
from lockgate.gateway.spend import keys_spend, tenants_spend
from lockgate.store.base import DuplicateName, Store
from lockgate.store.models import ApiKey, Limits, Price, Tenant, UsageQuery

log = logging.getLogger(__name__)

INT32_MAX = 2**31 - 1
KEY_PREFIX = "lg-"
PREFIX_LEN = 10  # characters of the key shown for display ("lg-" + 7)
MAX_USAGE_LIMIT = 100_000

# ---------------------------------------------------------------- keys and ids


def hash_key(key: str | bytes) -> str:
    """Hex SHA-256 of the whole key: the only form in which a key is stored."""
    raw = key.encode("utf-8", "surrogateescape") if isinstance(key, str) else key
    return hashlib.sha256(raw).hexdigest()


def new_key() -> tuple[str, str, str]:
    """(key, prefix, hash): "lg-" + base64url of 32 random bytes (256 bits)."""
    key = KEY_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii")
    return key, key[:PREFIX_LEN], hash_key(key)


def new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(10)


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    try:
        return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):  # a time no calendar shows: keep the number
        return str(ts)


def parse_time(value: str | float | int | None, param: str) -> float | None:
    """ISO-8601 date or datetime (naive = UTC), or Unix seconds, -> Unix seconds; 400 naming `param`."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise bad_request(f"{param}: expected an ISO-8601 time or Unix seconds", param=param)
    if isinstance(value, (int, float)):
        ts = float(value)
    else:
        text = str(value).strip()
        if len(text) > 64:
            raise bad_request(f"{param}: too long", param=param)
        try:
            ts = float(text)
        except ValueError:
            try:
                dt = datetime.fromisoformat(text)
            except ValueError:
                raise bad_request(f"{param}: expected an ISO-8601 time (2026-01-31 or 2026-01-31T12:00:00Z) "
                                  "or Unix seconds", param=param) from None
            if dt.tzinfo is None:
                dt = dt.replace(tzinfo=timezone.utc)
            ts = dt.timestamp()
    if not math.isfinite(ts) or not 0 <= ts < 253402300800:  # before year 10000
        raise bad_request(f"{param}: out of range", param=param)
    return ts


# ---------------------------------------------------------------- request bodies

# Control (C0, C1), format (bidi overrides and isolates, zero-width, BOM), surrogate and line/paragraph
# separator characters: invisible or reordering in a terminal, log or dashboard, so a name could pass
# for another one. Refused in every free-text admin string.
_UNPRINTABLE = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _text(max_len: int, strip: bool = False) -> BeforeValidator:
    """A free-text field's check, before any stripping: a trailing U+0085 (a C1 control, and
    whitespace to `str.strip`) is refused, never silently dropped; the length is checked first."""
    def check(value: Any) -> Any:
        if not isinstance(value, str):
            return value  # the strict str type refuses it
        if len(value) > max_len:
            raise ValueError(f"must be at most {max_len} characters (got {len(value)})")
        for ch in value:
            if unicodedata.category(ch) in _UNPRINTABLE:
                raise ValueError(f"must not contain control or invisible formatting characters "
                                 f"(found U+{ord(ch):04X})")
        value = value.strip() if strip else value
        if not value:
            raise ValueError("must not be empty")
        return value
    return BeforeValidator(check)


Name = Annotated[str, _text(128, strip=True)]
ModelName = Annotated[str, _text(256)]
LimitInt = Annotated[int, Field(ge=1, le=INT32_MAX)]
Usd = Annotated[float, Field(ge=0, le=1e12, allow_inf_nan=False)]
Rate = Annotated[float, Field(ge=0, le=1e9, allow_inf_nan=False)]  # USD per 1M tokens
PerRequest = Annotated[float, Field(ge=0, le=1e6, allow_inf_nan=False)]  # USD per request
Priority = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]  # a configured class name
MIN_WEIGHT, MAX_WEIGHT = 0.01, 100.0  # fair-share weights: at most 10^4 between two tenants of a class
Weight = Annotated[float, Field(ge=MIN_WEIGHT, le=MAX_WEIGHT, allow_inf_nan=False)]
Period = Literal["day", "month", "total"]
Scope = Literal["inference", "admin", "metrics"]

_STRICT = ConfigDict(extra="forbid", strict=True)


class PriceBody(BaseModel):
    model_config = _STRICT
    prompt: Rate = 0.0
    completion: Rate = 0.0
    cached_prompt: Rate | None = None  # None: the prompt price
    cache_hit: PerRequest = 0.0  # a request answered from the response cache costs this, whatever its tokens


class _TenantFields(BaseModel):
    model_config = _STRICT
    models: Annotated[list[ModelName], Field(max_length=256)] | None = None  # None: ["*"]
    rpm: LimitInt | None = None
    tpm: LimitInt | None = None
    max_concurrency: LimitInt | None = None
    max_tokens: LimitInt | None = None
    priority: Priority | None = None  # None: "standard"
    weight: Weight | None = None  # None: 1.0
    budget_usd: Usd | None = None
    budget_period: Period | None = None  # None: "month"
    prices: Annotated[dict[ModelName, PriceBody], Field(max_length=256)] | None = None
    alert_thresholds: AlertThresholds | None = None  # % of the budget, alerted once per period; None: []
    alert_webhook: Webhook | None = None  # the tenant's own alert receiver (http/https)
    hedge: bool | None = None  # its safe non-streaming requests may be hedged (lifecycle/hedge.py); None: false


class TenantCreate(_TenantFields):
    name: Name


class TenantPatch(_TenantFields):
    """Only the fields given change; null sets a limit to unlimited (and the others to their default)."""

    name: Name | None = None

    @field_validator("name")
    @classmethod
    def _name_not_null(cls, v: str | None) -> str:
        if v is None:
            raise ValueError("name cannot be null")
        return v


class KeyCreate(BaseModel):
    model_config = _STRICT
    name: Name = "default"
    scopes: Annotated[list[Scope], Field(min_length=1, max_length=3)] = Field(default_factory=lambda: ["inference"])
    expires_at: Annotated[str, StringConstraints(max_length=64)] | None = None
    rpm: LimitInt | None = None
    tpm: LimitInt | None = None
    max_concurrency: LimitInt | None = None
    max_tokens: LimitInt | None = None
    budget_usd: Usd | None = None  # the key's own budget (its tenant's holds too: the stricter wins)
    budget_period: Period | None = None  # None: "month"
    alert_thresholds: AlertThresholds | None = None

    @field_validator("scopes")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("scopes must not repeat")
        return v


class KeyPatch(BaseModel):
    """`PATCH /admin/keys/{id}`: only the fields given change; null sets a limit to unlimited, the budget
    to none, the period to month, the thresholds to none, the expiry to never."""

    model_config = _STRICT
    name: Name | None = None
    rpm: LimitInt | None = None
    tpm: LimitInt | None = None
    max_concurrency: LimitInt | None = None
    max_tokens: LimitInt | None = None
    budget_usd: Usd | None = None
    budget_period: Period | None = None
    alert_thresholds: AlertThresholds | None = None
    expires_at: Annotated[str, StringConstraints(max_length=64)] | None = None

    @field_validator("name")
    @classmethod
    def _name_not_null(cls, v: str | None) -> str:
        if v is None:
            raise ValueError("name cannot be null")
        return v


# What a key with no tenant (global admin or metrics) may have patched: no tenant, nothing to bill or limit.
_GLOBAL_KEY_PATCHABLE = frozenset({"name", "expires_at"})


class GlobalKeyCreate(BaseModel):
    """A key bound to no tenant: a global admin key, or a metrics scraper's (no inference: no tenant to bill)."""

    model_config = _STRICT
    name: Name = "default"
    scopes: Annotated[list[Scope], Field(min_length=1, max_length=3)] = Field(default_factory=lambda: ["admin"])
    expires_at: Annotated[str, StringConstraints(max_length=64)] | None = None

    @field_validator("scopes")
    @classmethod
    def _no_inference(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("scopes must not repeat")
        if "inference" in v:
            raise ValueError("a key with no tenant cannot have the inference scope (create it for a tenant)")
        return v


_LIMIT_FIELDS = ("rpm", "tpm", "max_concurrency", "max_tokens")
_DEFAULTS: dict[str, Any] = {"models": ["*"], "priority": "standard", "weight": 1.0, "budget_period": "month", "prices": {},
                             "alert_thresholds": [], "hedge": False}

# ---------------------------------------------------------------- JSON views


def _price_json(p: Price) -> dict[str, Any]:
    return {"prompt": p.prompt, "completion": p.completion, "cached_prompt": p.cached_prompt, "cache_hit": p.cache_hit}


def tenant_json(t: Tenant, spend: dict[str, Any] | None = None) -> dict[str, Any]:
    """`spend`: its spend this period (gateway/spend.py), shown when given."""
    return {"object": "tenant", "id": t.id, "name": t.name, "models": list(t.models),
            "rpm": t.limits.rpm, "tpm": t.limits.tpm, "max_concurrency": t.limits.max_concurrency,
            "max_tokens": t.limits.max_tokens, "priority": t.priority, "weight": t.weight,
            "budget_usd": t.budget_usd,
            "budget_period": t.budget_period, "prices": {m: _price_json(p) for m, p in t.prices.items()},
            "alert_thresholds": list(t.alert_thresholds), "alert_webhook": t.alert_webhook, "hedge": t.hedge,
            "created_at": iso(t.created_at), "updated_at": iso(t.updated_at), **({"spend": spend} if spend else {})}


def key_json(k: ApiKey, spend: dict[str, Any] | None = None) -> dict[str, Any]:
    """Never the key nor its hash. `spend`: its spend this period (gateway/spend.py), shown when given."""
    return {"object": "api_key", "id": k.id, "tenant_id": k.tenant_id, "name": k.name, "prefix": k.prefix,
            "scopes": list(k.scopes), "rpm": k.limits.rpm, "tpm": k.limits.tpm,
            "max_concurrency": k.limits.max_concurrency, "max_tokens": k.limits.max_tokens,
            "budget_usd": k.budget_usd, "budget_period": k.budget_period, "alert_thresholds": list(k.alert_thresholds),
            "expires_at": iso(k.expires_at), "revoked_at": iso(k.revoked_at), "created_at": iso(k.created_at),
            **({"spend": spend} if spend else {})}




def _not_found(kind: str, id_: str, param: str) -> APIError:
    return APIError(404, f"{kind} {id_!r} not found", param=param, code="not_found")


def _duplicate(name: str) -> APIError:
    return APIError(409, f"name: a tenant named {name!r} exists already (names are compared ignoring case, "
                         "after Unicode NFKC normalization)", param="name", code="conflict")


def _future_time(value: str | None) -> float | None:
    expires = parse_time(value, "expires_at")
    if expires is not None and expires <= time.time():
        raise bad_request("expires_at: is in the past", param="expires_at")
    return expires


# ---------------------------------------------------------------- the service


class AdminService:
    def __init__(self, store: Store, on_change: Callable[[str, str], None] | None = None,
                 class_names: tuple[str, ...] = DEFAULT_CLASS_NAMES, reach: AdminReach | None = None) -> None:
        """`on_change(action, id)` runs after each committed change (e.g. to reload the key ring);
        `class_names`: the priority classes a tenant may be put in; `reach`: whose admin the caller is
        (gateway/admin_scope.py; None: a global admin, as the CLI)."""
        self.store = store
        self.on_change = on_change
        self.class_names = class_names
        self.reach = reach or AdminReach()

    def _check_class(self, name: str | None) -> None:
        if name is not None and name not in self.class_names:
            raise bad_request(f"priority: must be one of {', '.join(self.class_names)}, got {name!r}",
                              param="priority", code="invalid_value")

    def _changed(self, action: str, id_: str) -> None:
        if self.on_change is not None:
            try:
                self.on_change(action, id_)
            except Exception:  # noqa: BLE001 - the change is committed; a reload failure must not undo the answer
                log.exception("on_change(%s, %s) failed", action, id_)

    # -------------------------------------------------------------- tenants
    def create_tenant(self, body: Mapping[str, Any] | bytes | str, *, actor: str) -> dict[str, Any]:
        self.reach.require_global("creating a tenant")
        req = parse_body(TenantCreate, body, errors=field_error)
        self._check_class(req.priority)
        t = Tenant(id=new_id("ten_"), name=req.name, models=req.models if req.models is not None else ["*"],
                   limits=Limits(req.rpm, req.tpm, req.max_concurrency, req.max_tokens),
                   priority=req.priority or "standard", weight=req.weight or 1.0, budget_usd=req.budget_usd,
                   budget_period=req.budget_period or "month",
                   prices={m: Price(p.prompt, p.completion, p.cached_prompt, p.cache_hit)
                           for m, p in (req.prices or {}).items()},
                   alert_thresholds=list(req.alert_thresholds or []), alert_webhook=req.alert_webhook,
                   hedge=bool(req.hedge))
        try:
            self.store.create_tenant(t, actor)
        except DuplicateName:
            raise _duplicate(t.name) from None
        self._changed("tenant.create", t.id)
        return self._tenant_json(t)

    def _tenant_json(self, t: Tenant) -> dict[str, Any]:
        return tenant_json(t, tenants_spend(self.store, [t], time.time())[t.id])

    def tenant_spend(self, tenant_id: str) -> dict[str, Any]:
        """The tenant's `spend` object alone (`GET /v1/usage` shows a tenant its own)."""
        t = self._tenant(tenant_id)
        return tenants_spend(self.store, [t], time.time())[t.id]

    def _tenant(self, tenant_id: str) -> Tenant:
        """The tenant, or the same 404 whether it does not exist or belongs to another tenant's admin."""
        t = self.store.get_tenant(tenant_id) if self.reach.sees_tenant(tenant_id) else None
        if t is None:
            raise _not_found("tenant", tenant_id, "tenant_id")
        return t

    def get_tenant(self, tenant_id: str) -> dict[str, Any]:
        return self._tenant_json(self._tenant(tenant_id))

    def list_tenants(self) -> dict[str, Any]:
        tenants = [t for t in self.store.list_tenants() if self.reach.sees_tenant(t.id)]
        spend = tenants_spend(self.store, tenants, time.time())  # one query for the list
        return {"object": "list", "data": [tenant_json(t, spend[t.id]) for t in tenants]}

    def update_tenant(self, tenant_id: str, body: Mapping[str, Any] | bytes | str, *, actor: str) -> dict[str, Any]:
        req = parse_body(TenantPatch, body, errors=field_error)
        self._check_class(req.priority)
        t = self._tenant(tenant_id)
        self.reach.check_tenant_patch(req.model_fields_set)
        changes: dict[str, Any] = {}
        for f in sorted(req.model_fields_set):
            value = getattr(req, f)
            if value is None:
                value = _DEFAULTS.get(f)
            if f in _LIMIT_FIELDS:
                if getattr(t.limits, f) != value:
                    setattr(t.limits, f, value)
                    changes[f] = value
            elif f == "prices":
                prices = {m: Price(p.prompt, p.completion, p.cached_prompt, p.cache_hit) for m, p in value.items()} \
                    if value else {}
                if prices != t.prices:
                    t.prices = prices
                    changes[f] = {m: _price_json(p) for m, p in prices.items()}
            elif getattr(t, f) != value:
                setattr(t, f, list(value) if isinstance(value, list) else value)
                changes[f] = value
        if not changes:
            return self._tenant_json(t)
        try:
            self.store.update_tenant(t, changes, actor)
        except KeyError:  # deleted meanwhile
            raise _not_found("tenant", tenant_id, "tenant_id") from None
        except DuplicateName:
            raise _duplicate(t.name) from None
        self._changed("tenant.update", t.id)
        return self._tenant_json(t)

    def delete_tenant(self, tenant_id: str, *, actor: str) -> dict[str, Any]:
        if not self.reach.sees_tenant(tenant_id):
            raise _not_found("tenant", tenant_id, "tenant_id")
        self.reach.require_global("deleting a tenant")
        if not self.store.delete_tenant(tenant_id, actor):
            raise _not_found("tenant", tenant_id, "tenant_id")
        self._changed("tenant.delete", tenant_id)
        return {"object": "tenant", "id": tenant_id, "deleted": True}

    # -------------------------------------------------------------- keys
    def create_key(self, tenant_id: str, body: Mapping[str, Any] | bytes | str | None, *,
                   actor: str) -> dict[str, Any]:
        """The new key's JSON with the plaintext `"key"`: the only time it is ever shown."""
        req = parse_body(KeyCreate, body, errors=field_error)
        expires = _future_time(req.expires_at)
        t = self._tenant(tenant_id)
        limits = Limits(req.rpm, req.tpm, req.max_concurrency, req.max_tokens)
        self.reach.check_new_key(t, req.scopes, limits)
        period = req.budget_period or "month"
        check_key_budget(req.budget_usd, period, t)
        return self._new_key(tenant_id, req.name, list(req.scopes), limits, expires, actor,
                             budget_usd=req.budget_usd, budget_period=period,
                             alert_thresholds=list(req.alert_thresholds or []))

    def create_global_key(self, body: Mapping[str, Any] | bytes | str | None, *, actor: str) -> dict[str, Any]:
        """A key bound to no tenant (admin and/or metrics scope); shown once, like any key."""
        self.reach.require_global("creating a key with no tenant")
        req = parse_body(GlobalKeyCreate, body, errors=field_error)
        return self._new_key(None, req.name, list(req.scopes), Limits(), _future_time(req.expires_at), actor)

    def _new_key(self, tenant_id: str | None, name: str, scopes: list[str], limits: Limits,
                 expires: float | None, actor: str, *, budget_usd: float | None = None,
                 budget_period: str = "month", alert_thresholds: list[float] | None = None) -> dict[str, Any]:
        key, prefix, digest = new_key()
        k = ApiKey(id=new_id("key_"), tenant_id=tenant_id, name=name, prefix=prefix, key_hash=digest,
                   scopes=scopes, limits=limits, expires_at=expires, budget_usd=budget_usd,
                   budget_period=budget_period, alert_thresholds=list(alert_thresholds or []))
        try:
            self.store.create_key(k, actor)
        except KeyError:
            raise _not_found("tenant", str(tenant_id), "tenant_id") from None
        self._changed("key.create", k.id)
        return {**key_json(k), "key": key}

    def list_keys(self, tenant_id: str | None = None) -> dict[str, Any]:
        """One tenant's keys; without a tenant, every key a global admin sees (its own tenant's for a
        tenant admin)."""
        if tenant_id is not None:
            tenants = {tenant_id: self._tenant(tenant_id)}
        else:
            if not self.reach.is_global:
                tenant_id = self.reach.tenant_id
            tenants = {t.id: t for t in self.store.list_tenants() if self.reach.sees_tenant(t.id)}
        keys = self.store.list_keys(tenant_id)
        spend = keys_spend(self.store, keys, tenants, time.time())  # one query for the list
        return {"object": "list", "data": [key_json(k, spend[k.id]) for k in keys]}

    def update_key(self, key_id: str, body: Mapping[str, Any] | bytes | str | None, *,
                   actor: str) -> dict[str, Any]:
        """Change only the given fields of a key (audited as `key.update` with the changes)."""
        req = parse_body(KeyPatch, body, errors=field_error)
        k = self.store.get_key(key_id)
        if k is None or not self.reach.sees_key(k):
            raise _not_found("API key", key_id, "key_id")
        if k.revoked_at is not None:
            raise APIError(409, f"API key {key_id!r} is revoked: it cannot be changed", param="key_id",
                           code="conflict")
        fields = set(req.model_fields_set)
        if k.tenant_id is None and fields - _GLOBAL_KEY_PATCHABLE:
            bad = sorted(fields - _GLOBAL_KEY_PATCHABLE)[0]
            raise bad_request(f"{bad}: a key with no tenant has no limits, budget or alerts (it bills nothing); "
                              "only name and expires_at can change", param=bad)
        t = self._tenant(k.tenant_id) if k.tenant_id is not None else None
        changes: dict[str, Any] = {}
        for f in sorted(fields):
            value = getattr(req, f)
            if f == "expires_at":
                value = _future_time(value)
                if value != k.expires_at:
                    k.expires_at = value
                    changes[f] = iso(value)
            elif f in _LIMIT_FIELDS:
                if getattr(k.limits, f) != value:
                    setattr(k.limits, f, value)
                    changes[f] = value
            else:
                value = {"budget_period": "month", "alert_thresholds": []}.get(f) if value is None else value
                if getattr(k, f) != value:
                    setattr(k, f, list(value) if isinstance(value, list) else value)
                    changes[f] = value
        if t is not None:
            self._check_key_patch(t, k, fields)
            if {"budget_usd", "budget_period"} & fields:
                check_key_budget(k.budget_usd, k.budget_period, t)
        if changes:
            try:
                self.store.update_key(k, changes, actor)
            except KeyError:
                raise _not_found("API key", key_id, "key_id") from None
            self._changed("key.update", k.id)
        tenants = {t.id: t} if t is not None else {}
        return key_json(k, keys_spend(self.store, [k], tenants, time.time())[k.id])

    def _check_key_patch(self, t: Tenant, k: ApiKey, fields: set[str]) -> None:
        """A tenant admin changes its tenant's inference keys only, never above the tenant's limits."""
        if self.reach.is_global:
            return
        if not set(k.scopes) <= {"inference"}:
            raise forbidden("a tenant admin key can only change its tenant's inference keys; changing an "
                            "admin or metrics key needs a global admin key", param="key_id")
        for f in _LIMIT_FIELDS:
            cap, wanted = getattr(t.limits, f), getattr(k.limits, f)
            if f in fields and cap is not None and (wanted is None or wanted > cap):
                raise forbidden(f"{f}: {'unlimited' if wanted is None else wanted} is above the tenant's own "
                                f"limit ({cap}); a tenant admin key cannot set a key above its tenant's limits",
                                param=f)

    def revoke_key(self, key_id: str, *, actor: str) -> dict[str, Any]:
        """Revokes at once; revoking a revoked key is a no-op (same answer, no new audit record)."""
        k = self.store.get_key(key_id)
        if k is None or not self.reach.sees_key(k):
            raise _not_found("API key", key_id, "key_id")
        self.reach.check_revoke(k)
        if self.store.revoke_key(key_id, actor):
            self._changed("key.revoke", key_id)
        k = self.store.get_key(key_id)
        assert k is not None
        return {**key_json(k), "revoked": True}

    # -------------------------------------------------------------- usage
    def usage(self, *, tenant_id: str | None = None, model: str | None = None, since: Any = None,
              until: Any = None, group_by: str | None = "request", format: str | None = "json",
              limit: Any = 1000, key_id: str | None = None, version: str | None = None,
              user: str | None = None, outcome: str | None = None) -> dict[str, Any] | str:
        """Usage rows (newest first), or totals per group (`group_by` "tenant,model", any of
        store/usage_query.GROUP_FIELDS), with the grand total: a JSON list object, or CSV text."""
        fields = usage_view.group_fields(group_by)
        format = format or "json"
        if format not in ("json", "csv"):
            raise bad_request("format: must be json or csv", param="format")
        n = usage_view.limit(limit)
        q = UsageQuery(tenant_id=self.reach.usage_tenant(usage_view.text("tenant_id", tenant_id)),
                       model=usage_view.text("model", model), key_id=usage_view.text("key_id", key_id),
                       version=usage_view.text("version", version), user=usage_view.text("user", user),
                       outcome=usage_view.outcome(outcome), since=parse_time(since, "since"),
                       until=parse_time(until, "until"), group_by=",".join(fields or ()) or "request", limit=n)
        usage_view.time_range(q.since, q.until)
        total: dict[str, Any] | None = None
        if fields is None:  # requests refused before admission: counts per key, status, code, hour
            columns = usage_view.REFUSAL_COLUMNS
            rows = [{**r, "hour": iso(r["hour"])} for r in self.store.query_refusals(q)]
        elif not fields:
            columns = usage_view.REQUEST_COLUMNS
            rows = [{c: (iso(r["created_at"]) if c == "created_at" else r["user_id"] if c == "user" else r[c])
                     for c in columns} for r in self.store.query_usage(q)]
            total = self.store.usage_totals(q)
        else:
            columns = usage_view.group_columns(fields)
            rows = self.store.query_usage(q)
            total = self.store.usage_totals(q)
        if format == "csv":
            return usage_view.to_csv(columns, rows)
        out: dict[str, Any] = {"object": "list", "group_by": "refusals" if fields is None else q.group_by,
                               "data": rows}
        if total is not None:
            out["total"] = total
        return out

    def usage_compare(self, *, tenant_id: str | None = None, model: str | None = None,
                      key_id: str | None = None, since: Any = None, until: Any = None, a_since: Any = None,
                      a_until: Any = None, b_since: Any = None, b_until: Any = None,
                      a_version: str | None = None, b_version: str | None = None) -> dict[str, Any]:
        """Two slices of the ledger side by side (gateway/usage_compare.py): two time windows
        (a_since/a_until vs b_since/b_until), or two versions (a_version vs b_version, NAME@VERSION)
        within the shared since/until; tenant_id, model and key_id narrow both sides."""
        base = UsageQuery(tenant_id=self.reach.usage_tenant(usage_view.text("tenant_id", tenant_id)),
                          model=usage_view.text("model", model), key_id=usage_view.text("key_id", key_id),
                          since=parse_time(since, "since"), until=parse_time(until, "until"))
        usage_view.time_range(base.since, base.until)
        sides = []
        for p, s_since, s_until, s_version in (("a_", a_since, a_until, a_version),
                                               ("b_", b_since, b_until, b_version)):
            q = replace(base, version=usage_view.text(f"{p}version", s_version))
            own_since, own_until = parse_time(s_since, f"{p}since"), parse_time(s_until, f"{p}until")
            if q.version is None and own_since is None and own_until is None:
                raise bad_request(f"{p}version: give two model versions (a_version and b_version, NAME@VERSION) "
                                  "or two time windows (a_since/a_until and b_since/b_until)", param=f"{p}version")
            q.since = base.since if own_since is None else own_since
            q.until = base.until if own_until is None else own_until
            usage_view.time_range(q.since, q.until, p)
            sides.append(self._compare_side(q))
        return usage_compare.compare(sides[0], sides[1])

    def _compare_side(self, q: UsageQuery) -> usage_compare.Side:
        filters = {k: v for k, v in (("tenant_id", q.tenant_id), ("model", q.model), ("key_id", q.key_id),
                                     ("version", q.version), ("since", iso(q.since)), ("until", iso(q.until)))
                   if v is not None}
        window = f"{iso(q.since) or '-'} .. {iso(q.until) or '-'}"
        label = q.version if q.version is not None and q.since is None and q.until is None else \
            f"{q.version} {window}" if q.version is not None else window
        t = self.store.usage_totals(q)
        timings = self.store.usage_timings(q, usage_compare.MAX_SAMPLES + 1)
        return usage_compare.Side(label=label, filters=filters, requests=t["requests"],
                                  prompt_tokens=t["prompt_tokens"], completion_tokens=t["completion_tokens"],
                                  cost_nusd=t["cost_nusd"], errors=t["errors"],
                                  timings=timings[:usage_compare.MAX_SAMPLES],
                                  capped=len(timings) > usage_compare.MAX_SAMPLES)

    # -------------------------------------------------------------- audit
    def audit_list(self, since_id: int = 0, limit: int = 1000) -> dict[str, Any]:
        self.reach.require_global("the audit log")
        if isinstance(since_id, bool) or not isinstance(since_id, int) or since_id < 0:
            raise bad_request("since_id: expected an integer >= 0", param="since_id")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_USAGE_LIMIT:
            raise bad_request(f"limit: expected an integer between 1 and {MAX_USAGE_LIMIT}", param="limit")
        recs = self.store.list_audit(since_id, limit)
        return {"object": "list", "data": [
            {"id": r.id, "ts": r.ts, "time": iso(r.ts), "actor": r.actor, "action": r.action, "target": r.target,
             "details": r.details, "prev_hash": r.prev_hash, "hash": r.hash} for r in recs]}

    def audit_verify(self) -> dict[str, Any]:
        """{"ok", "records", "first_bad"} (+ "head": the newest good hash, to anchor outside the database)."""
        self.reach.require_global("the audit log")
        full = getattr(self.store, "verify_audit_full", None)
        if full is not None:
            r = full()
            return {"ok": r.ok, "records": r.records, "first_bad": r.first_bad, "head": r.head}
        ok, n, first_bad = self.store.verify_audit()
        return {"ok": ok, "records": n, "first_bad": first_bad}


def dumps(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False)
