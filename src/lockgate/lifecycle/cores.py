"""This machine's cores shared among the server's local engine processes (versions x replicas):
each gets an equal share of the usable cores (engine/threads.py: affinity and cgroup quota, the
rule the offline `LLM` follows with one engine) as its intra-op threads unless its version set
`num_threads`. The same count at start-up (build.py) and for a version loaded at run time
(admin.py); an engine already running keeps its threads (a core sets them once, when it starts).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from lockgate.engine.config import EngineConfig
from lockgate.engine.threads import threads_per_engine, usable_cores
from lockgate.lifecycle import ray_cluster
from lockgate.lifecycle.spec import VersionSpec

log = logging.getLogger("lockgate.lifecycle")


@dataclass(frozen=True, slots=True)
class Engines:
    """One version's engine processes: up to `count` of them, all with `config`'s threads."""

    ref: str
    count: int
    config: EngineConfig


def most_engines(spec: VersionSpec) -> int:
    """The engine processes a version may run: its replicas, an autoscaled one up to its bound."""
    return max(spec.replicas, spec.autoscale.max_replicas if spec.autoscale is not None else 0)


def of_spec(spec: VersionSpec, config: EngineConfig) -> Engines:
    return Engines(spec.ref, most_engines(spec), config)


def share_threads(new: Sequence[Engines], running: Sequence[Engines] = ()) -> None:
    """Give each of `new`'s configs that leaves `num_threads` unset its share of the usable cores
    among every engine process, `running` ones (counted, never changed) included. An explicit
    choice that asks for more threads in all than there are cores is kept, with a warning (they
    would fight for the cores). One engine in all keeps `num_threads` unset: its core takes every
    usable core itself (and warns about an explicit count above them)."""
    if ray_cluster.active() is not None:  # cores on the cluster's nodes: Ray sets their threads from num_cpus
        return
    everyone = [*running, *new]
    engines = sum(e.count for e in everyone)
    if engines <= 1:
        return
    cores = usable_cores()
    each = threads_per_engine(engines, cores)
    for e in new:
        if e.config.num_threads is None:
            e.config.num_threads = each
    # A running engine with no count started alone and took every core; it is counted at its share
    # here (the warning is about explicit counts) and named apart below: a restart shares the cores.
    wanted = sum((e.config.num_threads or each) * e.count for e in everyone)
    if wanted > cores:
        log.warning("%d engine processes ask for %d threads in all on %d usable cores: they will contend "
                    "(leave num_threads unset to share the cores)", engines, wanted, cores)
    else:
        log.info("%d engine processes on %d usable cores: %s", engines, cores,
                 ", ".join(f"{e.ref} x{e.count} with {e.config.num_threads} thread(s) each" for e in new))
    alone = [e.ref for e in running if e.config.num_threads is None]
    if alone:
        log.info("%s started alone with every usable core (%d threads) and keeps them until a restart",
                 ", ".join(alone), cores)
