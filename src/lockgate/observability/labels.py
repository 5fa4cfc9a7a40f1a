"""Bounded label values for per-tenant metrics.

Every distinct label value is a new time series in every histogram bucket, so
tenants are capped: the first `cap` tenants seen keep their own label, later
ones share `other`. Open mode (no tenants) is `none`.
"""
from __future__ import annotations

NO_TENANT = "none"
OTHER_TENANT = "other"


class TenantLabels:
    __slots__ = ("cap", "_known")

    def __init__(self, cap: int = 100) -> None:
        if cap < 0:
            raise ValueError(f"the tenant label cap must be >= 0, got {cap}")
        self.cap = cap
        self._known: set[str] = set()

    def label(self, tenant_id: str | None) -> str:
        if tenant_id is None:
            return NO_TENANT
        if tenant_id in self._known:
            return tenant_id
        if len(self._known) < self.cap and tenant_id not in (NO_TENANT, OTHER_TENANT):
            self._known.add(tenant_id)
            return tenant_id
        return OTHER_TENANT

    def __len__(self) -> int:
        return len(self._known)
