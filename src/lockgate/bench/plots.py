"""PNG plots of a run (matplotlib, Agg backend, imported only here so the CLI starts fast).

- latency_cdf.png: CDFs of TTFT, TPOT, ITL and end-to-end latency, SLO thresholds marked;
- timeline.png: sent/completed requests and output tokens per second, and latency by send time;
- sweep.png (sweeps only): latency percentiles and throughput against the offered rate, pass/fail marked.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from lockgate.bench.record import OK, RequestRecord


def _plt():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _thresholds(result: dict[str, Any]) -> dict[str, list[tuple[str, float]]]:
    """metric -> [(term, seconds)] from the config's SLO terms."""
    out: dict[str, list[tuple[str, float]]] = {}
    for term in result["config"].get("slo_terms", []):
        name, value = term.split("<")
        out.setdefault(name.split("_")[0], []).append((name, float(value)))
    return out


def latency_cdf(result: dict[str, Any], records: list[RequestRecord], path: Path) -> Path:
    plt = _plt()
    ok = [r for r in records if r.status == OK]
    series = {
        "ttft": ("TTFT", [r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot": ("TPOT", [v for r in ok if (v := r.tpot_s) is not None]),
        "itl": ("ITL", [g for r in ok for g in r.itl_s]),
        "e2e": ("End-to-end latency", [r.e2e_s for r in ok if r.e2e_s is not None]),
    }
    slo = _thresholds(result)
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, (key, (title, xs)) in zip(axes.flat, series.items()):
        xs = sorted(x * 1000 for x in xs)
        if xs:
            ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post")
        else:
            ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
        for name, sec in slo.get(key, []):
            ax.axvline(sec * 1000, color="red", linestyle="--", label=f"SLO {name} < {sec * 1000:g} ms")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_title(f"{title} (n={len(xs)})")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of samples")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Latency CDFs: {result['label']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def timeline(result: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    buckets = result["summary"]["timeline"]
    t = [b["t_s"] for b in buckets]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 8), sharex=True)
    ax1.step(t, [b["sent_rate"] for b in buckets], where="post", label="sent requests/s")
    ax1.step(t, [b["completed_rate"] for b in buckets], where="post", label="completed requests/s")
    ax1.set_ylabel("requests/s")
    ax1.grid(alpha=0.3)
    tok = ax1.twinx()
    tok.step(t, [b["output_token_rate"] for b in buckets], where="post", color="tab:green", alpha=0.6,
             label="output tokens/s")
    tok.set_ylabel("output tokens/s")
    h1, l1 = ax1.get_legend_handles_labels()
    h2, l2 = tok.get_legend_handles_labels()
    ax1.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)
    ax1.set_title("Throughput over time")
    for key, label in (("ttft_p50_s", "TTFT p50"), ("e2e_p50_s", "E2E p50"), ("e2e_p95_s", "E2E p95")):
        pts = [(b["t_s"], b[key] * 1000) for b in buckets if b[key] is not None]
        if pts:
            ax2.plot(*zip(*pts), marker=".", label=label)
    ax2.set_ylabel("ms (requests by send time)")
    ax2.set_xlabel("seconds since start")
    ax2.grid(alpha=0.3)
    ax2.legend(loc="upper left", fontsize=8)
    ax2.set_title("Latency over time")
    fig.suptitle(result["label"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def sweep(result: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    sw = result["sweep"]
    probes = sorted(sw["probes"], key=lambda p: p["rate"])
    rates = [p["rate"] for p in probes]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(11, 8), sharex=True)
    slo = _thresholds(result)
    for metric, color in (("ttft", "tab:blue"), ("tpot", "tab:orange"), ("itl", "tab:purple"), ("e2e", "tab:green")):
        # p50 and p95 of every metric, plus the percentile each SLO term names (when the summary has it)
        pcts = ["p50", "p95"] + sorted({n.split("_")[1] for n, _ in slo.get(metric, [])} - {"p50", "p95"})
        for pct in pcts:
            style = ":" if pct == "p50" else "-" if pct == "p95" else "--"
            if pct not in probes[0]["summary"]["overall"][metric]:
                continue
            ys = [_ms(p["summary"]["overall"][metric][pct]) for p in probes]
            if any(y is not None for y in ys):
                ax1.plot(rates, [float("nan") if y is None else y for y in ys], style, color=color, marker=".",
                         label=f"{metric.upper()} {pct}")
        for name, sec in slo.get(metric, []):
            ax1.axhline(sec * 1000, color=color, linestyle="-.", alpha=0.5, linewidth=1)
            ax1.annotate(f"SLO {name}", (rates[0], sec * 1000), fontsize=7, color=color)
    for p in probes:
        ax1.axvline(p["rate"], color="green" if p["passed"] else "red", alpha=0.15, linewidth=6)
    ax1.set_yscale("log")
    ax1.set_ylabel("latency (ms, log)")
    ax1.legend(fontsize=7, ncol=4, loc="upper left")
    ax1.grid(alpha=0.3, which="both")
    ax1.set_title("Latency against offered load (green band: SLO met, red: missed)")
    ax2.plot(rates, rates, ":", color="grey", label="offered")
    ax2.plot(rates, [p["summary"]["overall"]["request_rate"] for p in probes], marker="o", label="completed req/s")
    ax2.plot(rates, [p["summary"]["overall"]["goodput"] for p in probes], marker="s", label="goodput req/s")
    if sw["found"]:
        for ax in (ax1, ax2):
            ax.axvline(sw["best_rate"], color="black", linestyle="--", linewidth=1)
        ax2.annotate(f"best {sw['best_rate']:.3g} req/s", (sw["best_rate"], 0), fontsize=8)
    ax2.set_xlabel("offered requests/s")
    ax2.set_ylabel("requests/s")
    ax2.legend(fontsize=8, loc="upper left")
    ax2.grid(alpha=0.3)
    fig.suptitle(f"SLO sweep: {result['label']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _ms(v: Any) -> float | None:
    return None if v is None or v == "inf" else v * 1000


def write_all(result: dict[str, Any], records: list[RequestRecord], out_dir: Path) -> list[Path]:
    paths = [latency_cdf(result, records, out_dir / "latency_cdf.png"), timeline(result, out_dir / "timeline.png")]
    if "sweep" in result:
        paths.append(sweep(result, out_dir / "sweep.png"))
    return paths
