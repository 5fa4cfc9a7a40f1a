"""The usage views' parameters and shapes: what `AdminService.usage` / `usage_compare` accept and return.

Every parameter a caller gives is checked here with a 400 naming it (unknown
group-by field, duplicated field, unknown outcome, inverted time range, limit out
of range, anything too long); the SQL is store/usage_query.py's. Money leaves as
`cost_usd` (a USD number from the exact integer sum) and `cost_nusd` (the integer).
"""
from __future__ import annotations

import csv
import io
from decimal import Decimal
from typing import Any

from lockgate.errors import bad_request
from lockgate.store.money import NANO_PER_USD
from lockgate.store.usage_query import OUTCOMES, TOTAL_COLUMNS, parse_group_by

MAX_USAGE_LIMIT = 100_000
MAX_TEXT = 256  # longest id, model, version or user a filter takes
REQUEST_COLUMNS = ("request_id", "created_at", "tenant_id", "key_id", "model", "model_version", "replica",
                   "prompt_tokens", "completion_tokens", "cached_tokens", "queue_time_s", "ttft_s", "e2e_s",
                   "finish_reason", "status", "cost_usd", "cost_nusd", "user", "priority_class", "cache", "router",
                   "attempts", "hedged", "spec_draft_tokens", "spec_accepted_tokens")
REFUSAL_COLUMNS = ("hour", "tenant_id", "key_id", "status", "code", "requests")


def text(name: str, value: Any) -> str | None:
    """A filter's value: None/"" -> None; a string of at most MAX_TEXT characters; else 400."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise bad_request(f"{name}: expected a string", param=name)
    if len(value) > MAX_TEXT:
        raise bad_request(f"{name}: too long (at most {MAX_TEXT} characters)", param=name)
    return value


def group_fields(value: Any) -> tuple[str, ...] | None:
    """() for rows, the fields for totals, None for "refusals"; 400 naming group_by."""
    raw = value or "request"
    if not isinstance(raw, str):
        raise bad_request("group_by: expected a string", param="group_by")
    if len(raw) > 200:
        raise bad_request("group_by: too long", param="group_by")
    if raw.strip() == "refusals":
        return None
    try:
        return parse_group_by(raw)
    except ValueError as e:
        raise bad_request(f"group_by: {e} (or refusals: requests refused before admission)",
                          param="group_by") from None


def outcome(value: Any) -> str | None:
    v = text("outcome", value)
    if v is not None and v not in OUTCOMES:
        raise bad_request(f"outcome: must be one of {', '.join(OUTCOMES)}", param="outcome")
    return v


def limit(value: Any) -> int:
    try:
        if isinstance(value, bool) or (isinstance(value, str) and len(value) > 20):
            raise ValueError
        n = int(value)
        if isinstance(value, float) and value != n:
            raise ValueError
    except (TypeError, ValueError, OverflowError):
        raise bad_request("limit: expected an integer", param="limit") from None
    if not 1 <= n <= MAX_USAGE_LIMIT:
        raise bad_request(f"limit: must be between 1 and {MAX_USAGE_LIMIT}", param="limit")
    return n


def time_range(since: float | None, until: float | None, prefix: str = "") -> None:
    if since is not None and until is not None and since >= until:
        raise bad_request(f"{prefix}until: must be later than {prefix}since (an empty or inverted time range)",
                          param=f"{prefix}until")


def usd_text(nano_usd: int) -> str:
    """Exact decimal text of a nano-USD amount: 1500000000 -> "1.5", 56400 -> "0.0000564"."""
    d = (Decimal(int(nano_usd)) / NANO_PER_USD).normalize()
    return format(d, "f")


def usd_rounded(nano_usd: int | None) -> str:
    """For people: $1,234.50 / $0.0123 / $0.000056 (never 5.6399999999999995e-05); None -> ""."""
    if nano_usd is None:
        return ""
    v = Decimal(int(nano_usd)) / NANO_PER_USD
    places = 2 if abs(v) >= 1 else 4 if abs(v) >= Decimal("0.01") else 6
    return f"{'-' if v < 0 else ''}${abs(v):,.{places}f}"


def group_columns(fields: tuple[str, ...]) -> tuple[str, ...]:
    return (*fields, *TOTAL_COLUMNS)


def to_csv(columns: tuple[str, ...], rows: list[dict[str, Any]]) -> str:
    """CSV with a header; None -> empty; a grouped cost as its exact decimal text."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(columns)
    exact = "cost_nusd" in columns and "request_id" not in columns
    for r in rows:
        w.writerow([usd_text(r["cost_nusd"]) if exact and c == "cost_usd"
                    else "" if r[c] is None else r[c] for c in columns])
    return out.getvalue()
