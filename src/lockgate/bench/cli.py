"""`lockgate bench`: load-test any OpenAI-compatible server; answer "what QPS can I take at my SLO?".

Exit codes: 0 run done; 1 the run could not start (server unreachable) or no
request succeeded; 2 bad input. Imports beyond typer happen inside the command
so `lockgate --help` stays fast.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

Opt = typer.Option


def bench_command(
    base_url: Annotated[str, Opt(help="The server's OpenAI API root (http://host:port/v1)",
                                 rich_help_panel="Target")] = "http://127.0.0.1:8000/v1",
    model: Annotated[Optional[str], Opt("--model", "-m", help="Model name; default: the first of GET /models",
                                        rich_help_panel="Target")] = None,
    api_key: Annotated[str, Opt(envvar="OPENAI_API_KEY", show_envvar=True, help="Bearer key",
                                rich_help_panel="Target")] = "",
    endpoint: Annotated[str, Opt(help="completions | chat", rich_help_panel="Target")] = "completions",
    ignore_eos: Annotated[bool, Opt("--ignore-eos", help="Send ignore_eos (lockgate, vLLM, SGLang) so every "
                                    "request runs to max_tokens", rich_help_panel="Target")] = False,
    rate: Annotated[Optional[float], Opt(help="Fixed request rate (req/s)", rich_help_panel="Load")] = None,
    arrivals: Annotated[str, Opt(help="poisson | constant (for --rate, --ramp and sweeps)",
                                 rich_help_panel="Load")] = "poisson",
    burst: Annotated[Optional[int], Opt(help="Requests sent at once, every --burst-interval",
                                        rich_help_panel="Load")] = None,
    burst_interval: Annotated[Optional[float], Opt(help="Seconds between bursts", rich_help_panel="Load")] = None,
    ramp: Annotated[Optional[str], Opt(help="FROM:TO req/s, linear over --duration", rich_help_panel="Load")] = None,
    concurrency: Annotated[Optional[int], Opt(help="Closed loop: N clients, each sends when its last finished",
                                              rich_help_panel="Load")] = None,
    max_concurrency: Annotated[int, Opt(help="Cap on requests in flight for open-loop shapes (0: none)",
                                        rich_help_panel="Load")] = 0,
    duration: Annotated[Optional[float], Opt(help="Seconds of sending (default 30; 10 per sweep probe)",
                                             rich_help_panel="Load")] = None,
    num_requests: Annotated[Optional[int], Opt(help="Requests to send (with --duration: whichever ends first)",
                                               rich_help_panel="Load")] = None,
    seed: Annotated[int, Opt(help="Seed for arrivals and the workload", rich_help_panel="Load")] = 0,
    slo: Annotated[Optional[str], Opt(help="e.g. 'ttft_p95<0.5,tpot_p99<50ms' (ttft|tpot|itl|e2e, pNN)",
                                      rich_help_panel="SLO and sweep")] = None,
    sweep: Annotated[bool, Opt("--sweep", help="Search the highest rate that meets --slo",
                               rich_help_panel="SLO and sweep")] = False,
    sweep_start: Annotated[float, Opt(help="First probe rate (req/s)", rich_help_panel="SLO and sweep")] = 1.0,
    sweep_max: Annotated[float, Opt(help="Highest rate to probe", rich_help_panel="SLO and sweep")] = 1000.0,
    sweep_tolerance: Annotated[float, Opt(help="Stop bisecting when pass/fail rates are this close (relative)",
                                          rich_help_panel="SLO and sweep")] = 0.1,
    max_probes: Annotated[int, Opt(help="Most probes a sweep runs", rich_help_panel="SLO and sweep")] = 12,
    max_error_rate: Annotated[float, Opt(help="A probe fails above this share of errors and rejections",
                                         rich_help_panel="SLO and sweep")] = 0.01,
    input_len: Annotated[int, Opt(help="Prompt tokens (mean)", rich_help_panel="Workload")] = 256,
    output_len: Annotated[int, Opt(help="max_tokens (mean)", rich_help_panel="Workload")] = 128,
    len_dist: Annotated[str, Opt(help="fixed | uniform | lognormal", rich_help_panel="Workload")] = "fixed",
    prompts: Annotated[Optional[str], Opt(help="JSONL: {\"prompt\"|\"messages\", \"max_tokens\"?} per line",
                                          rich_help_panel="Workload")] = None,
    prefix_groups: Annotated[int, Opt(help="Groups sharing a prompt prefix", rich_help_panel="Workload")] = 0,
    prefix_len: Annotated[int, Opt(help="Tokens of each group's shared prefix", rich_help_panel="Workload")] = 0,
    tenants: Annotated[Optional[str], Opt("--tenants", help="JSON list of {name, key, weight, class}",
                                          rich_help_panel="Workload")] = None,
    tenant: Annotated[Optional[list[str]], Opt("--tenant", help="name:key:weight[:class] (repeatable)",
                                               rich_help_panel="Workload")] = None,
    cancel_fraction: Annotated[float, Opt(help="Share of streams the client closes early",
                                          rich_help_panel="Workload")] = 0.0,
    timeout: Annotated[float, Opt(help="Seconds per request", rich_help_panel="Output")] = 600.0,
    out: Annotated[Optional[Path], Opt(help="Directory for result.json, records.jsonl and PNG plots",
                                       rich_help_panel="Output")] = None,
    no_progress: Annotated[bool, Opt("--no-progress", help="No progress bar", rich_help_panel="Output")] = False,
    no_plots: Annotated[bool, Opt("--no-plots", help="No PNG files", rich_help_panel="Output")] = False,
    label: Annotated[str, Opt(help="Name of this run in reports and --compare", rich_help_panel="Output")] = "",
    compare: Annotated[Optional[tuple[Path, Path]], Opt(help="Show two result.json files side by side",
                                                        rich_help_panel="Output")] = None,
) -> None:
    """Load-test an OpenAI-compatible server: latency percentiles, throughput, goodput, SLO sweeps, plots."""
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 160)
    if compare is not None:
        _compare(console, str(compare[0]), str(compare[1]))
        return

    import asyncio

    from lockgate.bench import benchmark, report
    from lockgate.bench.config import BenchConfig, BenchInputError

    cfg = BenchConfig(
        base_url=base_url, model=model, api_key=api_key, endpoint=endpoint, rate=rate, arrivals=arrivals,
        burst=burst, burst_interval=burst_interval, ramp=ramp, concurrency=concurrency,
        max_concurrency=max_concurrency, duration=duration, num_requests=num_requests, seed=seed, slo=slo,
        sweep=sweep, sweep_start=sweep_start, sweep_max=sweep_max, sweep_tolerance=sweep_tolerance,
        max_probes=max_probes, max_error_rate=max_error_rate, input_len=input_len, output_len=output_len,
        len_dist=len_dist, prompts=prompts, prefix_groups=prefix_groups, prefix_len=prefix_len,
        tenants_file=tenants, tenant=list(tenant or []), cancel_fraction=cancel_fraction, ignore_eos=ignore_eos,
        timeout=timeout, out=str(out) if out else None, progress=not no_progress, plots=not no_plots, label=label)
    try:
        cfg.check()
        cfg.plan()  # shape errors (e.g. a ramp that sends nothing) before any traffic
    except BenchInputError as e:
        _fail(str(e), 2)
    err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

    def on_probe(p: benchmark.Probe) -> None:
        g = p.summary["overall"]
        mark = "[green]pass[/]" if p.passed else f"[red]fail[/] ({p.reason})"
        err.print(f"probe {p.rate:.4g} req/s: {mark}  done {g['request_rate']:.3g} req/s, "
                  f"TTFT p95 {report.ms(g['ttft']['p95'])} ms, E2E p95 {report.ms(g['e2e']['p95'])} ms")

    try:
        outcome = asyncio.run(benchmark.run(cfg, on_probe))
    except benchmark.BenchRunError as e:
        _fail(str(e), 1)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    report.render(outcome.result, console)
    if out is not None:
        files = report.write(outcome.result, outcome.records, out)
        if cfg.plots:
            from lockgate.bench import plots

            files += plots.write_all(outcome.result, outcome.records, out)
        console.print("wrote " + ", ".join(str(f) for f in files))
    if not cfg.sweep and outcome.result["summary"]["overall"]["ok"] + outcome.result["summary"]["overall"][
            "cancelled"] == 0:
        _fail("no request succeeded (see the errors above)", 1)


def _compare(console: object, a: str, b: str) -> None:
    from lockgate.bench.compare import CompareError, load, table

    try:
        ra, rb = load(a), load(b)
    except CompareError as e:
        _fail(str(e), 2)
    console.print(table(ra, rb, Path(a).parent.name or a, Path(b).parent.name or b))  # type: ignore[attr-defined]


def _fail(msg: str, code: int) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_command)
