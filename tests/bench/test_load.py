"""Load shapes, workloads, tenants and the sweep's search, without a server."""
from __future__ import annotations

import asyncio
import json
import statistics
from pathlib import Path

import pytest

from lockgate.bench import arrivals
from lockgate.bench.sweep import Probe, search
from lockgate.bench.tenants import TenantError, load_tenants, parse_tenant
from lockgate.bench.workload import WORDS, Workload, WorkloadConfig, WorkloadError, load_prompts, sample_len


# ---- arrivals

def test_poisson_rate_and_reproducibility() -> None:
    ts = arrivals.fixed_rate(50.0, "poisson", seed=3, duration_s=200.0)
    assert len(ts) == 50 * 200  # over a duration: exactly rate x duration, at random times
    assert ts == sorted(ts) and 0 <= ts[0] and ts[-1] < 200.0
    gaps = [b - a for a, b in zip(ts, ts[1:])]
    assert statistics.mean(gaps) == pytest.approx(1 / 50, rel=0.05)
    assert statistics.stdev(gaps) == pytest.approx(1 / 50, rel=0.1)  # exponential: sd == mean
    assert ts == arrivals.fixed_rate(50.0, "poisson", seed=3, duration_s=200.0)
    assert ts != arrivals.fixed_rate(50.0, "poisson", seed=4, duration_s=200.0)
    assert sum(t < 100.0 for t in ts) == pytest.approx(5000, abs=200)  # uniform over the window
    # by count: a free Poisson process (exponential gaps, the first after one gap)
    free = arrivals.fixed_rate(50.0, "poisson", seed=3, count=10000)
    assert len(free) == 10000 and free[0] > 0
    assert statistics.mean(b - a for a, b in zip(free, free[1:])) == pytest.approx(1 / 50, rel=0.05)
    assert len(arrivals.fixed_rate(50.0, "poisson", seed=3, duration_s=10.0, count=7)) == 7


def test_constant_rate_and_count() -> None:
    assert arrivals.fixed_rate(4.0, "constant", 0, duration_s=1.0) == [0.0, 0.25, 0.5, 0.75]
    assert arrivals.fixed_rate(4.0, "constant", 0, count=3) == [0.0, 0.25, 0.5]
    assert len(arrivals.fixed_rate(4.0, "constant", 0, duration_s=10.0, count=6)) == 6  # whichever ends first
    with pytest.raises(ValueError):
        arrivals.fixed_rate(0.0, "constant", 0, duration_s=1.0)


def test_ramp_follows_a_linear_rate() -> None:
    ts = arrivals.ramp(0.0, 100.0, 10.0, "constant", 0)
    assert len(ts) == pytest.approx(500, abs=1)  # the area under the rate
    first_half = sum(t < 5.0 for t in ts)
    assert first_half == pytest.approx(125, abs=1)  # a quarter of the area lies in the first half
    down = arrivals.ramp(100.0, 0.0, 10.0, "poisson", 1)
    assert sum(t < 5.0 for t in down) / len(down) == pytest.approx(0.75, abs=0.05)
    assert all(b >= a for a, b in zip(down, down[1:]))


def test_bursts() -> None:
    assert arrivals.bursts(3, 2.0, duration_s=5.0) == [0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 4.0, 4.0, 4.0]


# ---- workload

def test_synthetic_lengths_and_determinism() -> None:
    w = Workload(WorkloadConfig(input_len=40, output_len=20, len_dist="uniform", seed=1))
    specs = [w.spec(i) for i in range(300)]
    assert specs[5] == Workload(WorkloadConfig(input_len=40, output_len=20, len_dist="uniform", seed=1)).spec(5)
    lens = [len(s.prompt.split()) for s in specs]
    assert min(lens) >= 20 and max(lens) <= 60 and statistics.mean(lens) == pytest.approx(40, rel=0.05)
    assert all(10 <= s.max_tokens <= 30 for s in specs)
    assert all(set(s.prompt.split()) <= set(WORDS) for s in specs)
    fixed = Workload(WorkloadConfig(input_len=7, output_len=3)).spec(0)
    assert len(fixed.prompt.split()) == 7 and fixed.max_tokens == 3


def test_lognormal_mean_and_tail() -> None:
    import random

    rng = random.Random(0)
    xs = [sample_len(200, "lognormal", rng) for _ in range(20000)]
    assert statistics.mean(xs) == pytest.approx(200, rel=0.05)
    assert statistics.median(xs) < 0.8 * 200  # skewed: the median sits well below the mean
    assert max(xs) <= 8 * 200 and min(xs) >= 1


def test_prefix_groups_share_their_prefix() -> None:
    w = Workload(WorkloadConfig(input_len=10, output_len=5, prefix_groups=3, prefix_len=30, seed=2))
    specs = [w.spec(i) for i in range(60)]
    by_group: dict[int, set[str]] = {}
    for s in specs:
        words = s.prompt.split()
        assert len(words) == 40
        by_group.setdefault(s.prefix_group, set()).add(" ".join(words[:30]))
    assert sorted(by_group) == [0, 1, 2]
    assert all(len(p) == 1 for p in by_group.values())          # one prefix per group
    assert len({next(iter(p)) for p in by_group.values()}) == 3  # different across groups
    assert len({s.prompt for s in specs}) == 60                  # the rest differs


def test_tenant_split_by_weight_and_cancel_fraction() -> None:
    tenants = [parse_tenant("a:ka:3:interactive"), parse_tenant("b::1")]
    w = Workload(WorkloadConfig(input_len=5, output_len=20, tenants=tenants, cancel_fraction=0.25, seed=5))
    specs = [w.spec(i) for i in range(4000)]
    share_a = sum(s.tenant.name == "a" for s in specs) / len(specs)
    assert share_a == pytest.approx(0.75, abs=0.03)
    cancels = [s.cancel_after for s in specs if s.cancel_after]
    assert len(cancels) / len(specs) == pytest.approx(0.25, abs=0.03)
    assert min(cancels) >= 1 and max(cancels) <= 19


def test_prompts_file(tmp_path: Path) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "hello there", "max_tokens": 7}\n\n'
                 '{"messages": [{"role": "user", "content": "hi"}]}\n')
    items = load_prompts(str(f))
    assert [(i.prompt, i.max_tokens) for i in items] == [("hello there", 7), (None, None)]
    w = Workload(WorkloadConfig(output_len=11, prompts=items, seed=0))
    specs = [w.spec(i) for i in range(4)]
    assert sorted((s.prompt or "", s.max_tokens) for s in specs) == [("", 11), ("", 11), ("hello there", 7),
                                                                      ("hello there", 7)]


@pytest.mark.parametrize("content, fragment", [
    ("", "no prompts"), ("not json\n", "not JSON"), ("[1]\n", "expected an object"),
    ('{"prompt": "a", "messages": []}\n', "exactly one"), ('{"prompt": ""}\n', "non-empty"),
    ('{"prompt": "a", "max_tokens": 0}\n', "max_tokens"), ('{"messages": [{"content": "x"}]}\n', "messages"),
])
def test_prompts_file_errors(tmp_path: Path, content: str, fragment: str) -> None:
    f = tmp_path / "p.jsonl"
    f.write_text(content)
    with pytest.raises(WorkloadError, match=fragment):
        load_prompts(str(f))
    with pytest.raises(WorkloadError, match="no such file"):
        load_prompts(str(tmp_path / "missing.jsonl"))


def test_tenants_parsing(tmp_path: Path) -> None:
    t = parse_tenant("acme:sk-1:2.5:batch")
    assert (t.name, t.key, t.weight, t.priority_class) == ("acme", "sk-1", 2.5, "batch")
    for bad in ("acme", "acme:k", "acme:k:0", "acme:k:x", ":k:1", "a:k:1:c:d", "a b:k:1"):
        with pytest.raises(TenantError):
            parse_tenant(bad)
    f = tmp_path / "t.json"
    f.write_text(json.dumps({"tenants": [{"name": "a", "key": "k", "weight": 2, "class": "interactive"},
                                         {"name": "b"}]}))
    ts = load_tenants(str(f))
    assert [(x.name, x.weight, x.priority_class) for x in ts] == [("a", 2.0, "interactive"), ("b", 1.0, "")]
    f.write_text('[{"name": "a", "colour": "red"}]')
    with pytest.raises(TenantError, match="unknown fields"):
        load_tenants(str(f))


# ---- sweep search

def _run_search(capacity: float, start: float, max_rate: float = 1000.0, tol: float = 0.05,
                max_probes: int = 30) -> tuple[float, list[float], bool, bool]:
    async def probe(rate: float) -> Probe:
        return Probe(rate, rate <= capacity, "", {})

    res = asyncio.run(search(probe, start, max_rate, tol, max_probes))
    return res.best_rate, [p.rate for p in res.probes], res.found, res.bracketed


def test_search_grows_then_bisects_to_the_tolerance() -> None:
    best, rates, found, bracketed = _run_search(capacity=37.0, start=1.0)
    assert found and bracketed
    assert rates[:7] == [1, 2, 4, 8, 16, 32, 64]  # exponential growth until the first failure
    assert 37.0 / 1.05 <= best <= 37.0
    assert len(rates) < 15


def test_search_halves_when_the_first_probe_fails() -> None:
    best, rates, found, _ = _run_search(capacity=3.0, start=40.0)
    assert rates[:5] == [40, 20, 10, 5, 2.5]
    assert found and 3.0 / 1.05 <= best <= 3.0


def test_search_stops_at_max_rate_and_max_probes() -> None:
    best, rates, found, bracketed = _run_search(capacity=1e9, start=10.0, max_rate=50.0)
    assert (best, found, bracketed) == (50.0, True, False) and rates == [10, 20, 40, 50]
    _, rates, _, _ = _run_search(capacity=37.0, start=1.0, max_probes=4)
    assert len(rates) == 4
    best, _, found, _ = _run_search(capacity=0.0, start=1.0)
    assert (best, found) == (0.0, False)
