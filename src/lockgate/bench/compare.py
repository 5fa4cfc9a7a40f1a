"""`lockgate bench --compare a.json b.json`: two runs side by side, with B/A ratios.

A ratio is green where B is better (higher throughput, lower latency), red where worse.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table

from lockgate.bench.benchmark import SCHEMA

# (label, path in the result, unit scale, higher is better)
ROWS: list[tuple[str, tuple[str, ...], float, bool]] = [
    ("completed requests/s", ("summary", "overall", "request_rate"), 1, True),
    ("output tokens/s", ("summary", "overall", "output_token_rate"), 1, True),
    ("total tokens/s", ("summary", "overall", "total_token_rate"), 1, True),
    ("goodput requests/s", ("summary", "overall", "goodput"), 1, True),
    ("error rate", ("summary", "overall", "error_rate"), 1, False),
    *[(f"{m.upper()} {p} (ms)", ("summary", "overall", m, p), 1000, False)
      for m in ("ttft", "tpot", "itl", "e2e") for p in ("mean", "p50", "p90", "p95", "p99")],
    ("sweep: highest rate within SLO (req/s)", ("sweep", "best_rate"), 1, True),
]


class CompareError(ValueError):
    """A file that is not a `lockgate bench` result."""


def load(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CompareError(f"--compare: no such file: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CompareError(f"--compare {path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise CompareError(f"--compare {path}: not a lockgate bench result.json (schema {SCHEMA})")
    return data


def _get(d: dict[str, Any], path: tuple[str, ...]) -> float | None:
    x: Any = d
    for k in path:
        if not isinstance(x, dict) or k not in x:
            return None
        x = x[k]
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def rows(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, float | None, float | None, float | None, bool]]:
    """(label, A, B, B/A, higher_is_better) for every measure at least one run has."""
    out = []
    for label, path, scale, higher in ROWS:
        va, vb = _get(a, path), _get(b, path)
        if va is None and vb is None:
            continue
        va = None if va is None else va * scale
        vb = None if vb is None else vb * scale
        ratio = vb / va if va and vb is not None else None
        out.append((label, va, vb, ratio, higher))
    return out


def table(a: dict[str, Any], b: dict[str, Any], name_a: str, name_b: str) -> Table:
    t = Table(title=f"A: {a['label']}   B: {b['label']}", title_justify="left")
    t.add_column("measure")
    t.add_column(f"A ({name_a})", justify="right")
    t.add_column(f"B ({name_b})", justify="right")
    t.add_column("B/A", justify="right")
    for label, va, vb, ratio, higher in rows(a, b):
        r = "-"
        if ratio is not None:
            better = ratio > 1 if higher else ratio < 1
            color = "green" if better and abs(ratio - 1) > 0.02 else "red" if abs(ratio - 1) > 0.02 else "white"
            r = f"[{color}]{ratio:.2f}x[/]"
        t.add_row(label, "-" if va is None else f"{va:,.3f}", "-" if vb is None else f"{vb:,.3f}", r)
    return t
