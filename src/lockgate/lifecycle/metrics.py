"""/metrics for model versions, read from the registry at scrape time; and the server-wide
engine state (the `lockgate:num_requests_running`-style gauges) summed over every version.

Labels are `model_name` and `version`: both set by the operator (at most MAX_MODELS x
MAX_VERSIONS pairs, and an unloaded version's series go with it), never by a client.
"""
from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from lockgate.engine.frontend.supervisor import EngineState
from lockgate.gateway.model_router import RouterSet
from lockgate.lifecycle.registry import ModelRegistry
from lockgate.lifecycle.stats import LATENCY_BUCKETS
from lockgate.lifecycle.version import State

LABELS = ["model_name", "version"]


def engine_state(registry: ModelRegistry) -> EngineState:
    """One `EngineState` for the whole server: every version's fleet summed, healthy as /health says."""
    return EngineState.combine([v.fleet.state() for v in registry.versions()], registry.healthy)


class VersionCollector(Collector):
    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self.rollbacks: dict[tuple[str, str, str], int] = {}  # (model, version, rule) -> count
        registry.on_rollback.append(self._count_rollback)

    def _count_rollback(self, model: str, version: str, rule: str) -> None:
        key = (model, version, rule)
        self.rollbacks[key] = self.rollbacks.get(key, 0) + 1

    def collect(self) -> Iterable[Metric]:
        state = GaugeMetricFamily("lockgate:model_version_state", "1 for the version's life-cycle state "
                                  "(loading, warming, ready, draining, failed).", labels=[*LABELS, "state"])
        share = GaugeMetricFamily("lockgate:model_version_traffic_share",
                                  "Configured share of the model's traffic (0-1).", labels=LABELS)
        healthy = GaugeMetricFamily("lockgate:model_version_healthy", "1 while the version can take requests.",
                                    labels=LABELS)
        load = GaugeMetricFamily("lockgate:model_version_load_seconds", "Loading, warm-up and gate time.",
                                 labels=LABELS)
        inflight = GaugeMetricFamily("lockgate:model_version_requests_in_flight", "Requests routed to the version.",
                                     labels=LABELS)
        requests = CounterMetricFamily("lockgate:model_version_requests", "Requests served by the version, by "
                                       "outcome (engine side; shadows excluded).", labels=[*LABELS, "outcome"])
        ttft = HistogramMetricFamily("lockgate:model_version_time_to_first_token_seconds",
                                     "Submission to first token, per version.", labels=LABELS)
        sh_req = CounterMetricFamily("lockgate:shadow_requests", "Shadow requests by outcome (dropped: not sent, "
                                     "the shadow was saturated or not ready).", labels=[*LABELS, "outcome"])
        sh_agree = GaugeMetricFamily("lockgate:shadow_token_agreement", "Greedy token agreement of the shadow "
                                     "version with the primary (window; NaN: no greedy pair yet).", labels=LABELS)
        sh_first = GaugeMetricFamily("lockgate:shadow_first_32_match_ratio", "Greedy pairs whose first 32 tokens "
                                     "match (window).", labels=LABELS)
        rolls = CounterMetricFamily("lockgate:model_rollbacks", "Automatic rollbacks by rule.",
                                    labels=[*LABELS, "rule"])
        for model in self.registry.models.values():
            for name, v in model.versions.items():
                lbl = [model.name, name]
                for s in State:
                    state.add_metric([*lbl, str(s)], 1.0 if v.state is s else 0.0)
                share.add_metric(lbl, model.share(name))
                healthy.add_metric(lbl, 1.0 if v.available else 0.0)
                load.add_metric(lbl, v.load_seconds if v.load_seconds is not None else float("nan"))
                inflight.add_metric(lbl, v.users)
                requests.add_metric([*lbl, "ok"], v.stats.total - v.stats.errors)
                requests.add_metric([*lbl, "error"], v.stats.errors)
                h = v.stats.ttft_hist
                ttft.add_metric(lbl, [(floatToGoString(b), n) for b, n in h.cumulative(LATENCY_BUCKETS)],
                                sum_value=h.sum)
            for name, s in model.shadow_stats.items():
                if name not in model.versions:
                    continue
                lbl = [model.name, name]
                for outcome, n in (("completed", s.completed), ("error", s.errors), ("dropped", s.dropped)):
                    sh_req.add_metric([*lbl, outcome], n)
                agree, first = s.agreement, s.first_match_rate
                sh_agree.add_metric(lbl, float("nan") if agree is None else agree)
                sh_first.add_metric(lbl, float("nan") if first is None else first)
        for (m, v, rule), n in list(self.rollbacks.items()):
            if v not in getattr(self.registry.models.get(m), "versions", {}):
                del self.rollbacks[(m, v, rule)]  # unloaded: its series go (bounded labels)
                continue
            rolls.add_metric([m, v, rule], n)
        yield from (state, share, healthy, load, inflight, requests, ttft, sh_req, sh_agree, sh_first, rolls)


class RouterCollector(Collector):
    """`lockgate:router_requests_total{router, rule, model}`: requests each router model's rules sent
    to each model (labels from the config, never from a client: bounded)."""

    def __init__(self, routers: RouterSet) -> None:
        self.routers = routers

    def collect(self) -> Iterable[Metric]:
        hits = CounterMetricFamily("lockgate:router_requests", "Requests a router model routed, by rule "
                                   "('default' for its default) and chosen model.", labels=["router", "rule", "model"])
        for router in self.routers.routers.values():
            for (rule, model), n in list(router.hits.items()):
                hits.add_metric([router.name, rule, model], n)
        yield hits
