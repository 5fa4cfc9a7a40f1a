"""/metrics of the autoscalers, read from every autoscaled version at scrape time.

Labels are `model_name` and `version` (set by the operator), plus `direction`/`mode` on
the scale-event counter and `replica` on the cold-start gauge (bounded as the replica
metrics are: at most MAX_REPLICAS per version).
"""
from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lockgate.lifecycle.registry import ModelRegistry

LABELS = ["model_name", "version"]


class AutoscaleCollector(Collector):
    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterable[Metric]:
        def gauge(name: str, doc: str, extra: list[str] | None = None) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=[*LABELS, *(extra or [])])

        desired = gauge("lockgate:autoscale_desired_replicas", "Replicas the autoscaler wants (its last decision).")
        ready = gauge("lockgate:autoscale_ready_replicas", "Replicas taking requests.")
        starting = gauge("lockgate:autoscale_starting_replicas", "Replicas decided and still loading.")
        bounds = gauge("lockgate:autoscale_replica_bounds", "The autoscaler's bounds.", ["bound"])
        held = gauge("lockgate:autoscale_held_requests", "Requests waiting for a replica at zero (the activator).")
        panic = gauge("lockgate:autoscale_panic", "1 while the last decision was taken in panic mode.")
        events = CounterMetricFamily("lockgate:autoscale_scale_events", "Applied scale decisions.",
                                     labels=[*LABELS, "direction", "mode"])
        cold = gauge("lockgate:replica_cold_start_seconds", "Decision to ready of the replica (process start, "
                     "weight load, warm-up).", ["replica"])
        for model in self.registry.models.values():
            for name, v in model.versions.items():
                lbl = [model.name, name]
                f = v.fleet
                for r in list(f.replicas.values()):
                    if r.cold_start_s is not None:
                        cold.add_metric([*lbl, str(r.index)], r.cold_start_s)
                loop = v.autoscaler
                if loop is None:
                    continue
                c = loop.autoscaler.config
                last = f.last_evaluation
                desired.add_metric(lbl, last.desired if last is not None else f.configured)
                ready.add_metric(lbl, f.num_ready)
                starting.add_metric(lbl, f.num_starting)
                bounds.add_metric([*lbl, "min"], c.min_replicas)
                bounds.add_metric([*lbl, "max"], c.max_replicas)
                held.add_metric(lbl, f.held)
                panic.add_metric(lbl, 1.0 if last is not None and last.mode == "panic" else 0.0)
                for (direction, mode), n in list(loop.events.counts.items()):
                    events.add_metric([*lbl, direction, mode], n)
        yield from (desired, ready, starting, bounds, held, panic, events, cold)
