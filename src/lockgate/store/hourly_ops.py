"""Hourly aggregates of the usage ledger: what cost anomaly detection (gateway/anomaly.py) reads.

One query per time range, grouped by (tenant, key, model, UTC hour): requests,
prompt/completion/cached tokens and cost as an exact integer nano-USD sum. The
hour bucket is the one dialect difference (`HOUR_SQL`, overridden in
postgres.py, where `created_at` is a DOUBLE). Rows without a tenant (open mode)
are left out: anomalies are per tenant.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

HOUR_S = 3600


@dataclass(slots=True)
class HourlyUsage:
    tenant_id: str
    key_id: str | None
    model: str
    hour: int  # the hour's start, Unix seconds (a multiple of 3600)
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost_nusd: int

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class HourlyOps:
    """Mixed into `SqlStore` (the same `_q`)."""

    # The hour number of a usage row (created_at // 3600), as an integer on both backends.
    HOUR_SQL = "CAST(created_at / 3600 AS INTEGER)"

    def _q(self, sql: str, args: tuple | list = ()) -> Any:
        raise NotImplementedError

    def hourly_usage(self, since: float, until: float, tenant_id: str | None = None) -> list[HourlyUsage]:
        """Aggregates of the rows with `since <= created_at < until` (both on hour bounds for whole
        hours), ordered by hour; `tenant_id`: that tenant's only."""
        where, args = ["tenant_id IS NOT NULL", "created_at >= ?", "created_at < ?"], [float(since), float(until)]
        if tenant_id is not None:
            where.append("tenant_id = ?")
            args.append(tenant_id)
        rows = self._q(
            f"SELECT tenant_id, key_id, model, {self.HOUR_SQL}, count(*), coalesce(sum(prompt_tokens), 0), "
            "coalesce(sum(completion_tokens), 0), coalesce(sum(cached_tokens), 0), coalesce(sum(cost_nusd), 0) "
            f"FROM usage WHERE {' AND '.join(where)} GROUP BY 1, 2, 3, 4 "
            "ORDER BY 4, 1, coalesce(key_id, ''), 3", args)  # NULLs sort apart in the two dialects
        # int(): PostgreSQL's sum over BIGINT is NUMERIC (a Decimal here), exact either way.
        return [HourlyUsage(r[0], r[1], r[2], int(r[3]) * HOUR_S, int(r[4]), int(r[5]), int(r[6]), int(r[7]),
                            int(r[8])) for r in rows]
