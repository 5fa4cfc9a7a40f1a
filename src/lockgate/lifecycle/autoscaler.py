"""The autoscaler of one version: a sample of the fleet in, a `Decision` (count, mode, reason, figures) out.

Pure given its samples: no clock of its own (`sample.t` is the time), no I/O, so the
live fleet's loop (`autoscale_loop.py`), the simulator (`autoscale_sim.py`) and the
capacity planner run the same code. The policy (`config.policy`) proposes a count with
its reason (`autoscale_policies.py`); this class applies what holds for every policy:

- at most `max_scale_up_rate`x up and `1/max_scale_down_rate` down per decision (the HPA
  policy uses Kubernetes' own rate rules instead);
- the bounds `[min_replicas, max_replicas]`, read from `self.config` at every decision
  (the fleet replaces them on PATCH);
- the activator: at zero replicas with held requests, at least one replica at once.
"""
from __future__ import annotations

import math

from lockgate.lifecycle.autoscale_policies import Policy, Proposal, make_policy
from lockgate.lifecycle.autoscale_types import AutoscaleConfig, Decision, FleetSample


class Autoscaler:
    def __init__(self, config: AutoscaleConfig) -> None:
        self.config = config
        self.last: Decision | None = None
        self._policy: Policy = make_policy(config.policy)
        self._policy_name = config.policy
        self._last_scale_t: float | None = None  # last scale event (applied or decided)

    def note_scaled(self, t: float) -> None:
        """The fleet applied a scale event at `t`: the scale-down cooldown counts from here."""
        self._last_scale_t = t if self._last_scale_t is None else max(self._last_scale_t, t)

    def decide(self, sample: FleetSample) -> Decision:
        cfg = self.config
        if cfg.policy != self._policy_name:  # changed on the fly: a new policy starts with no history
            self._policy, self._policy_name = make_policy(cfg.policy), cfg.policy
        current = sample.ready + sample.starting
        prop: Proposal = self._policy.propose(sample, cfg, self._last_scale_t)
        desired, reason = prop.desired, prop.reason
        figures = dict(prop.figures)
        if prop.rate_limited_by_config:
            up = math.ceil(cfg.max_scale_up_rate * max(current, 1))
            down = math.floor(current / cfg.max_scale_down_rate)
            if desired > up:
                reason += f"; limited to {up} ({cfg.max_scale_up_rate:g}x per decision)"
                desired = up
            elif desired < down:
                reason += f"; limited to {down} (at most /{cfg.max_scale_down_rate:g} per decision)"
                desired = down
        lo, hi = cfg.min_replicas, cfg.max_replicas
        if desired > hi:
            reason += f"; capped at max_replicas {hi}"
            desired = hi
        elif desired < lo:
            reason += f"; raised to min_replicas {lo}"
            desired = lo
        if current == 0 and sample.held > 0 and hi >= 1:  # the activator: no window, no cooldown
            desired = max(desired, 1)
            reason = f"activator: {sample.held} requests held at zero replicas; {reason}"
        figures.update(current=current, ready=sample.ready, starting=sample.starting,
                       in_flight=sample.in_flight, held=sample.held, kv_usage=round(sample.kv_usage, 4),
                       min_replicas=lo, max_replicas=hi)
        decision = Decision(sample.t, current, desired, prop.mode, reason, figures)
        if decision.changed:
            self.note_scaled(sample.t)
        self.last = decision
        return decision
