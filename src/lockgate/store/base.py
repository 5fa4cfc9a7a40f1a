"""The store interface: what the gateway and the CLI need from persistence.

`SQLiteStore` (sqlite.py) implements it; a PostgreSQL backend can follow. All
methods are synchronous and may touch disk: the server calls them only through
`AsyncStore` (writer.py), never from the event loop directly.
"""
from __future__ import annotations

from typing import Any, Protocol

from lockgate.store.object_spend import SpendSums
from lockgate.store.models import (
    ApiKey,
    AuditRecord,
    IdempotencyRecord,
    RefusalCount,
    Reservation,
    Tenant,
    UsageQuery,
    UsageRecord,
)


class DuplicateName(ValueError):
    """Another live tenant already has this name (compared by `models.name_key`)."""


class Store(Protocol):
    # ---- tenants and keys (admin; each change also appends an audit record in the same transaction)
    def create_tenant(self, tenant: Tenant, actor: str) -> Tenant: ...  # DuplicateName
    def get_tenant(self, tenant_id: str) -> Tenant | None: ...
    def list_tenants(self) -> list[Tenant]: ...
    def update_tenant(self, tenant: Tenant, changes: dict[str, Any], actor: str) -> Tenant: ...  # DuplicateName
    def delete_tenant(self, tenant_id: str, actor: str) -> bool: ...  # also revokes its keys
    def create_key(self, key: ApiKey, actor: str) -> ApiKey: ...  # tenant_id None: a global key
    def list_keys(self, tenant_id: str | None = None) -> list[ApiKey]: ...
    def get_key(self, key_id: str) -> ApiKey | None: ...
    def get_key_by_hash(self, key_hash: str) -> ApiKey | None: ...
    def revoke_key(self, key_id: str, actor: str) -> bool: ...
    def update_key(self, key: ApiKey, changes: dict[str, Any], actor: str) -> ApiKey: ...  # KeyError; audits key.update
    def count_tenants(self) -> int: ...

    # ---- budget reservations and the ledger
    def add_reservations(self, reservations: list[Reservation]) -> None: ...
    def checkpoint_reservations(self, updates: list[tuple[str, int, int]]) -> None: ...  # (request_id, completion, cached)
    def settle(self, records: list[UsageRecord]) -> None: ...  # insert usage rows (exactly once) + drop reservations
    def list_reservations(self) -> list[Reservation]: ...
    def spent_usd(self, tenant_id: str, since: float | None) -> float: ...  # settled cost since (None: all time)
    def key_spent_usd(self, key_id: str, since: float | None) -> float: ...  # the same, of one key
    # Per tenant or key (owner 'tenant_id' | 'key_id'): settled nano-USD this day/month/all time, and held now.
    def spend_sums(self, owner: str, ids: list[str] | None, now: float) -> dict[str, SpendSums]: ...
    def query_usage(self, q: UsageQuery) -> list[dict[str, Any]]: ...
    def usage_totals(self, q: UsageQuery) -> dict[str, Any]: ...  # the filtered rows' grand total
    def usage_timings(self, q: UsageQuery, limit: int) -> list[tuple[float, float | None, int]]: ...  # compare
    def add_refusals(self, counts: list[RefusalCount]) -> None: ...  # summed into (tenant, key, status, code, hour)
    def query_refusals(self, q: UsageQuery) -> list[dict[str, Any]]: ...  # per hour, newest first

    # ---- idempotency
    def get_idempotency(self, tenant_id: str, key: str) -> IdempotencyRecord | None: ...
    def put_idempotency(self, rec: IdempotencyRecord) -> bool: ...  # False: (tenant, key) already there
    def finish_idempotency(self, tenant_id: str, key: str, status: int, response: bytes) -> None: ...

    # ---- audit
    def append_audit(self, actor: str, action: str, target: str | None, details: dict[str, Any]) -> AuditRecord: ...
    def list_audit(self, since_id: int = 0, limit: int = 1000) -> list[AuditRecord]: ...
    def verify_audit(self) -> tuple[bool, int, int | None]: ...  # (ok, records, first bad id)

    def admin_version(self) -> int: ...  # bumped by every admin change, from any process (poll to reload)
    def meta_secret(self, name: str) -> bytes: ...  # 32 random bytes made once per database; never shown

    def close(self) -> None: ...
