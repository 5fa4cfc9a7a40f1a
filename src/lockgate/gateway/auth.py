"""Who is calling: API keys resolved to a tenant, from an in-memory key ring.

Keys are stored only as SHA-256 hashes. A request's key is hashed and looked up
in a dict: the time taken does not depend on how much of a near-miss key
matches, so timing reveals nothing. The ring is rebuilt from the store after
every change (and when another process, such as the CLI, changed the store).
"""
from __future__ import annotations

import hmac
import time
from dataclasses import dataclass

from lockgate.gateway.admin_scope import AdminReach, forbidden
from lockgate.gateway.tenants import hash_key
from lockgate.errors import APIError
from lockgate.store.models import ApiKey, Tenant

ADMIN_ACTOR = "admin-key"


@dataclass(slots=True)
class Principal:
    """The authenticated caller: a tenant's key, a global key (no tenant), or the bootstrap admin key."""

    tenant: Tenant | None
    key: ApiKey | None
    is_admin: bool
    can_infer: bool

    @property
    def actor(self) -> str:
        return self.key.id if self.key is not None else ADMIN_ACTOR

    @property
    def tenant_id(self) -> str | None:
        return self.tenant.id if self.tenant is not None else None

    @property
    def is_global_admin(self) -> bool:
        """The bootstrap admin key, or an admin key bound to no tenant: manages everything."""
        return self.is_admin and self.tenant is None

    @property
    def can_read_metrics(self) -> bool:
        """`/metrics` in keyed mode: a global admin key, or a key with the `metrics` scope."""
        return self.is_global_admin or (self.key is not None and "metrics" in self.key.scopes)

    @property
    def admin_reach(self) -> AdminReach:
        """What this caller may manage in the admin API (gateway/admin_scope.py); a key without the
        admin scope manages nothing (the guard refuses it first; this keeps a slip from making it global)."""
        if not self.is_admin:
            raise forbidden("this key has no admin scope")
        return AdminReach(None if self.is_global_admin else self.tenant_id)


def unauthorized(message: str = "invalid or missing API key (send `Authorization: Bearer <key>`)") -> APIError:
    return APIError(401, message, code="invalid_api_key")


class KeyRing:
    def __init__(self, admin_key: str | None) -> None:
        self._admin_hash = hash_key(admin_key) if admin_key else None
        self._keys: dict[str, tuple[ApiKey, Tenant | None]] = {}
        self.num_tenants = 0

    @property
    def keyed(self) -> bool:
        """True: every route but the allowlist needs a key (an admin key is set or tenants exist)."""
        return self._admin_hash is not None or self.num_tenants > 0

    def load(self, tenants: list[Tenant], keys: list[ApiKey]) -> None:
        by_id = {t.id: t for t in tenants}
        ring: dict[str, tuple[ApiKey, Tenant | None]] = {}
        for k in keys:
            if k.revoked_at is not None:
                continue
            if k.tenant_id is None:  # a global key
                ring[k.key_hash] = (k, None)
            elif (tenant := by_id.get(k.tenant_id)) is not None:
                ring[k.key_hash] = (k, tenant)
        self._keys = ring  # swapped whole: a request never sees half a reload
        self.num_tenants = len(tenants)

    def authenticate(self, authorization: bytes | None, now: float | None = None) -> Principal:
        """The caller behind an `Authorization: Bearer <key>` header; 401 for anything else."""
        if not authorization:
            raise unauthorized()
        scheme, _, token = authorization.partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token or len(token) > 512:
            raise unauthorized()
        digest = hash_key(token)
        if self._admin_hash is not None and hmac.compare_digest(digest, self._admin_hash):
            return Principal(tenant=None, key=None, is_admin=True, can_infer=False)
        found = self._keys.get(digest)
        if found is None:
            raise unauthorized()
        key, tenant = found
        if key.expires_at is not None and (now or time.time()) >= key.expires_at:
            raise unauthorized()  # the same answer as for an unknown key: nothing to probe
        return Principal(tenant=tenant, key=key, is_admin="admin" in key.scopes,
                         can_infer="inference" in key.scopes and tenant is not None)  # no tenant to bill
