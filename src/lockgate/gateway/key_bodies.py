"""Checks for the spend fields of tenant and key bodies: alert thresholds, the alert webhook, and a
key's budget against its tenant's.

- `alert_thresholds`: percentages of the budget, each in (0, 100], at most 10,
  no duplicates; saved sorted.
- `alert_webhook`: an http(s) URL with a host, at most 2048 characters, no
  credentials in it (they would show in every tenant read and the audit log),
  no whitespace or control characters. Which addresses may be posted to
  (private, loopback) is decided when an alert is sent (gateway/webhooks.py).
- A key's budget may not exceed its tenant's for a period that contains the
  key's (the same period, or a day inside a month, or anything inside all
  time): the key could never spend it, so the number would mislead.
"""
from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import AfterValidator, BeforeValidator, Field

from lockgate.errors import bad_request
from lockgate.store.models import Tenant

MAX_THRESHOLDS = 10
MAX_WEBHOOK_LEN = 2048
# A period and the periods that contain it.
_CONTAINED_IN = {"day": ("day", "month", "total"), "month": ("month", "total"), "total": ("total",)}


def _sorted_unique(values: list[float]) -> list[float]:
    if len(set(values)) != len(values):
        raise ValueError("must not repeat a threshold")
    return sorted(values)


Threshold = Annotated[float, Field(gt=0, le=100, allow_inf_nan=False)]
AlertThresholds = Annotated[list[Threshold], Field(max_length=MAX_THRESHOLDS), AfterValidator(_sorted_unique)]


def _webhook(value: Any) -> Any:
    if not isinstance(value, str):
        return value  # the strict str type refuses it
    if len(value) > MAX_WEBHOOK_LEN:
        raise ValueError(f"must be at most {MAX_WEBHOOK_LEN} characters (got {len(value)})")
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in value) or not value.isascii():
        raise ValueError("must be an http or https URL without spaces, control or non-ASCII characters "
                         "(percent-encode them)")
    try:
        parts = urlsplit(value)
        port = parts.port  # ValueError for a port out of range or not a number
    except ValueError as e:
        raise ValueError(f"not a valid URL: {e}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise ValueError("must be an http or https URL")
    if "@" in parts.netloc:
        raise ValueError("must not contain credentials (user:password@); the body is signed instead")
    if not parts.hostname:
        raise ValueError("must name a host")
    if port == 0:
        raise ValueError("port 0 is not a valid port")
    return value


Webhook = Annotated[str, BeforeValidator(_webhook)]


def check_key_budget(budget_usd: float | None, period: str, tenant: Tenant) -> None:
    """400 naming `budget_usd` when a key's budget exceeds its tenant's for a period containing the key's."""
    if budget_usd is None or tenant.budget_usd is None:
        return
    if tenant.budget_period in _CONTAINED_IN.get(period, ()) and budget_usd > tenant.budget_usd:
        same = "" if tenant.budget_period == period else f" (which contains a {period})"
        raise bad_request(
            f"budget_usd: the key's {period} budget of ${budget_usd:g} is above its tenant's "
            f"{tenant.budget_period} budget of ${tenant.budget_usd:g}{same}; the stricter budget always "
            "wins, so it could never be spent", param="budget_usd", code="invalid_value")
