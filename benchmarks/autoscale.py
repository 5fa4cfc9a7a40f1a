"""The autoscaler's policies side by side: lockgate's against a fixed fleet and a Kubernetes-HPA-style one.

    .venv/bin/python benchmarks/autoscale.py [--quick] [--out DIR] [--cold-start 20] [--peak-qps 80]
        [--duration 1800] [--seed 1] [--patterns burst,diurnal] [--real]

Simulator part (the targets). Each trace (`lockgate autoscale simulate`'s generated patterns:
`burst`, a base at 35% of the peak with three bursts to the peak, and `diurnal`, a compressed day
from 10% of the peak to the peak and back) is replayed through the simulated fleet
(`lifecycle/autoscale_sim.py`: the real scheduler and KV cache per replica on one fake clock, a
cold start from decision to ready) under each policy's own code (`lifecycle/autoscaler.py`):
- fixed:    always max_replicas;
- hpa:      Kubernetes' HPA algorithm with its defaults (15 s sync, 10% tolerance, 300 s scale-down
            stabilization, up at most max(+100%, +4 pods) per 15 s, never below 1), on in-flight per
            replica at 70% of the target;
- lockgate: ours (docs/AUTOSCALING.md).
The fleet is calibrated once on the simulator: one replica's capacity within the SLOs, the in-flight
target it suggests (both autoscalers get the same one), and max_replicas = the planner's answer for
the trace's peak (so the fixed fleet is the one a planner would provision). Same trace, same seed,
same settings for all three.

Targets, per trace: lockgate keeps >= 99% of interactive requests within their TTFT target, with
<= 60% of the fixed fleet's replica-seconds, and >= 33% fewer scale events than the HPA-style policy.

Real part: `--real [--local] [--phase-s 60] [--skip-sim]` (benchmarks/autoscale_real.py, no target but
"lost" = 0): a live server with fake-engine replicas as Ray actors on a local cluster (`--local`:
local processes), a step load 1x -> 4x -> 1x of one replica's capacity, 60 s each: replicas over time,
TTFT p95 per 10 s window, requests lost, cold starts, a timeline PNG.
Results: `--out` (default benchmarks/results/autoscale/) gets result.json, report.md and a
timeline PNG per trace.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from lockgate.cli_autoscale import run_comparison  # noqa: E402
from lockgate.lifecycle.autoscale_patterns import Workload, generate, rate_fn  # noqa: E402
from lockgate.lifecycle.autoscale_sim import SimSetup  # noqa: E402

DEFAULT_OUT = ROOT / "benchmarks" / "results" / "autoscale"
TARGET_ATTAINMENT = 0.99
TARGET_COST = 0.60  # lockgate's replica-seconds / the fixed fleet's, at most
TARGET_EVENTS = 0.67  # lockgate's scale events / HPA's, at most (>= 33% fewer)


def verdicts(res: dict[str, Any]) -> list[tuple[str, str, bool]]:
    pol = res["policies"]
    lg, hpa = pol["lockgate"], pol["hpa"]
    att = lg["classes"]["interactive"]["attainment"]
    cost = res["replica_seconds_vs_fixed"]["lockgate"]
    ev = lg["scale_events"] / hpa["scale_events"] if hpa["scale_events"] else float("inf")
    return [
        (f"interactive within TTFT >= {TARGET_ATTAINMENT:.0%}", f"{att:.2%}", att >= TARGET_ATTAINMENT),
        (f"replica-seconds <= {TARGET_COST:.0%} of fixed", f"{cost:.1%}", cost <= TARGET_COST),
        ("scale events >= 33% fewer than hpa", f"{lg['scale_events']} vs {hpa['scale_events']} ({ev:.2f}x)",
         ev <= TARGET_EVENTS),
    ]


def simulated(args: argparse.Namespace) -> dict[str, Any]:
    """The simulator part: every pattern, the three policies, the targets."""
    out: dict[str, Any] = {}
    for pattern in args.patterns:
        started = time.perf_counter()
        setup = SimSetup(cold_start_s=args.cold_start, seed=args.seed)
        workload = Workload()
        reqs = generate(pattern, args.peak_qps, args.duration, args.seed, setup.classes, workload)
        label = f"{pattern}, peak {args.peak_qps:g} req/s, {args.duration:g} s, cold start {args.cold_start:g} s"
        res = run_comparison(reqs, setup, workload, label, 1, None, None, ["fixed", "hpa", "lockgate"],
                             args.out / pattern)
        res["wall_s"] = round(time.perf_counter() - started, 1)
        res["oracle_vs_fixed"] = round(oracle(pattern, args, res["calibration"]), 4)
        res["verdicts"] = [{"target": t, "measured": m, "met": ok} for t, m, ok in verdicts(res)]
        out[pattern] = res
        print_trace(res)
    return out


def oracle(pattern: str, args: argparse.Namespace, cal: dict[str, Any]) -> float:
    """A bound for context: replicas = ceil(the pattern's true rate / one replica's capacity) at every
    second, no cold start and no headroom, as a share of the fixed fleet's replica-seconds."""
    rate = rate_fn(pattern, args.peak_qps, args.duration)
    cap, n = cal["replica_capacity_qps"], cal["max_replicas"]
    secs = int(args.duration)
    return sum(min(n, math.ceil(rate(t + 0.5) / cap)) for t in range(secs)) / (n * secs)


def print_trace(res: dict[str, Any]) -> None:
    cal = res["calibration"]
    print(f"\n## {res['label']}: {res['requests']} requests; replica capacity {cal['replica_capacity_qps']:g} req/s, "
          f"target {cal['target_in_flight']:g} in flight, max_replicas {cal['max_replicas']} ({res['wall_s']:g} s)")
    print(table(res))
    print(f"  (an oracle sized to the true rate every second, with no cold start or headroom: "
          f"{res['oracle_vs_fixed']:.0%} of fixed)")
    for t, m, ok in verdicts(res):
        print(f"  {'MET   ' if ok else 'MISSED'} {t}: {m}")
    print(f"  timeline: {res['timeline_png']}")


def table(res: dict[str, Any]) -> str:
    rows = ["| policy | interactive | standard | batch | replica-s | vs fixed | scale events | peak replicas |",
            "|---|---|---|---|---|---|---|---|"]
    for name, p in res["policies"].items():
        c = p["classes"]
        rows.append(f"| {name} | {c['interactive']['attainment']:.2%} | {c['standard']['attainment']:.2%} | "
                    f"{c['batch']['attainment']:.2%} | {p['replica_seconds']:.0f} | "
                    f"{res['replica_seconds_vs_fixed'][name]:.2f} | {p['scale_events']} | {p['peak_replicas']} |")
    return "\n".join(rows)


def real_run(args: argparse.Namespace) -> dict[str, Any]:
    """The real part (benchmarks/autoscale_real.py): a live server, fake-engine replicas as Ray actors
    (local processes with --local), a step load 1x -> 4x -> 1x of one replica's capacity."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from autoscale_real import print_report
    from autoscale_real import real_run as run

    rep = run(args.out / "real", ray=not args.local, phase_s=args.phase_s, seed=args.seed)
    print_report(rep)
    return rep


def report(result: dict[str, Any]) -> str:
    lines = ["# Autoscaling benchmark", ""]
    for pattern, res in result["simulated"].items():
        lines += [f"## {res['label']}", "", table(res), "",
                  f"An oracle (replicas = ceil(true rate / capacity) every second, no cold start): "
                  f"{res['oracle_vs_fixed']:.0%} of fixed.", ""]
        lines += [f"- {'met' if v['met'] else '**missed**'}: {v['target']}: {v['measured']}" for v in res["verdicts"]]
        lines += [f"- timeline: `{res['timeline_png']}`", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="a short smoke run (600 s traces, peak 40 req/s)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where result.json, report.md and the PNGs go")
    ap.add_argument("--patterns", type=lambda s: [p for p in s.split(",") if p], default=["burst", "diurnal"])
    ap.add_argument("--peak-qps", type=float, default=80.0)
    ap.add_argument("--duration", type=float, default=1800.0)
    ap.add_argument("--cold-start", type=float, default=20.0, help="seconds from a scale-up decision to ready")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--real", action="store_true", help="also the real part (a live server, Ray replicas)")
    ap.add_argument("--local", action="store_true", help="the real part on local replica processes, not Ray")
    ap.add_argument("--phase-s", type=float, default=60.0, help="the real part: seconds per load step")
    ap.add_argument("--skip-sim", action="store_true", help="only the real part")
    args = ap.parse_args()
    if args.quick:
        args.duration, args.peak_qps = 600.0, 40.0
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    # Section 1: the simulator (the targets).
    result["simulated"] = {} if args.skip_sim else simulated(args)
    # Section 2: the real run (added later).
    if args.real:
        result["real"] = real_run(args)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "report.md").write_text(report(result) + "\n")
    print(f"\nresults: {args.out / 'result.json'}, {args.out / 'report.md'} ({result['wall_s']:g} s)")
    met = all(v["met"] for res in result["simulated"].values() for v in res["verdicts"])
    if args.real:
        met = met and result["real"]["lost"] == 0
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
