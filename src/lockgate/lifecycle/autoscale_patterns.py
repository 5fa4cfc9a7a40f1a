"""Request traces for the autoscaler's simulator: generated load patterns, or a `lockgate bench` run's
records.jsonl replayed.

A trace is a list of `SimRequest`s (arrival time, prompt and output lengths, engine priority =
the SLO class's rank). Patterns are Poisson arrivals of a time-varying rate (thinning), seeded:

- `diurnal`: a compressed day: low at the start and end, a smooth peak in the middle;
- `burst`: a steady base with sudden bursts at several times the base rate;
- `ramp`: a linear climb from a low rate to the peak, then a plateau.

Request sizes and the class mix are the `Workload`'s (defaults: 50% interactive, 30% standard,
20% batch; prompts of 64..512 tokens, outputs of 16..64).
"""
from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lockgate.engine.sim import SimRequest
from lockgate.gateway.classes import ClassTable

PATTERNS: tuple[str, ...] = ("diurnal", "burst", "ramp")
MAX_TRACE_REQUESTS = 2_000_000  # a guard against a rate typo (1e9)
BURST_RISE_S = 30.0  # a burst's climb from the base to the peak (and its fall)
BURST_TOP_S = 60.0  # its time at the peak


@dataclass(slots=True)
class Workload:
    mix: tuple[tuple[str, float], ...] = (("interactive", 0.5), ("standard", 0.3), ("batch", 0.2))
    prompt_len: tuple[int, int] = (64, 512)  # uniform, inclusive
    output_len: tuple[int, int] = (16, 64)

    def request(self, rid: str, t: float, classes: ClassTable, rng: random.Random) -> SimRequest:
        names, weights = zip(*self.mix)
        cls = classes.get(rng.choices(names, weights)[0]) or classes.default
        return SimRequest(rid, tenant=cls.name, priority=cls.rank, prompt_len=rng.randint(*self.prompt_len),
                          output_len=rng.randint(*self.output_len), arrival_s=t)


def rate_fn(pattern: str, peak_qps: float, duration_s: float) -> Callable[[float], float]:
    """The pattern's arrival rate (requests/s) at time t in [0, duration_s)."""
    d = duration_s
    if pattern == "diurnal":  # 10% of the peak at night, a cosine day between
        return lambda t: peak_qps * (0.1 + 0.9 * 0.5 * (1 - math.cos(2 * math.pi * t / d)))
    if pattern == "burst":  # a base of 35% of the peak; 3 bursts to the peak (2.9x): 30 s up, 60 s on top, 30 s down
        starts = [0.15 * d, 0.45 * d, 0.75 * d]
        base = 0.35 * peak_qps

        def burst(t: float) -> float:
            x = max((min(t - s, BURST_TOP_S + 2 * BURST_RISE_S - (t - s)) for s in starts
                     if s <= t < s + BURST_TOP_S + 2 * BURST_RISE_S), default=0.0)
            return base + (peak_qps - base) * min(1.0, x / BURST_RISE_S)

        return burst
    if pattern == "ramp":  # 10% to the peak over the first 70%, then the peak
        return lambda t: peak_qps * (0.1 + 0.9 * min(1.0, t / (0.7 * d)))
    raise ValueError(f"unknown pattern {pattern!r} (one of {', '.join(PATTERNS)})")


def generate(pattern: str, peak_qps: float, duration_s: float, seed: int = 0,
             classes: ClassTable | None = None, workload: Workload | None = None) -> list[SimRequest]:
    """Poisson arrivals of the pattern's rate, by thinning a process at the peak rate."""
    if not (math.isfinite(peak_qps) and peak_qps > 0):
        raise ValueError(f"peak rate must be a positive number, got {peak_qps}")
    if not (math.isfinite(duration_s) and duration_s > 0):
        raise ValueError(f"duration must be a positive number of seconds, got {duration_s}")
    if peak_qps * duration_s > MAX_TRACE_REQUESTS:
        raise ValueError(f"{peak_qps:g} req/s for {duration_s:g} s is more than {MAX_TRACE_REQUESTS} requests")
    rate = rate_fn(pattern, peak_qps, duration_s)
    classes, workload = classes or ClassTable(), workload or Workload()
    rng = random.Random(seed)
    out: list[SimRequest] = []
    t = 0.0
    while True:
        t += rng.expovariate(peak_qps)
        if t >= duration_s:
            return out
        if rng.random() * peak_qps <= rate(t):
            out.append(workload.request(f"r{len(out)}", t, classes, rng))


def constant(rate: float, duration_s: float, seed: int = 0, classes: ClassTable | None = None,
             workload: Workload | None = None) -> list[SimRequest]:
    """Poisson arrivals at a constant rate (the capacity planner's probes)."""
    classes, workload = classes or ClassTable(), workload or Workload()
    if not (math.isfinite(rate) and rate > 0) or rate * duration_s > MAX_TRACE_REQUESTS:
        raise ValueError(f"rate must be a positive number of requests/s, got {rate}")
    rng = random.Random(seed)
    out, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= duration_s:
            return out
        out.append(workload.request(f"r{len(out)}", t, classes, rng))


def peak_rate(requests: list[SimRequest], window_s: float = 60.0) -> float:
    """The highest arrival rate over any `window_s` span (a sliding window), requests/s."""
    times = sorted(r.arrival_s for r in requests)
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - window_s:
            j += 1
        best = max(best, i - j + 1)
    span = min(window_s, max(times[-1] - times[0], 1e-9)) if times else window_s
    return best / span


def start_rate(requests: list[SimRequest], window_s: float = 60.0) -> float:
    """The arrival rate over the trace's first `window_s` (what its fleet was serving when it began)."""
    if not requests:
        return 0.0
    t0 = min(r.arrival_s for r in requests)
    return sum(1 for r in requests if r.arrival_s < t0 + window_s) / window_s


def load_trace(path: str | Path, classes: ClassTable | None = None,
               default_output_len: int = 64) -> list[SimRequest]:
    """A `lockgate bench` records.jsonl (or any JSONL with `arrival_s`/`scheduled_s`, `priority_class`/
    `class`, `prompt_tokens`, `output_tokens`/`max_tokens`) as a trace, times from the first arrival.
    Cancelled requests are replayed too (their load was real); a class the table lacks is the default."""
    classes = classes or ClassTable()
    p = Path(path)
    if p.is_dir():
        p = p / "records.jsonl"
    try:
        text = p.read_text()
    except OSError as e:
        raise ValueError(f"cannot read trace {p}: {e.strerror or e}") from None
    out: list[SimRequest] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            raise ValueError(f"{p}:{n}: not a JSON line") from None
        if not isinstance(rec, dict):
            raise ValueError(f"{p}:{n}: not a JSON object")
        t = rec.get("arrival_s", rec.get("scheduled_s", rec.get("start_s")))
        if not _num(t) or t < 0:
            raise ValueError(f"{p}:{n}: no arrival time (arrival_s or scheduled_s, seconds >= 0)")
        cls = classes.get(str(rec.get("priority_class") or rec.get("class") or "")) or classes.default
        prompt = _int(rec.get("prompt_tokens")) or _int(rec.get("prompt_len")) or 128
        output = (_int(rec.get("output_tokens")) or _int(rec.get("max_tokens")) or _int(rec.get("output_len"))
                  or default_output_len)
        out.append(SimRequest(f"r{len(out)}", tenant=cls.name, priority=cls.rank, prompt_len=prompt,
                              output_len=output, arrival_s=float(t)))
        if len(out) > MAX_TRACE_REQUESTS:
            raise ValueError(f"{p}: more than {MAX_TRACE_REQUESTS} requests")
    if not out:
        raise ValueError(f"{p}: the trace is empty")
    t0 = min(r.arrival_s for r in out)
    for r in out:
        r.arrival_s -= t0
    out.sort(key=lambda r: r.arrival_s)
    return out


def _num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _int(v: object) -> int:
    """A positive token count, else 0 (absent, zero or nonsense); capped at 1M tokens."""
    return min(int(v), 1_000_000) if _num(v) and v >= 1 else 0  # type: ignore[arg-type,operator]
