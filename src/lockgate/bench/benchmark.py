"""A whole `lockgate bench` run: resolve the model, run the phase (or the sweep's probes), build the result."""
from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import httpx

from lockgate.bench.client import Target
from lockgate.bench.config import BenchConfig
from lockgate.bench.record import RequestRecord
from lockgate.bench.runner import make_client, run_phase
from lockgate.bench.stats import Group, Summary, summarize
from lockgate.bench.sweep import Probe, SweepResult, search
from lockgate.bench.workload import Workload

SCHEMA = "lockgate-bench/1"


class BenchRunError(RuntimeError):
    """The run could not start (server unreachable, no model): exit code 1."""


@dataclass(slots=True)
class BenchOutcome:
    result: dict[str, Any]          # what result.json holds
    records: list[RequestRecord]    # the reported phase's requests (the best probe's in a sweep)


async def resolve_model(cfg: BenchConfig) -> str:
    """--model, else the first model the server lists at /models."""
    if cfg.model:
        return cfg.model
    url = cfg.base_url.rstrip("/") + "/models"
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    try:
        async with make_client(30.0, 4) as http:
            resp = await http.get(url, headers=headers)
        data = resp.json().get("data") or []
        if resp.status_code == 200 and data and data[0].get("id"):
            return str(data[0]["id"])
        raise BenchRunError(f"GET {url} answered {resp.status_code} without a model; pass --model")
    except (httpx.HTTPError, ValueError, AttributeError) as e:
        raise BenchRunError(f"cannot list models at {url} ({type(e).__name__}: {e}); is the server up? "
                            "Pass --model to skip this") from None


def judge(g: Group, max_error_rate: float) -> tuple[bool, str]:
    """A probe passes when it completed requests, kept errors within bounds and met every SLO term."""
    if g.ok == 0:
        return False, "no request completed"
    reasons = [f"{t.term.split('<')[0]}={_fmt_s(t.observed_s)} > {t.term.split('<')[1]}s"
               for t in g.slo if not t.passed]
    if g.error_rate > max_error_rate:
        reasons.append(f"error rate {g.error_rate:.1%} > {max_error_rate:.1%}")
    return not reasons, "; ".join(reasons)


def _fmt_s(v: float | None) -> str:
    return "n/a" if v is None else ("inf" if math.isinf(v) else f"{v:.3g}s")


def _json_summary(s: Summary) -> dict[str, Any]:
    return _finite(asdict(s))


def _finite(x: Any) -> Any:
    """JSON has no inf: an SLO percentile that failed requests pushed to infinity is written as "inf"."""
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


async def run(cfg: BenchConfig, on_probe: Callable[[Probe], None] | None = None) -> BenchOutcome:
    model = await resolve_model(cfg)
    target = cfg.target(model)
    started = dt.datetime.now(dt.timezone.utc)
    sweep: SweepResult | None = None
    if cfg.sweep:
        best: dict[str, Any] = {}
        n = 0

        async def probe(rate: float) -> Probe:
            nonlocal n
            n += 1
            res = await run_phase(cfg.plan(rate), Workload(cfg.workload(phase=n)), target,
                                  timeout_s=cfg.timeout, progress=cfg.progress)
            s = summarize(res.records, res.duration_s, cfg.slo_terms)
            ok, why = judge(s.overall, cfg.max_error_rate)
            p = Probe(rate, ok, why, _json_summary(s))
            # the reported run: the highest passing probe, else the lowest failing one
            if (ok and (not best.get("ok") or rate > best["rate"])) or (
                    not best or (not best["ok"] and not ok and rate < best["rate"])):
                best.update(ok=ok, rate=rate, summary=s, records=res.records)
            if on_probe:
                on_probe(p)
            return p

        sweep = await search(probe, cfg.sweep_start, cfg.sweep_max, cfg.sweep_tolerance, cfg.max_probes)
        summary, records = best["summary"], best["records"]
    else:
        res = await run_phase(cfg.plan(), Workload(cfg.workload()), target, timeout_s=cfg.timeout,
                              progress=cfg.progress)
        summary, records = summarize(res.records, res.duration_s, cfg.slo_terms), res.records
    return BenchOutcome(build_result(cfg, target, started, summary, records, sweep), records)


def build_result(cfg: BenchConfig, target: Target, started: dt.datetime, summary: Summary,
                 records: list[RequestRecord], sweep: SweepResult | None) -> dict[str, Any]:
    from lockgate import __version__ as version

    by_status: dict[str, int] = {}
    for r in records:
        by_status[r.status] = by_status.get(r.status, 0) + 1
    out: dict[str, Any] = {
        "schema": SCHEMA,
        "label": cfg.label or f"{target.model} @ {target.base_url}",
        "started_at": started.isoformat(timespec="seconds"),
        "lockgate_version": version,
        "target": {"base_url": target.base_url, "model": target.model, "endpoint": target.endpoint,
                   "ignore_eos": target.ignore_eos},
        "config": cfg.to_json(),
        "requests": {
            "count": len(records),
            "by_status": by_status,
            "cancel_planned": sum(r.cancel_after > 0 for r in records),
            "prompt_tokens": {"mean": _mean([r.prompt_tokens for r in records]),
                              "max": max((r.prompt_tokens for r in records), default=0)},
            "max_tokens": {"mean": _mean([r.max_tokens for r in records]),
                           "max": max((r.max_tokens for r in records), default=0)},
            "records_file": "records.jsonl",
        },
        "summary": _json_summary(summary),
    }
    if sweep is not None:
        out["sweep"] = {
            "slo": [str(t) for t in cfg.slo_terms],
            "max_error_rate": cfg.max_error_rate,
            "best_rate": sweep.best_rate,
            "found": sweep.found,
            "bracketed": sweep.bracketed,
            "probes": [{"rate": p.rate, "passed": p.passed, "reason": p.reason, "summary": p.summary}
                       for p in sweep.probes],
        }
    return out


def _mean(xs: list[int]) -> float:
    return sum(xs) / len(xs) if xs else 0.0
