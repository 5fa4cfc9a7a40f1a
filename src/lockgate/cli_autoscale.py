"""`lockgate autoscale simulate | plan`: the autoscaler's policies on the simulator, and capacity planning.

    lockgate autoscale simulate --pattern burst
    lockgate autoscale simulate --trace out/records.jsonl --policy lockgate --profile out/result.json
    lockgate autoscale plan --profile out/result.json --peak-qps 120 --growth 30%/quarter --price-per-replica-hour 2.5

`simulate` replays a trace (a `lockgate bench` records.jsonl, or a generated pattern) through a
simulated fleet sized by each policy's own code (`lifecycle/autoscaler.py`), prints per policy and
class the SLO attainment, the replica-seconds and the scale events, and writes a PNG timeline.
Unless given, the in-flight target and max_replicas (the fixed fleet) come from the simulator:
the planner's capacity for one replica and its answer for the trace's peak. `plan` answers how many
replicas a forecast peak needs on the same simulator, and what they cost a month. Bad input exits 2.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

if TYPE_CHECKING:
    from lockgate.lifecycle.autoscale_patterns import Workload
    from lockgate.lifecycle.autoscale_sim import AutoscaleRun, SimSetup
    from lockgate.lifecycle.capacity import Calibration

autoscale_app = typer.Typer(no_args_is_help=True,
                            help="The autoscaler on the simulator (policies compared) and capacity planning.")


def register(app: typer.Typer) -> None:
    app.add_typer(autoscale_app, name="autoscale")


def _fail(msg: str, code: int = 2) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _check(name: str, value: float | None, lo: float, hi: float, lo_open: bool = False) -> None:
    if value is None:
        return
    ok = math.isfinite(value) and (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        _fail(f"{name} must be a number in {'(' if lo_open else '['}{lo:g}, {hi:g}], got {value!r}")


def _setup(profile: str | None, cold_start: float, seed: int) -> tuple[SimSetup, Workload, dict[str, Any] | None]:
    from lockgate.lifecycle.autoscale_patterns import Workload
    from lockgate.lifecycle.autoscale_profile import load_profile
    from lockgate.lifecycle.autoscale_sim import SimSetup

    setup, workload, fitted = SimSetup(cold_start_s=cold_start, seed=seed), Workload(), None
    if profile is not None:
        try:
            prof = load_profile(profile)
        except ValueError as e:
            _fail(str(e))
        setup.cost = prof.cost
        p, o = max(1, round(prof.prompt_mean)), max(1, round(prof.output_mean))
        workload = Workload(prompt_len=(max(1, p // 2), max(1, p * 3 // 2)), output_len=(max(1, o // 2), max(1, o * 3 // 2)))
        fitted = prof.to_json()
    return setup, workload, fitted


ProfileOpt = Annotated[Optional[str], typer.Option(
    help="A `lockgate bench` result.json (or its directory) to fit the step costs and request sizes to; "
         "default: the built-in step model")]
ColdStartOpt = Annotated[float, typer.Option(help="Seconds from a scale-up decision to a ready replica")]


@autoscale_app.command("simulate")
def simulate_command(
    trace: Annotated[Optional[str], typer.Option(help="A `lockgate bench` records.jsonl (or its directory) to replay")] = None,  # noqa: E501
    pattern: Annotated[Optional[str], typer.Option(help="Generate a trace instead: diurnal | burst | ramp")] = None,
    policy: Annotated[Optional[str], typer.Option(help="Only this policy (lockgate | hpa | fixed); default: all three compared")] = None,  # noqa: E501
    profile: ProfileOpt = None,
    peak_qps: Annotated[float, typer.Option(help="--pattern: the peak rate, requests/s")] = 60.0,
    duration: Annotated[float, typer.Option(help="--pattern: the trace's length, seconds")] = 1200.0,
    seed: Annotated[int, typer.Option(help="--pattern: the arrivals' seed (and the router's)")] = 0,
    min_replicas: Annotated[int, typer.Option(help="The autoscalers' min_replicas (0: scale to zero)")] = 1,
    max_replicas: Annotated[Optional[int], typer.Option(help="The autoscalers' max_replicas and the fixed fleet; default: the planner's answer for the trace's peak")] = None,  # noqa: E501
    target_in_flight: Annotated[Optional[float], typer.Option(help="Per-replica in-flight target; default: what one simulated replica holds at 80% of its capacity")] = None,  # noqa: E501
    cold_start: ColdStartOpt = 20.0,
    out: Annotated[str, typer.Option(help="Directory for timeline.png and result.json")] = "autoscale-sim",
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON instead of tables")] = False,
) -> None:
    """Replay a trace through the simulated fleet under each policy: SLO attainment per class,
    replica-seconds, scale events; a PNG timeline."""
    from lockgate.lifecycle.autoscale_patterns import PATTERNS, generate, load_trace
    from lockgate.lifecycle.autoscale_types import POLICY_NAMES

    if (trace is None) == (pattern is None):
        _fail("give one of --trace FILE or --pattern diurnal|burst|ramp")
    if pattern is not None and pattern not in PATTERNS:
        _fail(f"unknown pattern {pattern!r} (one of {', '.join(PATTERNS)})")
    if policy is not None and policy not in POLICY_NAMES:
        _fail(f"unknown policy {policy!r} (one of {', '.join(POLICY_NAMES)})")
    _check("--peak-qps", peak_qps, 0, 1e5, lo_open=True)
    _check("--duration", duration, 0, 7 * 86400, lo_open=True)
    _check("--cold-start", cold_start, 0, 3600)
    _check("--target-in-flight", target_in_flight, 0, 1e6, lo_open=True)
    _check("--min-replicas", min_replicas, 0, 1024)
    _check("--max-replicas", max_replicas, 1, 1024)
    if max_replicas is not None and min_replicas > max_replicas:
        _fail(f"--min-replicas ({min_replicas}) must be at most --max-replicas ({max_replicas})")
    if not 0 <= seed < 2**63:
        _fail(f"--seed must be in [0, 2**63), got {seed}")
    started = time.perf_counter()
    setup, workload, fitted = _setup(profile, cold_start, seed)
    try:
        if trace is not None:
            requests = load_trace(trace, setup.classes, default_output_len=round(sum(workload.output_len) / 2))
        else:
            assert pattern is not None
            requests = generate(pattern, peak_qps, duration, seed, setup.classes, workload)
            if not requests:
                _fail(f"--pattern {pattern} at {peak_qps:g} req/s for {duration:g} s gives no request")
    except ValueError as e:
        _fail(str(e))
    label = f"trace {trace}" if trace is not None else f"{pattern} pattern, peak {peak_qps:g} req/s, {duration:g} s"
    result = run_comparison(requests, setup, workload, label, min_replicas, max_replicas, target_in_flight,
                            [policy] if policy else ["fixed", "hpa", "lockgate"], Path(out), fitted)
    result["wall_s"] = round(time.perf_counter() - started, 1)
    if json_out:
        typer.echo(json.dumps(result, indent=2))
    else:
        print_result(result)


def run_comparison(requests: list, setup: SimSetup, workload: Workload, label: str, min_replicas: int,  # noqa: ANN001
                   max_replicas: int | None, target_in_flight: float | None, policies: list[str], out: Path,
                   fitted: dict[str, Any] | None = None) -> dict[str, Any]:
    """Calibrate (unless given), run every policy on the trace, write result.json and timeline.png."""
    from lockgate.lifecycle.autoscale_patterns import peak_rate, start_rate
    from lockgate.lifecycle.autoscale_sim import compare
    from lockgate.lifecycle.autoscale_types import AutoscaleConfig
    from lockgate.lifecycle.capacity import Planner, calibrate

    try:
        cal = calibrate(Planner(setup, workload, seed=setup.seed), peak_rate(requests), max_replicas, target_in_flight)
        if min_replicas > cal.max_replicas:
            _fail(f"--min-replicas ({min_replicas}) is above max_replicas ({cal.max_replicas})")
        base = AutoscaleConfig(min_replicas=min_replicas, max_replicas=cal.max_replicas,
                               target_in_flight=cal.target_in_flight)
        initial = max(min_replicas, cal.replicas_at(start_rate(requests)))
        runs = compare(requests, base, setup, policies, initial)
    except (ValueError, RuntimeError) as e:
        _fail(str(e), 2 if isinstance(e, ValueError) else 1)
    out.mkdir(parents=True, exist_ok=True)
    png = timeline_png(runs, setup.classes.classes[0].ttft_s, label, out / "timeline.png")
    result = result_json(runs, cal, label, len(requests), setup, fitted)
    result["timeline_png"] = str(png)
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    result["result_json"] = str(out / "result.json")
    return result


def result_json(runs: dict[str, AutoscaleRun], cal: Calibration, label: str, n: int, setup: SimSetup,
                fitted: dict[str, Any] | None) -> dict[str, Any]:
    fixed = runs.get("fixed")
    out: dict[str, Any] = {
        "label": label, "requests": n, "calibration": cal.to_json(), "cold_start_s": setup.cold_start_s,
        "step_cost": {"base_s": setup.cost.base_s, "per_token_s": setup.cost.per_token_s}, "profile": fitted,
        "policies": {name: run.to_json() for name, run in runs.items()},
    }
    if fixed is not None and fixed.replica_seconds > 0:
        out["replica_seconds_vs_fixed"] = {k: round(r.replica_seconds / fixed.replica_seconds, 4) for k, r in runs.items()}
    return out


def print_result(result: dict[str, Any]) -> None:
    cal = result["calibration"]
    typer.echo(f"{result['label']}: {result['requests']} requests; one replica serves "
               f"{cal['replica_capacity_qps']:g} req/s within the SLOs; target {cal['target_in_flight']:g} in flight "
               f"per replica; max_replicas {cal['max_replicas']} (the fixed fleet for the trace's peak, "
               f"{cal['trace_peak_qps']:.1f} req/s); cold start {result['cold_start_s']:g} s")
    vs = result.get("replica_seconds_vs_fixed", {})
    typer.echo(f"{'policy':<9} {'class':<12} {'attainment':>10} {'TTFT p95':>9} {'replica-s':>10} {'vs fixed':>8} "
               f"{'events':>6} {'peak':>4}")
    for name, run in result["policies"].items():
        for i, (cls, c) in enumerate(run["classes"].items()):
            p95 = "-" if c["ttft_p95_s"] is None else f"{c['ttft_p95_s']:.3f}s"
            head = (f"{run['replica_seconds']:>10.0f} {vs.get(name, float('nan')):>8.2f} {run['scale_events']:>6} "
                    f"{run['peak_replicas']:>4}") if i == 0 else ""
            typer.echo(f"{name if i == 0 else '':<9} {cls:<12} {c['attainment']:>10.2%} {p95:>9} {head}")
    typer.echo(f"timeline: {result['timeline_png']}")
    typer.echo(f"result: {result['result_json']} ({result.get('wall_s', 0):g} s)")


def timeline_png(runs: dict[str, AutoscaleRun], target_s: float, label: str, path: Path) -> Path:
    """Load, replicas (paid: ready, starting and draining) and the first class's TTFT p95 over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(11, 9), sharex=True)
    first = next(iter(runs.values()))
    t = [b.t for b in first.timeline]
    ax1.step(t, [b.arrival_rate for b in first.timeline], where="post", color="grey", label="arrivals/s")
    ax1.set_ylabel("requests/s")
    ax1.set_title("Load")
    for name, run in runs.items():
        tl = run.timeline
        ax2.step([b.t for b in tl], [b.total for b in tl], where="post", label=f"{name} (paid)")
        ax2.step([b.t for b in tl], [b.ready for b in tl], where="post", linestyle=":", alpha=0.6,
                 label=f"{name} (ready)")
        pts = [(b.t, b.ttft_p95_interactive * 1000) for b in tl if b.ttft_p95_interactive is not None]
        if pts:
            ax3.plot(*zip(*pts), marker=".", label=name)
    ax2.set_ylabel("replicas")
    ax2.set_title("Replicas")
    ax3.axhline(target_s * 1000, color="red", linestyle="--", label=f"target {target_s * 1000:g} ms")
    ax3.set_yscale("log")
    ax3.set_ylabel("ms (requests by arrival)")
    ax3.set_xlabel("seconds since start")
    ax3.set_title("TTFT p95, first class")
    for ax in (ax1, ax2, ax3):
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(f"Autoscaling: {label}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@autoscale_app.command("plan")
def plan_command(
    peak_qps: Annotated[float, typer.Option(help="The forecast peak, requests/s")],
    profile: ProfileOpt = None,
    growth: Annotated[Optional[str], typer.Option(help="Growth of the peak: 30%/quarter, 10%/month or 50%/year; adds the next quarters")] = None,  # noqa: E501
    quarters: Annotated[int, typer.Option(help="With --growth: how many quarters ahead")] = 4,
    price_per_replica_hour: Annotated[Optional[float], typer.Option(help="What one replica costs an hour, for the monthly cost")] = None,  # noqa: E501
    cold_start: ColdStartOpt = 20.0,
    seed: Annotated[int, typer.Option(help="The probes' arrivals seed")] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the plan as JSON")] = False,
) -> None:
    """Replicas for a forecast peak (and the next quarters' with --growth), found on the simulator,
    and their monthly cost."""
    from lockgate.lifecycle.capacity import Planner, parse_growth, plan

    _check("--peak-qps", peak_qps, 0, 1e5, lo_open=True)
    _check("--price-per-replica-hour", price_per_replica_hour, 0, 1e6)
    if not 1 <= quarters <= 20:
        _fail(f"--quarters must be in [1, 20], got {quarters}")
    if not 0 <= seed < 2**63:
        _fail(f"--seed must be in [0, 2**63), got {seed}")
    try:
        g = parse_growth(growth) if growth is not None else None
    except ValueError as e:
        _fail(str(e))
    setup, workload, fitted = _setup(profile, cold_start, seed)
    try:
        result = plan(Planner(setup, workload, seed=seed), peak_qps, g, quarters, price_per_replica_hour)
    except ValueError as e:
        _fail(str(e))
    data = result.to_json()
    data["profile"] = fitted
    if json_out:
        typer.echo(json.dumps(data, indent=2))
        return
    typer.echo(f"one replica serves {result.capacity_qps:g} req/s within every class's TTFT objective "
               f"({'profile ' + fitted['source'] if fitted else 'the built-in step model'}); "
               f"suggested target_in_flight {result.target_in_flight:g}")
    typer.echo(f"{'':<12} {'peak req/s':>10} {'replicas':>8} {'monthly cost':>12}")
    for r in result.rows:
        cost = "-" if r.monthly_cost is None else f"{r.monthly_cost:,.2f}"
        typer.echo(f"{r.label:<12} {r.peak_qps:>10.1f} {r.replicas:>8} {cost:>12}")
