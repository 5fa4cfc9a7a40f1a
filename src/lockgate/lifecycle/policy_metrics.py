"""/metrics for the gateway's policies, read from the registry at scrape time: circuit breakers
(breaker.py; each version's, `replica` label empty, and each replica's), fallbacks taken
(fallback.py) and hedged requests (hedge.py)."""
from __future__ import annotations

from collections.abc import Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lockgate.lifecycle.breaker import STATE_VALUES, CircuitBreaker
from lockgate.lifecycle.registry import ModelRegistry

LABELS = ["model_name", "version", "replica"]


class PolicyCollector(Collector):
    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterable[Metric]:
        state = GaugeMetricFamily("lockgate:circuit_breaker_state", "1 for the breaker's state (closed, open, "
                                  "half_open); replica empty: the version's own breaker.", labels=[*LABELS, "state"])
        moves = CounterMetricFamily("lockgate:circuit_breaker_transitions", "State changes of the breaker.",
                                    labels=LABELS)

        def add(lbl: list[str], b: CircuitBreaker) -> None:
            for s in STATE_VALUES:
                state.add_metric([*lbl, s], 1.0 if b.state == s else 0.0)
            moves.add_metric(lbl, b.transitions)

        for model in self.registry.models.values():
            for name, v in model.versions.items():
                add([model.name, name, ""], v.breaker)
                for r in list(v.fleet.replicas.values()):
                    add([model.name, name, str(r.index)], r.breaker)
        yield state
        yield moves
        taken = CounterMetricFamily("lockgate:fallbacks", "Requests moved from a model to its fallback, by why "
                                    "(the first model's error code).", labels=["model_name", "to", "reason"])
        for (source, dest, code), n in list(self.registry.fallbacks_taken.items()):
            taken.add_metric([source, dest, code], n)
        yield taken
        h = self.registry.hedger
        hedges = CounterMetricFamily("lockgate:hedged_requests", "Hedge copies: sent, won (answered first), "
                                     "skipped (wanted, but the budget or no other replica said no).",
                                     labels=["outcome"])
        for outcome, n in (("sent", h.sent), ("won", h.won), ("skipped", h.skipped)):
            hedges.add_metric([outcome], n)
        yield hedges
