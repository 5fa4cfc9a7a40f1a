"""`lockgate bench` options as one checked record, and what they turn into (plan, workload, target).

Every check raises BenchInputError with a message naming the option, so the CLI
can answer bad input with exit code 2 and no traceback.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from lockgate.bench import arrivals
from lockgate.bench.client import ENDPOINTS, Target
from lockgate.bench.runner import Plan
from lockgate.bench.slo import SLOError, SLOTerm, parse_slo
from lockgate.bench.tenants import DEFAULT, Tenant, TenantError, check_unique, load_tenants, parse_tenant
from lockgate.bench.workload import LEN_DISTS, PromptItem, WorkloadConfig, WorkloadError, load_prompts

DEFAULT_DURATION_S = 30.0        # a run with neither --duration nor --num-requests
DEFAULT_PROBE_DURATION_S = 10.0  # one sweep probe


class BenchInputError(ValueError):
    """Bad options: reported as `error: ...` with exit code 2."""


@dataclass(slots=True)
class BenchConfig:
    base_url: str = "http://127.0.0.1:8000/v1"
    model: str | None = None
    api_key: str = ""
    endpoint: str = "completions"
    # load shape (exactly one, unless sweeping)
    rate: float | None = None
    arrivals: str = "poisson"
    burst: int | None = None
    burst_interval: float | None = None
    ramp: str | None = None
    concurrency: int | None = None
    max_concurrency: int = 0
    duration: float | None = None
    num_requests: int | None = None
    seed: int = 0
    # SLO and sweep
    slo: str | None = None
    sweep: bool = False
    sweep_start: float = 1.0
    sweep_max: float = 1000.0
    sweep_tolerance: float = 0.1
    max_probes: int = 12
    max_error_rate: float = 0.01
    # workload
    input_len: int = 256
    output_len: int = 128
    len_dist: str = "fixed"
    prompts: str | None = None
    prefix_groups: int = 0
    prefix_len: int = 0
    tenants_file: str | None = None
    tenant: list[str] = field(default_factory=list)
    cancel_fraction: float = 0.0
    ignore_eos: bool = False
    # run
    timeout: float = 600.0
    out: str | None = None
    progress: bool = True
    plots: bool = True
    label: str = ""
    # resolved by check()
    slo_terms: list[SLOTerm] = field(default_factory=list)
    tenants: list[Tenant] = field(default_factory=list)
    prompt_items: list[PromptItem] | None = None

    def check(self) -> BenchConfig:
        """Validate every option and resolve the derived ones; returns self."""
        def bad(msg: str) -> None:
            raise BenchInputError(msg)

        u = urlsplit(self.base_url)
        if u.scheme not in ("http", "https") or not u.netloc:
            bad(f"--base-url {self.base_url!r}: expected http(s)://host:port/v1")
        if u.path in ("", "/"):  # a bare server address: the OpenAI routes live under /v1
            self.base_url = self.base_url.rstrip("/") + "/v1"
        if self.endpoint not in ENDPOINTS:
            bad(f"--endpoint {self.endpoint!r}: expected one of {', '.join(ENDPOINTS)}")
        if self.arrivals not in arrivals.ARRIVALS:
            bad(f"--arrivals {self.arrivals!r}: expected one of {', '.join(arrivals.ARRIVALS)}")
        if self.len_dist not in LEN_DISTS:
            bad(f"--len-dist {self.len_dist!r}: expected one of {', '.join(LEN_DISTS)}")
        shapes = [n for n, v in (("--rate", self.rate), ("--burst", self.burst), ("--ramp", self.ramp),
                                 ("--concurrency", self.concurrency)) if v is not None]
        if self.sweep:
            if shapes:
                bad(f"--sweep picks the rates itself; drop {', '.join(shapes)}")
            if not self.slo:
                bad("--sweep needs --slo, e.g. --slo 'ttft_p95<0.5,tpot_p95<0.05'")
            if not (0 < self.sweep_start <= self.sweep_max and math.isfinite(self.sweep_max)):
                bad("--sweep-start must be > 0 and <= --sweep-max")
            if not 0 < self.sweep_tolerance < 1:
                bad("--sweep-tolerance must be in (0, 1), e.g. 0.1 for 10 %")
            if self.max_probes < 2:
                bad("--max-probes must be >= 2")
        elif len(shapes) != 1:
            bad("choose one load shape: --rate, --burst (with --burst-interval), --ramp FROM:TO, --concurrency "
                "or --sweep" + (f" (got {', '.join(shapes)})" if shapes else ""))
        if self.rate is not None and not (self.rate > 0 and math.isfinite(self.rate)):
            bad(f"--rate must be > 0 requests/s (got {self.rate:g})")
        if self.burst is not None:
            if self.burst < 1:
                bad("--burst must be >= 1 requests")
            if self.burst_interval is None or not self.burst_interval > 0:
                bad("--burst needs --burst-interval SECONDS > 0")
        elif self.burst_interval is not None:
            bad("--burst-interval needs --burst")
        if self.ramp is not None:
            self._ramp_rates()
            if self.duration is None:
                bad("--ramp needs --duration (the time the rate takes to go from FROM to TO)")
        if self.concurrency is not None and self.concurrency < 1:
            bad("--concurrency must be >= 1")
        if self.max_concurrency < 0:
            bad("--max-concurrency must be >= 0 (0: no cap)")
        if self.duration is not None and not (self.duration > 0 and math.isfinite(self.duration)):
            bad("--duration must be > 0 seconds")
        if self.num_requests is not None and self.num_requests < 1:
            bad("--num-requests must be >= 1")
        if not 0 <= self.max_error_rate <= 1:
            bad("--max-error-rate must be in [0, 1]")
        if self.input_len < 1 or self.output_len < 1:
            bad("--input-len and --output-len must be >= 1 tokens")
        if self.prefix_groups < 0 or self.prefix_len < 0:
            bad("--prefix-groups and --prefix-len must be >= 0")
        if (self.prefix_groups > 0) != (self.prefix_len > 0):
            bad("--prefix-groups and --prefix-len go together (both > 0)")
        if not 0 <= self.cancel_fraction <= 1:
            bad("--cancel-fraction must be in [0, 1]")
        if not self.timeout > 0:
            bad("--timeout must be > 0 seconds")
        if self.tenants_file and self.tenant:
            bad("give tenants with --tenants FILE or --tenant (repeatable), not both")
        try:
            self.slo_terms = parse_slo(self.slo) if self.slo else []
            if self.tenants_file:
                self.tenants = load_tenants(self.tenants_file)
            elif self.tenant:
                self.tenants = [parse_tenant(t) for t in self.tenant]
            else:
                self.tenants = [DEFAULT]
            check_unique(self.tenants)
            self.prompt_items = load_prompts(self.prompts) if self.prompts else None
        except (SLOError, TenantError, WorkloadError) as e:
            bad(f"--slo {self.slo!r}: {e}" if isinstance(e, SLOError) else str(e))
        if self.duration is None and self.num_requests is None:
            self.duration = DEFAULT_PROBE_DURATION_S if self.sweep else DEFAULT_DURATION_S
        return self

    def _ramp_rates(self) -> tuple[float, float]:
        try:
            a, b = (float(x) for x in (self.ramp or "").split(":"))
        except ValueError:
            raise BenchInputError(f"--ramp {self.ramp!r}: expected FROM:TO requests/s, e.g. 1:20") from None
        if not (a >= 0 and b >= 0 and a + b > 0 and math.isfinite(a + b)):
            raise BenchInputError(f"--ramp {self.ramp!r}: rates must be >= 0 and not both 0")
        return a, b

    def plan(self, rate: float | None = None) -> Plan:
        """The load phase; `rate` overrides the shape with a fixed rate (a sweep probe)."""
        mc = self.max_concurrency
        try:
            if rate is not None or self.rate is not None:
                r = rate if rate is not None else self.rate
                return Plan(arrivals.fixed_rate(r, self.arrivals, self.seed, self.duration, self.num_requests),
                            max_concurrency=mc, label=f"{r:.4g} req/s")
            if self.burst is not None:
                return Plan(arrivals.bursts(self.burst, self.burst_interval or 1.0, self.duration, self.num_requests),
                            max_concurrency=mc, label=f"bursts of {self.burst}")
            if self.ramp is not None:
                a, b = self._ramp_rates()
                return Plan(arrivals.ramp(a, b, self.duration or 0.0, self.arrivals, self.seed, self.num_requests),
                            max_concurrency=mc, label=f"ramp {a:g}->{b:g} req/s")
        except ValueError as e:
            raise BenchInputError(str(e)) from None
        return Plan(concurrency=self.concurrency or 1, duration_s=self.duration,
                    count=self.num_requests, label=f"concurrency {self.concurrency}")

    def workload(self, phase: int = 0) -> WorkloadConfig:
        return WorkloadConfig(self.input_len, self.output_len, self.len_dist, self.prompt_items, self.prefix_groups,
                              self.prefix_len, self.tenants, self.cancel_fraction, self.seed, phase)

    def target(self, model: str) -> Target:
        return Target(self.base_url, model, self.endpoint, self.api_key, self.ignore_eos)

    def shape(self) -> str:
        if self.sweep:
            return "sweep"
        return next(n for n, v in (("rate", self.rate), ("burst", self.burst), ("ramp", self.ramp),
                                   ("concurrency", self.concurrency)) if v is not None)

    def to_json(self) -> dict[str, Any]:
        """The options as run (unset ones left out); keys never included, only whether one was set."""
        skip = {"api_key", "tenant", "tenants", "slo_terms", "prompt_items"}
        d = {k: v for k in self.__slots__  # type: ignore[attr-defined]
             if k not in skip and (v := getattr(self, k)) is not None}
        d["shape"] = self.shape()
        d["api_key_set"] = bool(self.api_key)
        d["slo_terms"] = [str(t) for t in self.slo_terms]
        d["tenants"] = [{"name": t.name, "weight": t.weight, "class": t.priority_class, "key_set": bool(t.key)}
                        for t in self.tenants]
        d["num_prompts_in_file"] = len(self.prompt_items) if self.prompt_items else 0
        return d
