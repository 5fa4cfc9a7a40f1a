"""Automatic rollback: which canary breaks a rule, with the figures that show it.

The stable version is the one with the largest traffic share (ties: the one loaded
first); every other version with a share is a canary. Rules, each over the last
`window` requests of a version (settings.RollbackRules):
- error rate above `max_error_rate`, once the canary's window holds `min_requests`;
- TTFT p95 above `max_ttft_p95_ratio` x the stable's, both windows holding
  `min_requests`, and slower by `min_ttft_delta_s` at least;
- the shadow version's greedy token agreement below `min_shadow_agreement` over
  `min_shadow_samples` greedy pairs.
Pure: the registry applies the verdict (traffic to 0, audit record, metric, log).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lockgate.lifecycle.settings import RollbackRules
from lockgate.lifecycle.stats import ShadowStats, VersionStats
from lockgate.stats import percentile


@dataclass(slots=True)
class Breach:
    version: str
    rule: str  # error_rate | ttft_p95_ratio | shadow_agreement
    figures: dict[str, Any]

    def message(self) -> str:
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.figures.items())
        return f"{self.rule} ({shown})"


def stable_version(traffic: dict[str, float], order: list[str]) -> str | None:
    """The version with the most traffic; ties go to the earliest in `order` (load order)."""
    live = [v for v in order if traffic.get(v, 0) > 0]
    if not live:
        return None
    return max(live, key=lambda v: (traffic[v], -order.index(v)))


def check(rules: RollbackRules, traffic: dict[str, float], order: list[str], stats: dict[str, VersionStats],
          shadow: tuple[str, ShadowStats] | None, exempt: set[str]) -> list[Breach]:
    """Every canary (not in `exempt`: already rolled back) breaking a rule, at most one breach each."""
    if not rules.enabled:
        return []
    stable = stable_version(traffic, order)
    out: list[Breach] = []
    for v in order:
        if v == stable or v in exempt or traffic.get(v, 0) <= 0 or v not in stats:
            continue
        breach = _canary(rules, v, stats[v], stats.get(stable) if stable else None, stable)
        if breach is not None:
            out.append(breach)
    if shadow is not None and rules.min_shadow_agreement is not None:
        version, s = shadow
        greedy = s.agreements()
        agree = s.agreement
        if version not in exempt and len(greedy) >= rules.min_shadow_samples and agree is not None \
                and agree < rules.min_shadow_agreement and version not in {b.version for b in out}:
            out.append(Breach(version, "shadow_agreement", {
                "agreement": round(agree, 4), "threshold": rules.min_shadow_agreement, "pairs": len(greedy),
                "first_32_match_rate": round(s.first_match_rate or 0.0, 4)}))
    return out


def _canary(rules: RollbackRules, version: str, s: VersionStats, base: VersionStats | None,
            stable: str | None) -> Breach | None:
    n = s.window_requests
    if n < rules.min_requests:
        return None
    rate = s.error_rate or 0.0
    if rules.max_error_rate is not None and rate > rules.max_error_rate:
        return Breach(version, "error_rate", {"error_rate": round(rate, 4), "threshold": rules.max_error_rate,
                                              "requests": n, "errors": sum(not o.ok for o in s.recent)})
    if rules.max_ttft_p95_ratio is None or base is None or base.window_requests < rules.min_requests:
        return None
    mine, theirs = percentile(s.ttfts(), 95, empty=None), percentile(base.ttfts(), 95, empty=None)
    if mine is None or theirs is None:
        return None
    if mine > rules.max_ttft_p95_ratio * theirs and mine - theirs > rules.min_ttft_delta_s:
        return Breach(version, "ttft_p95_ratio", {
            "ttft_p95_s": round(mine, 4), "stable_ttft_p95_s": round(theirs, 4), "stable": stable,
            "ratio": round(mine / theirs, 3) if theirs > 0 else float("inf"),
            "threshold": rules.max_ttft_p95_ratio, "requests": n})
    return None
