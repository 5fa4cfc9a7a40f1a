"""The run as tables on the terminal (rich), and as files: result.json and records.jsonl.

Tables are drawn from the result dict (the same one result.json holds), so a
saved run renders exactly as it did live.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from lockgate.bench.record import RequestRecord

LATENCY_ROWS = (("TTFT", "ttft"), ("TPOT", "tpot"), ("ITL", "itl"), ("E2E", "e2e"))


def ms(v: Any) -> str:
    """Seconds as milliseconds; '-' when there is no value."""
    if v is None:
        return "-"
    if v == "inf":
        return "inf"
    return f"{v * 1000:.1f}"


def num(v: Any, digits: int = 2) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def latency_table(g: dict[str, Any], title: str = "Latency (ms)") -> Table:
    t = Table(title=title, title_justify="left")
    t.add_column("metric")
    for c in ("mean", "p50", "p90", "p95", "p99", "max", "n"):
        t.add_column(c, justify="right")
    for label, key in LATENCY_ROWS:
        d = g[key]
        t.add_row(label, *(ms(d[c]) for c in ("mean", "p50", "p90", "p95", "p99", "max")), str(d["count"]))
    return t


def throughput_table(g: dict[str, Any], duration_s: float) -> Table:
    t = Table(title="Throughput", title_justify="left")
    t.add_column("measure")
    t.add_column("value", justify="right")
    rows = [
        ("duration (s)", num(duration_s)),
        ("requests: sent / ok / cancelled / rejected / errors",
         f"{g['requests']} / {g['ok']} / {g['cancelled']} / {g['rejected']} / {g['errors']}"),
        ("completed requests/s", num(g["request_rate"])),
        ("output tokens/s", num(g["output_token_rate"], 1)),
        ("total tokens/s", num(g["total_token_rate"], 1)),
        ("goodput requests/s (met every SLO term)", f"{num(g['goodput'])} ({g['goodput_fraction']:.0%})"),
        ("error rate", f"{g['error_rate']:.1%}"),
    ]
    for r in rows:
        t.add_row(*r)
    return t


def slo_table(g: dict[str, Any]) -> Table:
    t = Table(title="SLO", title_justify="left")
    for c in ("term", "observed (ms)", "result"):
        t.add_column(c)
    for r in g["slo"]:
        t.add_row(r["term"], ms(r["observed_s"]), "[green]pass[/]" if r["passed"] else "[red]FAIL[/]")
    return t


def failures_table(g: dict[str, Any]) -> Table:
    t = Table(title="Errors and rejections", title_justify="left")
    for c in ("status", "HTTP", "code", "count", "example"):
        t.add_column(c, justify="right" if c in ("HTTP", "count") else "left")
    for f in g["failures"]:
        t.add_row(f["status"], str(f["http_status"] or "-"), f["code"] or "-", str(f["count"]), f["example"][:80])
    return t


def groups_table(title: str, groups: dict[str, dict[str, Any]]) -> Table:
    t = Table(title=title, title_justify="left")
    t.add_column(title.split()[-1])
    for c in ("sent", "ok", "cancel", "rej", "err", "req/s", "out tok/s", "goodput/s",
              "TTFT p50", "TTFT p95", "TPOT p50", "TPOT p95", "E2E p95"):
        t.add_column(c, justify="right")
    for name, g in groups.items():
        t.add_row(name, str(g["requests"]), str(g["ok"]), str(g["cancelled"]), str(g["rejected"]),
                  str(g["errors"]), num(g["request_rate"]), num(g["output_token_rate"], 1), num(g["goodput"]),
                  ms(g["ttft"]["p50"]), ms(g["ttft"]["p95"]), ms(g["tpot"]["p50"]), ms(g["tpot"]["p95"]),
                  ms(g["e2e"]["p95"]))
    return t


def sweep_table(sweep: dict[str, Any]) -> Table:
    t = Table(title=f"Sweep (SLO {', '.join(sweep['slo'])}; ms)", title_justify="left")
    for c in ("offered req/s", "result", "done req/s", "goodput/s", "TTFT p95", "TPOT p95", "ITL p95", "E2E p95",
              "errors", "why"):
        t.add_column(c, justify="left" if c in ("result", "why") else "right")
    for p in sorted(sweep["probes"], key=lambda p: p["rate"]):
        g = p["summary"]["overall"]
        t.add_row(num(p["rate"]), "[green]pass[/]" if p["passed"] else "[red]fail[/]", num(g["request_rate"]),
                  num(g["goodput"]), ms(g["ttft"]["p95"]), ms(g["tpot"]["p95"]), ms(g["itl"]["p95"]),
                  ms(g["e2e"]["p95"]), f"{g['error_rate']:.1%}", p["reason"])
    return t


def sweep_answer(sweep: dict[str, Any]) -> str:
    if not sweep["found"]:
        return "[red]No probed rate met the SLO[/] (lowest probe failed; see the table)."
    cap = "" if sweep["bracketed"] else " (the highest rate probed: raise --sweep-max to look further)"
    return f"[bold]Highest rate meeting the SLO: {sweep['best_rate']:.3g} requests/s[/]{cap}"


def render(result: dict[str, Any], console: Console) -> None:
    s = result["summary"]
    g = s["overall"]
    tgt = result["target"]
    cfg = result["config"]
    console.print(f"[bold]{result['label']}[/]  {tgt['endpoint']} endpoint, shape: {cfg['shape']}")
    if "sweep" in result:
        console.print(sweep_table(result["sweep"]))
        console.print(sweep_answer(result["sweep"]))
        console.print("Details of the reported probe:" if result["sweep"]["found"] else "Details of the lowest probe:")
    console.print(latency_table(g))
    console.print(throughput_table(g, s["duration_s"]))
    if g["slo"]:
        console.print(slo_table(g))
    if g["failures"]:
        console.print(failures_table(g))
    if len(s["by_tenant"]) > 1:
        console.print(groups_table("By tenant", s["by_tenant"]))
    if len(s["by_class"]) > 1 or "-" not in s["by_class"]:
        console.print(groups_table("By priority class", s["by_class"]))


def write(result: dict[str, Any], records: list[RequestRecord], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    res = out_dir / "result.json"
    res.write_text(json.dumps(result, indent=2) + "\n")
    rec = out_dir / "records.jsonl"
    with rec.open("w") as f:
        for r in records:
            f.write(json.dumps(r.to_json()) + "\n")
    return [res, rec]
