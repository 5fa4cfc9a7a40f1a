"""/metrics per replica, read from every version's fleet at scrape time.

Labels are `model_name`, `version` and `replica` (the index; the operator sets how many,
at most MAX_REPLICAS per version, and a removed replica's series go with it). The load
gauges are also exported under vLLM's names (`vllm:num_requests_running`,
`vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc`), which endpoint pickers written
for vLLM (the Gateway API inference extension's) read.
"""
from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lockgate.lifecycle.registry import ModelRegistry
from lockgate.lifecycle.replica import ReplicaState

LABELS = ["model_name", "version", "replica"]
REASONS = ("prefix", "load", "miss")


class ReplicaCollector(Collector):
    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterable[Metric]:
        def gauge(name: str, doc: str, extra: list[str] | None = None) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=[*LABELS, *(extra or [])])

        up = gauge("lockgate:replica_up", "1 while the replica takes requests (ready, core up, not silent).")
        state = gauge("lockgate:replica_state", "1 for the replica's state.", ["state"])
        running = gauge("lockgate:replica_num_requests_running", "Requests in the replica's batch.")
        waiting = gauge("lockgate:replica_num_requests_waiting", "Requests waiting in the replica's scheduler.")
        queued = gauge("lockgate:replica_queued_prompt_tokens", "Prompt tokens routed to the replica and not "
                       "started yet (the router's count).")
        kv = gauge("lockgate:replica_kv_cache_usage_perc", "Fraction of the replica's KV blocks in use.")
        cached = gauge("lockgate:replica_cached_blocks", "Blocks the router's index holds for the replica.")
        hit = gauge("lockgate:replica_prefix_cache_hit_rate", "Prompt tokens served from the replica's prefix "
                    "cache over prompt tokens looked up (NaN before any).")
        restarts = CounterMetricFamily("lockgate:replica_restarts", "Restarts of the replica's engine core.",
                                       labels=LABELS)
        routed = CounterMetricFamily("lockgate:replica_requests_routed", "Requests routed to the replica, by why: "
                                     "prefix (its cached prefix won), load (another had the prefix, this one "
                                     "was less loaded), miss (no replica had a prefix that decides).",
                                     labels=[*LABELS, "reason"])
        v_running = gauge("vllm:num_requests_running", "Requests in the replica's batch (vLLM's name).")
        v_waiting = gauge("vllm:num_requests_waiting", "Requests waiting in the replica (vLLM's name).")
        v_kv = gauge("vllm:kv_cache_usage_perc", "KV-cache usage of the replica, 0-1 (vLLM's name).")
        for model in self.registry.models.values():
            for name, v in model.versions.items():
                for r in list(v.fleet.replicas.values()):
                    lbl = [model.name, name, str(r.index)]
                    s = r.client.core_stats
                    view = v.fleet.router.replica_view(r.index) if r.index in v.fleet.router.replicas else {}
                    up.add_metric(lbl, 1.0 if r.up and not r.stale else 0.0)
                    for st in ReplicaState:
                        state.add_metric([*lbl, str(st)], 1.0 if r.state is st else 0.0)
                    for fam, value in ((running, s.num_running), (v_running, s.num_running),
                                       (waiting, s.num_waiting), (v_waiting, s.num_waiting),
                                       (kv, s.kv_cache_usage), (v_kv, s.kv_cache_usage)):
                        fam.add_metric(lbl, value)
                    queued.add_metric(lbl, view.get("queued_tokens", 0))
                    cached.add_metric(lbl, view.get("cached_blocks", 0))
                    state_all = r.client.state()
                    hit.add_metric(lbl, state_all.prefix_cache_hits / state_all.prefix_cache_queries
                                   if state_all.prefix_cache_queries else float("nan"))
                    restarts.add_metric(lbl, r.client.num_restarts)
                    counts = view.get("routed", {})
                    for reason in REASONS:
                        routed.add_metric([*lbl, reason], counts.get(reason, 0))
        yield from (up, state, running, waiting, queued, kv, cached, hit, restarts, routed,
                    v_running, v_waiting, v_kv)
