"""Cost anomaly detection: spend and tokens per hour against their own recent baseline.

Series: per tenant, per tenant's key and per tenant's model, two metrics each:
`cost_usd` (the ledger's exact nano-USD sums) and `tokens` (prompt + completion)
per UTC hour (store/hourly_ops.py). Each complete hour is judged against the
`baseline_hours` before it (default 24), counted from the first hour in that
window the scope had traffic (a scope's idle hours count as 0; a scope with less
than `min_history_hours` of history is not judged).

- Baseline: the median of those hours; spread: their median absolute deviation
  scaled by 1.4826 (the standard deviation under normal noise), floored at
  `min_spread` of the baseline so a flat series does not make any wiggle an
  outlier. Both are robust: one earlier spike moves neither, where a mean or an
  EWMA would be dragged up by it and hide the next one (so no EWMA here). A
  24-hour window holds one full day, so daily seasonality widens the spread
  instead of raising alerts at each day's peak; the price is that a change
  smaller than the day's own swing is not flagged.
- Count noise: an hour of few requests is noisy whatever the past looked like.
  Requests are taken as a Poisson process per model, each worth that model's
  mean cost (tokens) per request over the baseline; the hour's standard
  deviation from counting alone is sqrt(sum over models of rate x value^2), at
  the hour's request rate bounded to 1-2x the baseline's. Any change must
  exceed `noise_z` (5) of it: this is what keeps keys with a few requests an
  hour, and a rarely used expensive model, quiet.
- Spike: observed > baseline + `spike_z` x spread, > `spike_ratio` x baseline,
  and at least `min_cost_usd` / `min_tokens` above it (so $0.000001 -> $0.000003
  is not an alert).
- Drop: observed < baseline - `drop_z` x spread, < baseline / `drop_ratio`, at
  least the same floor below it, and only for a solid baseline (traffic in at
  least `solid_fraction` of the baseline hours). A drop's cost is often too
  noisy per hour to call (a few expensive requests make most of it); its tokens
  then carry the alert.
- Size: `ratio` (observed / baseline; None from a zero baseline) and `z`
  ((observed - baseline) / the larger of the spread and the count noise).
- Likely cause: the hour against the baseline hours' mean, as a product whose
  logarithms add up: cost = requests x tokens per request x price per token,
  and the price per token split into model mix (the baseline's per-model prices
  at the hour's token shares), cache hit rate (the hour's tokens priced at the
  tenant's current prices with the baseline's cached share against their own
  cached share) and the rest (`price_per_token`: price changes, more completion
  than prompt). The factor with the largest share of the change in its
  direction is `likely`; every factor's numbers come with it.

`scan(store, now)` judges the last complete hour (helper of the alert loop, which
raises each anomaly as an alert deduplicated by `id`); `list_anomalies` every
complete hour of a range, for `/admin/anomalies`.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from statistics import median
from typing import Any

from lockgate.errors import bad_request
from lockgate.gateway.admin_scope import AdminReach
from lockgate.gateway.tenants import parse_time
from lockgate.store.hourly_ops import HOUR_S, HourlyUsage
from lockgate.store.models import Price, Tenant

METRICS = ("cost_usd", "tokens")
MAD_SCALE = 1.4826  # MAD -> standard deviation under normal noise
MAX_RANGE_H = 7 * 24  # /admin/anomalies looks back at most a week
DEFAULT_RANGE_H = 24
PEAK_RATE = 2.0  # the busiest a normal hour is taken to be against its baseline's rate (count noise)
FACTORS = ("requests", "tokens_per_request", "model_mix", "cache_hit_rate", "price_per_token")


@dataclass(frozen=True, slots=True)
class AnomalyConfig:
    baseline_hours: int = 24  # hours before the judged one that form its baseline
    min_history_hours: int = 12  # a scope younger than this (in the window) is not judged
    spike_z: float = 4.0  # robust z a spike must exceed
    spike_ratio: float = 2.0  # ... and observed / baseline
    drop_z: float = 2.5  # robust z a drop must be below (negated)
    drop_ratio: float = 4.0  # ... and baseline / observed (a drop to under a quarter)
    solid_fraction: float = 0.9  # drops: share of baseline hours with traffic
    min_cost_usd: float = 0.01  # the smallest change per hour worth an alert, in USD ...
    min_tokens: int = 20_000  # ... and in tokens
    min_spread: float = 0.05  # the spread is at least this fraction of the baseline
    noise_z: float = 5.0  # either way, the change must exceed this many sd of the count noise


@dataclass(slots=True)
class Agg:
    requests: int = 0
    prompt: int = 0
    completion: int = 0
    cached: int = 0
    cost_nusd: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt + self.completion

    def add(self, o: Agg | HourlyUsage) -> None:
        if isinstance(o, HourlyUsage):
            o = Agg(o.requests, o.prompt_tokens, o.completion_tokens, o.cached_tokens, o.cost_nusd)
        self.requests += o.requests
        self.prompt += o.prompt
        self.completion += o.completion
        self.cached += o.cached
        self.cost_nusd += o.cost_nusd


# A series: (scope, tenant, key, model) -> hour -> model -> aggregate.
SeriesKey = tuple[str, str, str | None, str | None]
Hours = dict[int, dict[str, Agg]]
Index = dict[SeriesKey, Hours]


@dataclass(slots=True)
class Anomaly:
    id: str  # the alert's dedup key: anomaly:{scope}:{metric}:{hour}:{direction}
    tenant_id: str
    key_id: str | None  # set for a key's series
    model: str | None  # set for a model's series
    metric: str  # cost_usd | tokens
    hour: int  # the hour's start, Unix seconds
    direction: str  # spike | drop
    observed: float  # in the metric's unit per hour
    baseline: float
    ratio: float | None  # observed / baseline (None: a zero baseline)
    z: float
    cause: dict[str, Any] = field(default_factory=dict)

    @property
    def scope(self) -> str:
        return "key" if self.key_id is not None else "model" if self.model is not None else "tenant"

    def payload(self) -> dict[str, Any]:
        return {"kind": "anomaly", "id": self.id, "scope": self.scope, "tenant_id": self.tenant_id,
                "key_id": self.key_id, "model": self.model, "metric": self.metric, "hour": self.hour,
                "hour_utc": datetime.fromtimestamp(self.hour, timezone.utc).strftime("%Y-%m-%dT%H:00:00Z"),
                "direction": self.direction, "observed": self.observed, "baseline": self.baseline,
                "ratio": self.ratio, "z": self.z, "cause": self.cause}


def build_index(rows: list[HourlyUsage]) -> Index:
    """Every row added to its tenant's, its key's and its model's series."""
    index: Index = {}
    for r in rows:
        keys: list[SeriesKey] = [("tenant", r.tenant_id, None, None), ("model", r.tenant_id, None, r.model)]
        if r.key_id is not None:
            keys.append(("key", r.tenant_id, r.key_id, None))
        for k in keys:
            index.setdefault(k, {}).setdefault(r.hour, {}).setdefault(r.model, Agg()).add(r)
    return index


def _total(by_model: dict[str, Agg] | None) -> Agg:
    out = Agg()
    for a in (by_model or {}).values():
        out.add(a)
    return out


def _value(a: Agg, metric: str) -> int:
    return a.cost_nusd if metric == "cost_usd" else a.tokens


def _unit(v: float, metric: str) -> float:
    return round(v / 1e9, 9) if metric == "cost_usd" else round(float(v), 3)


def _series_id(k: SeriesKey) -> str:
    scope, tenant, key, model = k
    return f"t:{tenant}" if scope == "tenant" else f"k:{key}" if scope == "key" else f"m:{tenant}:{model}"


def detect_hour(index: Index, hour: int, config: AnomalyConfig | None = None,
                tenants: dict[str, Tenant] | None = None) -> list[Anomaly]:
    """The anomalies of the complete hour starting at `hour` (a multiple of 3600)."""
    cfg = config or AnomalyConfig()
    start = hour - cfg.baseline_hours * HOUR_S
    out: list[Anomaly] = []
    for k, hours in index.items():
        first = next((h for h in range(start, hour, HOUR_S) if h in hours), None)
        if first is None:
            continue  # nothing before: a new scope has no baseline
        base_hours = range(first, hour, HOUR_S)
        if len(base_hours) < cfg.min_history_hours:
            continue
        base = [_total(hours.get(h)) for h in base_hours]
        obs = _total(hours.get(hour))
        solid = sum(1 for a in base if a.requests) >= cfg.solid_fraction * len(base)
        by_model = _sum_hours([hours.get(h) or {} for h in base_hours])
        for metric in METRICS:
            a = _judge(cfg, [_value(b, metric) for b in base], _value(obs, metric), metric, solid,
                       _count_noise(by_model, len(base_hours), metric, obs.requests))
            if a is None:
                continue
            direction, med, spread = a
            o = _value(obs, metric)
            tenant = (tenants or {}).get(k[1])
            out.append(Anomaly(
                id=f"anomaly:{_series_id(k)}:{metric}:{hour}:{direction}", tenant_id=k[1], key_id=k[2],
                model=k[3], metric=metric, hour=hour, direction=direction, observed=_unit(o, metric),
                baseline=_unit(med, metric), ratio=round(o / med, 3) if med > 0 else None,
                z=round((o - med) / spread, 2),
                cause=explain([hours.get(h) or {} for h in base_hours], hours.get(hour) or {}, metric, direction,
                              tenant.price_for if tenant is not None else None)))
    return out


def _sum_hours(hours: list[dict[str, Agg]]) -> dict[str, Agg]:
    out: dict[str, Agg] = {}
    for by_model in hours:
        for m, a in by_model.items():
            out.setdefault(m, Agg()).add(a)
    return out


def _count_noise(by_model: dict[str, Agg], n: int, metric: str, observed_requests: int) -> float:
    """The standard deviation of an hour's metric from request counts alone: requests arrive as a
    Poisson process per model, each worth that model's mean value per request over the baseline,
    at the baseline's model mix and the hour's request rate bounded to 1-2x the baseline's (a busy hour
    is noisier, so a plain daily peak is no outlier; a burst far above that is no peak)."""
    rate = sum(a.requests for a in by_model.values()) / n
    scale = min(PEAK_RATE, max(1.0, observed_requests / rate)) if rate else 1.0
    var = sum(_value(a, metric) ** 2 / (a.requests * n) for a in by_model.values() if a.requests)
    return math.sqrt(var * scale)


def _judge(cfg: AnomalyConfig, base: list[int], obs: int, metric: str, solid: bool,
           noise: float = 0.0) -> tuple[str, float, float] | None:
    """(direction, baseline, spread) of an anomalous hour, else None. `noise`: `_count_noise`."""
    med = float(median(base))
    spread = max(MAD_SCALE * float(median(abs(v - med) for v in base)), cfg.min_spread * med, 1.0)
    floor = cfg.min_cost_usd * 1e9 if metric == "cost_usd" else cfg.min_tokens
    change = obs - med
    if abs(change) < floor or abs(change) <= cfg.noise_z * noise:
        return None
    if change > cfg.spike_z * spread and obs > cfg.spike_ratio * med:
        return "spike", med, max(spread, noise)
    if solid and -change > cfg.drop_z * spread and obs * cfg.drop_ratio < med:
        return "drop", med, max(spread, noise)
    return None


def _log(a: float, b: float) -> float:
    return math.log(a / b) if a > 0 and b > 0 else 0.0


def _shares(by_model: dict[str, Agg]) -> dict[str, float]:
    total = sum(a.tokens for a in by_model.values())
    return {m: a.tokens / total for m, a in by_model.items()} if total else {}


def explain(base_hours: list[dict[str, Agg]], obs: dict[str, Agg], metric: str, direction: str,
            price_for: Any = None) -> dict[str, Any]:
    """The likely cause of a change: each factor's log share of it and its numbers (module docstring).
    `price_for(model) -> Price`: the tenant's prices (the cache factor needs them; None: left out)."""
    n = max(1, len(base_hours))
    base = _sum_hours(base_hours)
    b, o = _total(base), _total(obs)
    per_hour = {"requests": (b.requests / n, float(o.requests)),
                "tokens_per_request": (b.tokens / b.requests if b.requests else 0.0,
                                       o.tokens / o.requests if o.requests else 0.0),
                "cache_hit_rate": (b.cached / b.prompt if b.prompt else 0.0, o.cached / o.prompt if o.prompt else 0.0),
                "usd_per_1m_tokens": (b.cost_nusd / b.tokens / 1e3 if b.tokens else 0.0,
                                      o.cost_nusd / o.tokens / 1e3 if o.tokens else 0.0)}
    logs = {"requests": _log(*reversed(per_hour["requests"])),
            "tokens_per_request": _log(*reversed(per_hour["tokens_per_request"]))}
    if metric == "cost_usd" and o.tokens and b.tokens:
        mix, cache = _price_factors(base, obs, price_for)
        logs["model_mix"], logs["cache_hit_rate"] = mix, cache
        total = _log(o.cost_nusd / 1.0, b.cost_nusd / n)
        logs["price_per_token"] = total - sum(logs.values())
    elif metric == "cost_usd":
        logs["model_mix"] = logs["cache_hit_rate"] = logs["price_per_token"] = 0.0
    sign = 1.0 if direction == "spike" else -1.0
    if o.requests == 0:  # all traffic gone: nothing else to compare
        logs = {f: 0.0 for f in logs} | {"requests": -1.0}
        likely = "requests"
    else:
        likely = max(logs, key=lambda f: sign * logs[f])
    moved = sum(abs(v) for v in logs.values()) or 1.0
    bs, os_ = _shares(base), _shares(obs)
    grew = max(os_, key=lambda m: os_[m] - bs.get(m, 0.0)) if os_ else None
    cause: dict[str, Any] = {
        "likely": likely,
        "contributions": {f: round(v / moved, 3) or 0.0 for f, v in logs.items()},  # never -0.0
        **{f: {"baseline": round(bv, 6), "observed": round(ov, 6)} for f, (bv, ov) in per_hour.items()},
    }
    if grew is not None:
        cause["model_mix"] = {"model": grew, "baseline_share": round(bs.get(grew, 0.0), 4),
                              "observed_share": round(os_.get(grew, 0.0), 4)}
    cause["summary"] = _summary(likely, cause)
    return cause


def _price_factors(base: dict[str, Agg], obs: dict[str, Agg], price_for: Any) -> tuple[float, float]:
    """(model mix, cache hit rate) as log factors of the price per token."""
    b = _total(base)
    ppt_b = b.cost_nusd / b.tokens
    shares = _shares(obs)
    # The baseline's price per token of each model, at the hour's token shares (a new model: its own).
    mix_price = sum(s * ((base[m].cost_nusd / base[m].tokens) if m in base and base[m].tokens
                         else (obs[m].cost_nusd / obs[m].tokens if obs[m].tokens else 0.0))
                    for m, s in shares.items())
    mix = _log(mix_price, ppt_b)
    if price_for is None:
        return mix, 0.0
    hit_b = b.cached / b.prompt if b.prompt else 0.0
    actual = at_base = 0
    for m, a in obs.items():
        price: Price = price_for(m)
        bm = base.get(m)
        rate = bm.cached / bm.prompt if bm is not None and bm.prompt else hit_b
        actual += price.cost_nano(a.prompt, a.completion, a.cached)
        at_base += price.cost_nano(a.prompt, a.completion, round(rate * a.prompt))
    return mix, _log(actual, at_base)


def _summary(likely: str, c: dict[str, Any]) -> str:
    if likely == "model_mix" and "model_mix" in c:
        mm = c["model_mix"]
        return (f"model mix: {mm['model']} went from {mm['baseline_share']:.0%} to {mm['observed_share']:.0%} "
                "of the tokens")
    if likely == "price_per_token":
        v = c["usd_per_1m_tokens"]
        return f"price per token: ${v['baseline']:.4g} -> ${v['observed']:.4g} per 1M tokens"
    v = c[likely]
    if likely == "cache_hit_rate":
        return f"cache hit rate: {v['baseline']:.0%} -> {v['observed']:.0%} of prompt tokens"
    what = "requests per hour" if likely == "requests" else "tokens per request"
    return f"{what}: {v['baseline']:.4g} -> {v['observed']:.4g}"


def last_complete_hour(now: float) -> int:
    return int(now // HOUR_S) * HOUR_S - HOUR_S


def scan_hours(store: Any, first: int, last: int, config: AnomalyConfig | None = None,
               tenant_id: str | None = None) -> list[Anomaly]:
    """Anomalies of every complete hour from `first` to `last` (hour starts), oldest first; one query."""
    cfg = config or AnomalyConfig()
    rows = store.hourly_usage(first - cfg.baseline_hours * HOUR_S, last + HOUR_S, tenant_id)
    tenants = {t.id: t for t in store.list_tenants()}
    index = build_index(rows)
    out: list[Anomaly] = []
    for hour in range(first, last + 1, HOUR_S):
        out += detect_hour(index, hour, cfg, tenants)
    return out


def scan(store: Any, now: float, config: AnomalyConfig | None = None) -> list[Anomaly]:
    """The anomalies of the last complete hour before `now` (what the alert loop raises)."""
    hour = last_complete_hour(now)
    return scan_hours(store, hour, hour, config)


def list_anomalies(store: Any, reach: AdminReach, *, since: Any = None, tenant: str | None = None,
                   now: float | None = None, config: AnomalyConfig | None = None) -> dict[str, Any]:
    """`/admin/anomalies`: every complete hour since `since` (default: the last day, at most a week
    back), newest first; a tenant's admin sees its own tenant only (another: 404)."""
    now = time.time() if now is None else now
    if tenant is not None and len(tenant) > 256:
        raise bad_request("tenant: too long", param="tenant")
    tenant_id = reach.usage_tenant(tenant)
    ts = parse_time(since, "since")
    ts = now - DEFAULT_RANGE_H * HOUR_S if ts is None else ts
    if ts > now:
        raise bad_request("since: in the future", param="since")
    if now - ts > MAX_RANGE_H * HOUR_S:
        raise bad_request(f"since: at most {MAX_RANGE_H // 24} days back", param="since")
    first, last = math.ceil(ts / HOUR_S) * HOUR_S, last_complete_hour(now)
    found = scan_hours(store, first, last, config, tenant_id) if first <= last else []
    found.sort(key=lambda a: (-a.hour, a.tenant_id, a.scope, a.key_id or "", a.model or "", a.metric))
    return {"object": "list", "since": first, "until": last + HOUR_S, "data": [a.payload() for a in found]}
