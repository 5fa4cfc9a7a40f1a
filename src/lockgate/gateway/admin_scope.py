"""How far an admin key reaches: global admins manage everything, a tenant's admin key its own tenant.

- Global admin: the server's `--admin-key`, an admin key created with no tenant
  (`POST /admin/keys`, `lockgate keys create --global`), and the CLI (whoever can
  open the database file owns it anyway).
- Tenant admin: an admin-scoped key of tenant A. It reads tenant A, its keys
  and its usage; it creates and revokes A's inference keys, never above A's
  limits. It changes nothing of tenant A itself (limits, budget, prices, models,
  class, weight, nor its name: the operator's label on bills and dashboards, and
  a rename's 409 would tell which names other tenants use), never mints admin or
  metrics keys, never creates or deletes tenants, and has no model management,
  audit log or SLO report.

A forbidden change to its own tenant is a 403 `insufficient_scope` naming what;
anything of another tenant is the same 404 as for an id that does not exist,
so a tenant admin cannot even learn which ids exist.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from lockgate.errors import APIError
from lockgate.store.models import ApiKey, Limits, Tenant

GLOBAL_ONLY = "needs a global admin key (the server's --admin-key, or an admin key created with no tenant)"
# The tenant fields its own admin may change: none (see the module docstring).
TENANT_ADMIN_PATCHABLE: frozenset[str] = frozenset()
TENANT_ADMIN_SCOPES = frozenset({"inference"})
_LIMIT_FIELDS = ("rpm", "tpm", "max_concurrency", "max_tokens")


def forbidden(message: str, param: str | None = None) -> APIError:
    return APIError(403, message, param=param, code="insufficient_scope")


@dataclass(frozen=True, slots=True)
class AdminReach:
    """The tenant an admin caller is bound to; None: a global admin."""

    tenant_id: str | None = None

    @property
    def is_global(self) -> bool:
        return self.tenant_id is None

    def require_global(self, what: str) -> None:
        if not self.is_global:
            raise forbidden(f"{what} {GLOBAL_ONLY}")

    def sees_tenant(self, tenant_id: str | None) -> bool:
        return self.is_global or (tenant_id is not None and tenant_id == self.tenant_id)

    def sees_key(self, key: ApiKey) -> bool:
        return self.sees_tenant(key.tenant_id)

    def check_tenant_patch(self, fields: Iterable[str]) -> None:
        if self.is_global:
            return
        bad = sorted(set(fields) - TENANT_ADMIN_PATCHABLE)
        if bad:
            raise forbidden(f"{', '.join(bad)}: a tenant's own admin key cannot change its tenant (limits, "
                            f"budget, prices, models, class, weight or name); this {GLOBAL_ONLY}",
                            param=bad[0])

    def check_new_key(self, tenant: Tenant, scopes: Iterable[str], limits: Limits) -> None:
        """A tenant admin mints inference keys of its own tenant, within the tenant's limits."""
        if self.is_global:
            return
        extra = sorted(set(scopes) - TENANT_ADMIN_SCOPES)
        if extra:
            raise forbidden(f"scopes: a tenant admin key can only create inference keys, not {', '.join(extra)}; "
                            f"that {GLOBAL_ONLY}", param="scopes")
        for f in _LIMIT_FIELDS:
            cap, wanted = getattr(tenant.limits, f), getattr(limits, f)
            if cap is not None and wanted is not None and wanted > cap:
                raise forbidden(f"{f}: {wanted} is above the tenant's own limit ({cap}); a tenant admin key "
                                "cannot create a key above its tenant's limits", param=f)

    def check_revoke(self, key: ApiKey) -> None:
        if not self.is_global and not set(key.scopes) <= TENANT_ADMIN_SCOPES:
            raise forbidden("a tenant admin key can only revoke its tenant's inference keys; revoking an "
                            f"admin or metrics key {GLOBAL_ONLY}", param="key_id")

    def usage_tenant(self, requested: str | None) -> str | None:
        """The tenant a usage query covers: a tenant admin's own, whatever it asked (another: 404)."""
        if self.is_global:
            return requested or None
        if requested not in (None, "", self.tenant_id):
            raise APIError(404, f"tenant {requested!r} not found", param="tenant_id", code="not_found")
        return self.tenant_id
