"""Per-step costs for the simulator, fitted to a `lockgate bench` result.json (`--profile`).

The simulator's step costs `base_s + per_token_s x tokens computed`. A bench result holds, per
run (or per sweep probe), the median TPOT and TTFT, the token throughput and the request
sizes. Two relations tie them to the step model:

- decode: a step is about one TPOT long and computes `total_token_rate x TPOT` tokens, so
  `TPOT = base + per_token x (total_token_rate x TPOT)` (one equation per run or probe);
- prefill at the lightest load: a request's first token needs about one step with its whole
  prompt, so `TTFT_min = base + per_token x mean prompt`.

Least squares over those (both unknowns kept >= 0). It measures through HTTP and the client,
so it is an estimate of the server's steps, not of the kernels; the request sizes (mean
prompt and output tokens) become the simulated workload's.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lockgate.engine.sim import StepCost

MIN_BASE_S = 1e-4


@dataclass(slots=True)
class Profile:
    cost: StepCost
    prompt_mean: float
    output_mean: float
    source: str  # where it came from, for the report
    points: int = 0  # runs and probes fitted

    def to_json(self) -> dict[str, Any]:
        return {"base_s": self.cost.base_s, "per_token_s": self.cost.per_token_s, "prompt_mean": self.prompt_mean,
                "output_mean": self.output_mean, "source": self.source, "points": self.points}


def _f(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


def _point(summary: dict[str, Any]) -> tuple[float, float, float, float, float] | None:
    """(tpot p50, ttft min, total tokens/s, mean prompt, mean output) of one run's overall group."""
    g = summary.get("overall") if isinstance(summary, dict) else None
    if not isinstance(g, dict):
        return None
    ok = _f(g.get("ok")) or 0
    tpot = _f((g.get("tpot") or {}).get("p50"))
    ttft = _f((g.get("ttft") or {}).get("min"))
    rate = _f(g.get("total_token_rate"))
    prompt, output = _f(g.get("prompt_tokens")), _f(g.get("output_tokens"))
    if not ok or tpot is None or ttft is None or rate is None or not prompt or not output or tpot <= 0:
        return None
    return tpot, ttft, rate, prompt / ok, output / ok


def fit_profile(result: dict[str, Any], source: str = "result.json") -> Profile:
    if not isinstance(result, dict) or not str(result.get("schema", "")).startswith("lockgate-bench/"):
        raise ValueError(f"{source}: not a lockgate bench result.json (no 'lockgate-bench/' schema)")
    summaries = [result.get("summary")]
    sweep = result.get("sweep")
    if isinstance(sweep, dict):
        summaries += [p.get("summary") for p in sweep.get("probes", []) if isinstance(p, dict)]
    pts = [p for p in (_point(s) for s in summaries if s) if p is not None]
    if not pts:
        raise ValueError(f"{source}: no run with completed requests, TPOT and TTFT to fit step costs to")
    # Rows (1, x) -> y: decode rows, then the lightest run's prefill row.
    rows = [(1.0, rate * tpot, tpot) for tpot, _t, rate, _p, _o in pts]
    light = min(pts, key=lambda p: p[2])
    rows.append((1.0, light[3], light[1]))
    base, per_token = _least_squares(rows)
    if per_token < 0:  # the data say tokens cost nothing: a flat step
        base, per_token = sum(y for _a, _x, y in rows) / len(rows), 0.0
    elif base < MIN_BASE_S:  # a line through zero: per-token only
        per_token = sum(x * y for _a, x, y in rows) / max(sum(x * x for _a, x, _y in rows), 1e-12)
        base = MIN_BASE_S
    prompt = sum(p[3] for p in pts) / len(pts)
    output = sum(p[4] for p in pts) / len(pts)
    return Profile(StepCost(base, per_token), prompt, output, source, len(pts))


def _least_squares(rows: list[tuple[float, float, float]]) -> tuple[float, float]:
    n = len(rows)
    sx = sum(x for _a, x, _y in rows)
    sy = sum(y for _a, _x, y in rows)
    sxx = sum(x * x for _a, x, _y in rows)
    sxy = sum(x * y for _a, x, y in rows)
    det = n * sxx - sx * sx
    if abs(det) < 1e-12:
        return sy / n, 0.0
    return (sy * sxx - sx * sxy) / det, (n * sxy - sx * sy) / det


def load_profile(path: str | Path) -> Profile:
    p = Path(path)
    if p.is_dir():
        p = p / "result.json"
    try:
        data = json.loads(p.read_text())
    except OSError as e:
        raise ValueError(f"cannot read profile {p}: {e.strerror or e}") from None
    except ValueError:
        raise ValueError(f"profile {p} is not JSON") from None
    return fit_profile(data, str(p))
