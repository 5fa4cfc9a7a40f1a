"""How many CPU threads an engine process computes with, and how its OpenMP threads wait.

One rule for every engine process (the offline `LLM`, a server's replicas and model
versions): the cores this process may use are its CPU affinity mask, capped by its cgroup's
CPU quota (a container with `--cpus 2` on a 64-core host may use 2 cores' worth of time, not
64), and they are divided evenly among the engine processes that share them.

OpenMP threads that spin while they wait (libgomp's default: about 300,000 iterations, a few
milliseconds, at every barrier and between parallel regions) burn the cores a neighbouring
process needs: two engines spinning on two cores decoded at ~1 token/s. `openmp_env` makes
them spin only briefly (long enough for the barriers inside one native decode step) and then
sleep; libgomp reads it once, when it loads, so it must be set before torch is imported.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import MutableMapping
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
# Where the cgroup v2 hierarchy (cpu.max) and v1's cpu controller (cpu.cfs_*) are mounted.
_V2_MOUNTS = ("", "unified")
_V1_MOUNTS = ("cpu", "cpu,cpuacct", "cpuacct,cpu")
# libgomp: sleep after this many spins (~0.03-0.1 ms) instead of ~300,000. The barriers inside one
# native decode step are shorter (a longer spin would not make one faster), and a waiting thread
# leaves its core to the other processes within a fraction of a millisecond.
OPENMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "10000"}


def parse_cpu_max(text: str) -> float | None:
    """cgroup v2 `cpu.max` ("QUOTA PERIOD" or "max PERIOD") as CPUs' worth of time, None without a quota."""
    parts = text.split()
    if not parts or parts[0] == "max":
        return None
    try:
        quota = int(parts[0])
        period = int(parts[1]) if len(parts) > 1 else 100_000
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def parse_cfs(quota_text: str, period_text: str) -> float | None:
    """cgroup v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us` as CPUs' worth of time (quota -1: none)."""
    try:
        quota, period = int(quota_text.strip()), int(period_text.strip())
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _levels(mount: Path, rel: str) -> list[Path]:
    """The process's cgroup directory under `mount` and each parent up to the mount itself (a
    quota anywhere above applies too). Inside a container the host's path is not mounted: the
    mount is then the container's own cgroup."""
    here = mount / rel.strip("/") if rel.strip("/") else mount
    if not here.is_dir():
        return [mount]
    out = [here]
    while out[-1] != mount and mount in out[-1].parents:
        out.append(out[-1].parent)
    return out


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, self_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The smallest CPU quota on this process's cgroup path (v2 or v1), in CPUs; None if none."""
    text = _read(self_cgroup)
    if text is None:
        return None
    limits: list[float] = []
    for line in text.splitlines():
        hid, _, rest = line.partition(":")
        controllers, _, rel = rest.partition(":")
        if hid == "0" and controllers == "":  # the v2 unified hierarchy
            for sub in _V2_MOUNTS:
                mount = root / sub if sub else root
                for d in _levels(mount, rel):
                    value = _read(d / "cpu.max")
                    limit = parse_cpu_max(value) if value is not None else None
                    if limit is not None:
                        limits.append(limit)
        elif "cpu" in controllers.split(","):
            for sub in _V1_MOUNTS:
                mount = root / sub
                if not mount.is_dir():
                    continue
                for d in _levels(mount, rel):
                    quota, period = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
                    limit = parse_cfs(quota, period) if quota is not None and period is not None else None
                    if limit is not None:
                        limits.append(limit)
                break
    return min(limits) if limits else None


def affinity_cores() -> int:
    """The CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def usable_cores() -> int:
    """The cores this process may use: its affinity mask, capped by its cgroup CPU quota (rounded
    up, as Go's and the JVM's runtimes do: 1.5 CPUs of quota run 2 threads for 75% of the time,
    more work than 1 thread), at least 1."""
    cores = affinity_cores()
    quota = cgroup_cpu_limit()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota - 1e-9)))
    return max(1, cores)


def threads_per_engine(engines: int, cores: int | None = None) -> int:
    """Each of `engines` engine processes' share of the usable cores (at least 1 thread)."""
    cores = usable_cores() if cores is None else cores
    return max(1, cores // max(1, engines))


def openmp_env(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set the OpenMP wait policy in `environ` (default: this process's) where the user has not
    set it; returns what it set. Effective only before libgomp loads (before `import torch`)."""
    env = os.environ if environ is None else environ
    added = {k: v for k, v in OPENMP_ENV.items() if k not in env}
    env.update(added)
    return added
