"""/metrics for several API workers on one port (`lockgate serve --api-workers N`): one page for
the whole server, whichever worker answers the scrape.

Two kinds of metrics, merged two ways:
- those each request feeds (prometheus_client's Counters and Histograms, and one Gauge) use
  prometheus_client's multiprocess mode: every worker's values live in per-process files in
  the server's run directory (`use_multiprocess`, before any metric is made), summed at scrape
  time (the Gauge, a configured bound, by its maximum). A dead worker's counts stay counted.
- those computed at scrape time (engine state, versions, replicas, autoscaler, SLO trackers):
  each worker writes its own every `SNAPSHOT_S` (`write_snapshot`); a scrape takes the
  answering worker's live and the others' latest. Families a worker counts on its own
  (`SUMMED`: requests in flight, per version and routed, SLO events, shadow requests) are
  summed; the rest describe the shared cores and the primary worker's fleets and autoscaler,
  the same seen from any worker, so the primary's (the lowest worker present) is shown.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

import msgspec
from prometheus_client import CollectorRegistry, generate_latest, values
from prometheus_client.core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

SNAPSHOT_S = 1.0
VALUES_DIR = "metrics"  # prometheus_client's per-process files
SNAPSHOT_DIR = "scrape"  # each worker's scrape-time families

# Scrape-time families that each worker counts for itself: summed over the workers.
SUMMED = frozenset({
    "lockgate:num_requests_in_flight",
    "lockgate:model_version_requests_in_flight",
    "lockgate:model_version_requests",
    "lockgate:model_version_time_to_first_token_seconds",
    "lockgate:shadow_requests",
    "lockgate:replica_requests_routed",
    "lockgate:slo_requests",
})


def use_multiprocess(run_dir: Path) -> None:
    """This process's request metrics in files under `run_dir` (call before any metric is made)."""
    directory = run_dir / VALUES_DIR
    directory.mkdir(exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(directory)
    pid = os.getpid()  # a worker never forks a Python that keeps its metrics: no getpid() per observation
    values.ValueClass = values.MultiProcessValue(lambda: pid)


class _Sample(msgspec.Struct, array_like=True):
    name: str
    labels: dict[str, str]
    value: float


class _Family(msgspec.Struct, array_like=True):
    name: str
    documentation: str
    type: str
    unit: str
    samples: list[_Sample]


def _encode(families: Iterable[Metric]) -> bytes:
    return msgspec.msgpack.encode([
        _Family(f.name, f.documentation, f.type, f.unit,
                [_Sample(s.name, dict(s.labels), float(s.value)) for s in f.samples]) for f in families])


def _decode(data: bytes) -> list[Metric]:
    out = []
    for f in msgspec.msgpack.decode(data, type=list[_Family]):
        m = Metric(f.name, f.documentation, f.type, f.unit)
        for s in f.samples:
            m.add_sample(s.name, s.labels, s.value)
        out.append(m)
    return out


def merge(by_worker: dict[int, list[Metric]]) -> list[Metric]:
    """The workers' scrape-time families as one server's (see the module's docstring)."""
    out: dict[str, Metric] = {}
    sums: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for worker in sorted(by_worker):
        for fam in by_worker[worker]:
            if fam.name in SUMMED:
                if fam.name not in out:
                    out[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
                    sums[fam.name] = {}
                acc = sums[fam.name]
                for s in fam.samples:
                    key = (s.name, tuple(sorted(s.labels.items())))
                    acc[key] = acc.get(key, 0.0) + s.value
            elif fam.name not in out:  # the lowest worker's: the primary's when it is there
                out[fam.name] = fam
    for name, acc in sums.items():
        for (sample, labels), value in acc.items():
            out[name].add_sample(sample, dict(labels), value)
    return list(out.values())


class _Families:
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return self.families


class WorkerMetrics:
    """One worker's side of the merged page: its snapshot out, everyone's in."""

    def __init__(self, run_dir: Path, worker: int) -> None:
        self.values_dir = run_dir / VALUES_DIR
        self.snapshot_dir = run_dir / SNAPSHOT_DIR
        self.snapshot_dir.mkdir(exist_ok=True)
        self.worker = worker

    def write_snapshot(self, families: Iterable[Metric]) -> None:
        path = self.snapshot_dir / f"{self.worker}.msgpack"
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(_encode(families))
        os.replace(tmp, path)

    def _others(self) -> dict[int, list[Metric]]:
        out: dict[int, list[Metric]] = {}
        with contextlib.suppress(FileNotFoundError), os.scandir(self.snapshot_dir) as it:
            for entry in it:
                stem, _, ext = entry.name.partition(".")
                if ext != "msgpack" or not stem.isdigit() or int(stem) == self.worker:
                    continue
                try:
                    out[int(stem)] = _decode(Path(entry.path).read_bytes())
                except (OSError, msgspec.DecodeError):
                    continue  # being replaced, or from a dying worker: the next scrape has it
        return out

    def render(self, own: list[Metric]) -> bytes:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=str(self.values_dir))
        registry.register(_Families(merge({self.worker: own, **self._others()})))
        return generate_latest(registry)
