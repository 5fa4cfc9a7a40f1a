"""The autoscaler's policies: each turns a fleet sample (and its own history) into a proposed count.

- `fixed`: always `max_replicas`.
- `hpa`: Kubernetes' HorizontalPodAutoscaler with its default parameters, on in-flight
  requests per replica as the utilization metric (see `HpaPolicy`).
- `lockgate`: the SLO-aware policy (see `LockgatePolicy`): needed replicas from each
  signal (in-flight, KV usage, each class's predicted wait against its TTFT target),
  a stable and a panic window as Knative's, scale-down on the stable window's maximum
  after a cooldown, scale to zero only after a whole idle stable window.

`Autoscaler` (autoscaler.py) applies the per-decision rate limits (unless the policy
has its own), the bounds and the activator to what a policy proposes.
"""
from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from lockgate.lifecycle.autoscale_types import AutoscaleConfig, FleetSample

# Kubernetes HPA defaults (kube-controller-manager flags and the autoscaling/v2 default behavior).
HPA_SYNC_PERIOD_S = 15.0  # --horizontal-pod-autoscaler-sync-period
HPA_TOLERANCE = 0.1  # --horizontal-pod-autoscaler-tolerance (AutoscaleConfig.hpa_tolerance)
HPA_DOWN_STABILIZATION_S = 300.0  # behavior.scaleDown.stabilizationWindowSeconds
HPA_UP_PERCENT = 100.0  # behavior.scaleUp.policies: 100% per 15 s ...
HPA_UP_PODS = 4  # ... or 4 pods per 15 s, whichever is more (selectPolicy: Max)
HPA_POLICY_PERIOD_S = 15.0
HPA_MIN_REPLICAS = 1  # an HPA cannot scale a workload to zero (without the alpha HPAScaleToZero gate)

# The lockgate policy: a class's wait counts at most this many times its threshold ("hopeless" is
# enough to act on; an estimate of an hour would otherwise ask for hundreds of replicas).
MAX_WAIT_RATIO = 8.0



@dataclass(slots=True)
class Proposal:
    desired: int
    mode: Literal["stable", "panic"]
    reason: str
    figures: dict[str, Any] = field(default_factory=dict)
    rate_limited_by_config: bool = True  # False: the policy applied its own rate rules


class Policy(Protocol):
    def propose(self, sample: FleetSample, cfg: AutoscaleConfig, last_scale_t: float | None) -> Proposal: ...


def make_policy(name: str) -> Policy:
    if name == "lockgate":
        return LockgatePolicy()
    if name == "hpa":
        return HpaPolicy()
    if name == "fixed":
        return FixedPolicy()
    raise ValueError(f"unknown autoscale policy {name!r} (one of lockgate, hpa, fixed)")


class FixedPolicy:
    def propose(self, sample: FleetSample, cfg: AutoscaleConfig, last_scale_t: float | None) -> Proposal:
        return Proposal(cfg.max_replicas, "stable", f"fixed: always max_replicas {cfg.max_replicas}")


# ---- HPA ------------------------------------------------------------------------------------------


class HpaPolicy:
    """Kubernetes' HPA algorithm with its defaults, the metric being in-flight requests per ready
    replica over `target_in_flight` (utilization), aimed at `hpa_target_utilization`:

    - every 15 s (sync period): desired = ceil(in-flight / (target_in_flight x target utilization)),
      unless the usage ratio is within the 10% tolerance of 1 (then no change);
    - scale-up: at most max(+100%, +4 pods) per 15 s, no stabilization;
    - scale-down: the highest recommendation of the last 300 s (stabilization window), at most
      -100% per 15 s;
    - never below 1 replica."""

    def __init__(self) -> None:
        self._last_sync: float | None = None
        self._recs: deque[tuple[float, int]] = deque()  # (t, recommendation) for the down stabilization
        self._held: int | None = None  # the last synced desired count, kept between syncs

    def propose(self, sample: FleetSample, cfg: AutoscaleConfig, last_scale_t: float | None) -> Proposal:
        t, current = sample.t, sample.ready + sample.starting
        floor = max(HPA_MIN_REPLICAS, cfg.min_replicas)
        if self._last_sync is not None and t - self._last_sync < HPA_SYNC_PERIOD_S and self._held is not None:
            return Proposal(self._held, "stable", f"hpa: between syncs (every {HPA_SYNC_PERIOD_S:g} s)",
                            {"policy": "hpa"}, rate_limited_by_config=False)
        if self._last_sync is None and current > 0:
            # A fleet that was serving before this controller started: its count stands as the
            # stabilization window's history (no scale-down on an empty first sample).
            self._recs.append((t, current))
        self._last_sync = t
        target = cfg.target_in_flight * cfg.hpa_target_utilization
        ready = max(sample.ready, 1)
        ratio = sample.in_flight / (ready * target)
        figures: dict[str, Any] = {"policy": "hpa", "usage_ratio": round(ratio, 3),
                                   "target_in_flight_per_replica": round(target, 3)}
        if current == 0:
            rec = floor
            why = f"hpa: at zero, back to {floor} (an HPA cannot stay at zero)"
        elif abs(ratio - 1.0) <= cfg.hpa_tolerance:
            rec = current
            why = f"hpa: usage ratio {ratio:.2f} within tolerance {cfg.hpa_tolerance:g}"
        else:
            # Not-ready (starting) replicas count as idle on scale-up, as Kubernetes does: the count
            # follows the whole in-flight load, whatever is already on its way.
            rec = max(math.ceil(sample.in_flight / target - 1e-9), 0)
            why = (f"hpa: {sample.in_flight} in flight over {sample.ready} ready, usage ratio {ratio:.2f} "
                   f"(target {target:g} per replica)")
        self._recs.append((t, rec))
        while self._recs and self._recs[0][0] < t - HPA_DOWN_STABILIZATION_S:
            self._recs.popleft()
        desired = rec
        if rec < current:
            stabilized = max(r for _, r in self._recs)
            if stabilized > rec:
                why += f"; held at {min(stabilized, current)} by the {HPA_DOWN_STABILIZATION_S:g} s stabilization"
            desired = min(stabilized, current)
        up_limit = max(math.ceil(current * (1 + HPA_UP_PERCENT / 100)), current + HPA_UP_PODS)
        if desired > up_limit:
            why += f"; limited to {up_limit} (max(+100%, +{HPA_UP_PODS}) per {HPA_POLICY_PERIOD_S:g} s)"
            desired = up_limit
        if desired < floor:
            desired = floor
        figures["recommendation"] = rec
        self._held = desired
        return Proposal(desired, "stable", why, figures, rate_limited_by_config=False)


# ---- lockgate ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Needs:
    """One sample's signals as replicas needed (continuous: 2.4 means 2.4 replicas' worth)."""

    t: float
    in_flight: float  # (in flight + held) / target_in_flight
    kv: float  # ready x kv_usage / target_kv_usage
    shed: float  # ready x asked / admitted since the last sample (0: nothing refused): demand admission turned away
    wait: float  # ready x (worst class's wait / its threshold); 0 when nothing waits
    wait_ratio: float  # worst class's predicted wait over wait_fraction x its TTFT target
    wait_class: str
    busy: bool  # anything in flight or held

    @property
    def load(self) -> float:  # Knative's concurrency signal (in-flight), KV, and the demand shed at admission
        return max(self.in_flight, self.kv, self.shed)

    @property
    def need(self) -> float:
        return max(self.in_flight, self.kv, self.shed, self.wait)


class LockgatePolicy:
    """The SLO-aware policy.

    Each sample becomes replicas needed per signal: in-flight (and held) over `target_in_flight`,
    KV usage over `target_kv_usage`, and for the class whose predicted wait is furthest past
    `wait_fraction` of its TTFT target, ready x wait / threshold (the wait falls about as
    1/replicas; only a class with requests queued counts, at most `MAX_WAIT_RATIO`). Then:

    - panic when the panic window's mean in-flight/KV need reaches `panic_threshold` x the ready
      replicas, or a class's wait stays at `panic_threshold` x its threshold over the whole panic
      window; it lasts until a stable window passes without the trigger. In panic the count follows
      the panic window (plus `scale_up_headroom`) and never goes down;
    - stable, up: when the stable window's mean need, the panic window's need once it is clearly
      above the count (by the headroom), or a wait held over its threshold for the panic window
      asks for more than the count; to that need plus `scale_up_headroom` (fewer, larger steps);
    - stable, down: only to the stable window's maximum in-flight/KV need plus the headroom (not
      its mean: a noisy load does not flap), only when no class's wait passed
      `down_wait_ratio` x its threshold in that window, a whole window after the start, and
      `scale_down_cooldown_s` after the last scale event; `Autoscaler` halves at most;
    - to zero (min_replicas 0) only after a whole stable window with nothing in flight or held.

    While replicas are starting, the wait need cannot ask for more than is already coming: the
    queue keeps growing until they are ready, and chasing it would overshoot.
    """

    def __init__(self) -> None:
        self._hist: deque[_Needs] = deque()
        self._first_t: float | None = None
        self._last_trigger: float | None = None  # the panic trigger's last time seen

    def _needs(self, s: FleetSample, cfg: AutoscaleConfig) -> _Needs:
        in_flight = (s.in_flight + s.held) / cfg.target_in_flight
        kv = s.ready * s.kv_usage / cfg.target_kv_usage if s.ready else 0.0
        ratio, name = 0.0, ""
        for c in s.classes:
            if c.ttft_target_s > 0 and c.predicted_wait_s > 0 and c.queued > 0:  # a wait only counts if someone waits
                r = min(c.predicted_wait_s / (cfg.wait_fraction * c.ttft_target_s), MAX_WAIT_RATIO)
                if r > ratio:
                    ratio, name = r, c.name
        wait = s.ready * ratio if s.ready else 0.0
        if s.starting > 0:  # the queue grows until they are ready: ask for no more than is coming
            wait = min(wait, s.ready + s.starting)
        # Shed demand never queues, so neither the wait nor the in-flight count shows it: a fleet that
        # refuses half of what comes needs twice its replicas (at most the rate limit's 2x at once).
        shed = 0.0
        if s.refused > 0 and s.ready > 0:
            admitted = s.arrived - s.refused
            shed = s.ready * (s.arrived / admitted if admitted > 0 else cfg.max_scale_up_rate)
        return _Needs(s.t, in_flight, kv, shed, wait, ratio, name, s.in_flight + s.held > 0)

    def propose(self, sample: FleetSample, cfg: AutoscaleConfig, last_scale_t: float | None) -> Proposal:
        t = sample.t
        ready, current = sample.ready, sample.ready + sample.starting
        now = self._needs(sample, cfg)
        if self._first_t is None:
            self._first_t = t
        self._hist.append(now)
        while self._hist and self._hist[0].t <= t - cfg.stable_window_s:
            self._hist.popleft()
        stable = list(self._hist)
        panic_w = [n for n in stable if n.t > t - cfg.panic_window_s] or [now]
        stable_load = sum(n.load for n in stable) / len(stable)
        panic_load = sum(n.load for n in panic_w) / len(panic_w)
        # The wait counts when it held over the whole panic window (its minimum): an estimator's
        # one-off spike (a drain rate measured over a few departures) is not a burst.
        panic_wait_ratio = min(n.wait_ratio for n in panic_w)
        panic_wait = min(n.wait for n in panic_w)
        max_load = max(n.load for n in stable)
        max_wait_ratio = max(n.wait_ratio for n in stable)
        full_window = t - self._first_t >= cfg.stable_window_s

        trigger = panic_load >= cfg.panic_threshold * max(ready, 1) or panic_wait_ratio >= cfg.panic_threshold
        if trigger:
            self._last_trigger = t
        in_panic = self._last_trigger is not None and t - self._last_trigger < cfg.stable_window_s
        cooldown_left = 0.0 if last_scale_t is None else max(0.0, cfg.scale_down_cooldown_s - (t - last_scale_t))
        figures: dict[str, Any] = {
            "policy": "lockgate", "need_in_flight": round(now.in_flight, 3), "need_kv": round(now.kv, 3),
            "need_wait": round(now.wait, 3), "need_shed": round(now.shed, 3), "stable_load": round(stable_load, 3),
            "panic_load": round(panic_load, 3), "panic_wait_ratio": round(panic_wait_ratio, 3),
            "stable_max_load": round(max_load, 3), "stable_max_wait_ratio": round(max_wait_ratio, 3),
            "cooldown_left_s": round(cooldown_left, 1),
            "waits": {c.name: round(c.predicted_wait_s, 4) for c in sample.classes},
        }
        wait_why = ""
        if now.wait_class:
            cls = next(c for c in sample.classes if c.name == now.wait_class)
            thr = cfg.wait_fraction * cls.ttft_target_s
            wait_why = (f"{cls.name} predicted wait {cls.predicted_wait_s:.2f} s "
                        f"{'>' if cls.predicted_wait_s > thr else '<='} {thr:.2f} s "
                        f"({cfg.wait_fraction:.0%} of {cls.ttft_target_s:g} s)")
        load_why = (f"{sample.in_flight + sample.held} in flight (needs {now.in_flight:.1f} replicas at "
                    f"{cfg.target_in_flight:g} each), KV {sample.kv_usage:.0%}")
        if sample.refused:
            load_why += f", {sample.refused} of {sample.arrived} refused at admission"

        if in_panic:
            need = max(panic_load, panic_wait)
            up = math.ceil(need * (1 + cfg.scale_up_headroom) - 1e-9) if need > current else current
            desired = max(up, current)
            load_part = f"panic-window load {panic_load:.1f} replicas' worth ({ready} ready)"
            main = wait_why if wait_why and panic_wait >= panic_load else load_part
            why = (f"panic (until {cfg.stable_window_s:g} s without the trigger): {main}"
                   + ("" if desired > current else f"; holding {current}"))
            return Proposal(desired, "panic", why, figures)

        # Up on the higher of the windows' loads: a rising load is seen within the panic window,
        # not after a minute (down only on the stable window's maximum, so noise cannot flap).
        # The panic window counts only when it is clearly above the count (by the headroom): six
        # seconds of Poisson noise around a steady load must not add a replica.
        load = max(stable_load, panic_load if panic_load > current * (1 + cfg.scale_up_headroom) else 0.0)
        need = max(load, panic_wait if panic_wait_ratio > 1.0 else 0.0)
        if need > current:
            up = math.ceil(need * (1 + cfg.scale_up_headroom) - 1e-9)
            why = f"scale up: {wait_why}" if need > load and wait_why else \
                f"scale up: load {load:.1f} replicas' worth ({'panic' if panic_load > stable_load else 'stable'} " \
                f"window); {load_why}"
            return Proposal(up, "stable", why, figures)
        # Scale down: the in-flight and KV needs low over the whole window (its maximum), no class's
        # wait near its threshold in it (the wait does not fall linearly with fewer replicas: a guard,
        # not a count), the cooldown over.
        down = math.ceil(max_load * (1 + cfg.scale_up_headroom) - 1e-9)  # keep the headroom a scale-up adds
        if cfg.min_replicas == 0 and full_window and not any(n.busy for n in stable):
            down = 0
        elif down == 0:
            down = 1  # not idle for a whole window yet: keep one replica
        if down >= current:
            return Proposal(current, "stable", f"steady at {current}: stable-window max load {max_load:.1f}; "
                            f"{load_why}", figures)
        if not full_window:  # the window's maximum means nothing before a whole window was seen
            return Proposal(current, "stable", f"would scale down to {down}: waiting for a whole "
                            f"{cfg.stable_window_s:g} s stable window", figures)
        if max_wait_ratio > cfg.down_wait_ratio:
            return Proposal(current, "stable", f"would scale down to {down}: a class's predicted wait reached "
                            f"{max_wait_ratio:.0%} of its threshold in the stable window", figures)
        if cooldown_left > 0:
            return Proposal(current, "stable", f"would scale down to {down} (stable-window max load "
                            f"{max_load:.1f}), cooldown {cooldown_left:.0f} s left", figures)
        why = ("scale to zero: nothing in flight or held for a whole stable window" if down == 0 else
               f"scale down: stable-window max load {max_load:.1f} < {current} replicas")
        return Proposal(down, "stable", why, figures)
