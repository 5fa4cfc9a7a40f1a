"""Threads that fit: the cgroup CPU quota (v2 and v1, read from fake cgroup trees), the usable cores
(affinity capped by the quota), each engine's share, the OpenMP wait policy, and the runner's
threads (the default and an explicit count above the cores, warned about)."""
from __future__ import annotations

from pathlib import Path

import pytest

from lockgate.engine import threads
from lockgate.engine.threads import (
    OPENMP_ENV,
    cgroup_cpu_limit,
    openmp_env,
    parse_cfs,
    parse_cpu_max,
    threads_per_engine,
)


def test_quota_files_parse() -> None:
    assert parse_cpu_max("max 100000\n") is None
    assert parse_cpu_max("200000 100000\n") == 2.0
    assert parse_cpu_max("150000 100000") == 1.5
    assert parse_cpu_max("50000") == 0.5  # the period defaults to 100 ms
    assert parse_cpu_max("") is None and parse_cpu_max("garbage here") is None
    assert parse_cfs("-1\n", "100000\n") is None
    assert parse_cfs("300000\n", "100000\n") == 3.0
    assert parse_cfs("x", "100000") is None and parse_cfs("100", "0") is None


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_takes_the_smallest_quota_on_the_path(tmp_path: Path) -> None:
    root, me = tmp_path / "cg", tmp_path / "self"
    _write(me, "0::/kubepods/pod1/ctr\n")
    _write(root / "cpu.max", "max 100000\n")
    _write(root / "kubepods" / "cpu.max", "400000 100000\n")
    _write(root / "kubepods" / "pod1" / "ctr" / "cpu.max", "max 100000\n")
    assert cgroup_cpu_limit(root, me) == 4.0  # a parent's quota binds the child
    _write(root / "kubepods" / "pod1" / "cpu.max", "150000 100000\n")
    assert cgroup_cpu_limit(root, me) == 1.5
    _write(me, "0::/\n")
    assert cgroup_cpu_limit(root, me) is None  # the root has none


def test_cgroup_in_a_container_and_v1(tmp_path: Path) -> None:
    root, me = tmp_path / "cg", tmp_path / "self"
    # A container: its cgroup path is the host's, not mounted inside; the mount is its own cgroup.
    _write(me, "0::/system.slice/docker-abc.scope\n")
    _write(root / "cpu.max", "200000 100000\n")
    assert cgroup_cpu_limit(root, me) == 2.0
    # cgroup v1 (hybrid layout: a v2 line with no cpu controller beside the v1 lines).
    root1 = tmp_path / "cg1"
    _write(me, "4:memory:/x\n2:cpu,cpuacct:/batch/job\n0::/\n")
    _write(root1 / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")
    _write(root1 / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    _write(root1 / "cpu,cpuacct" / "batch" / "job" / "cpu.cfs_quota_us", "100000\n")
    _write(root1 / "cpu,cpuacct" / "batch" / "job" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_limit(root1, me) == 1.0
    assert cgroup_cpu_limit(root1, tmp_path / "missing") is None  # no /proc/self/cgroup: no quota


def test_usable_cores_is_affinity_capped_by_the_quota(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(threads, "affinity_cores", lambda: 8)
    for quota, cores in ((None, 8), (2.0, 2), (1.5, 2), (0.2, 1), (32.0, 8)):
        monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda q=quota: q)
        assert threads.usable_cores() == cores, quota
    assert threads_per_engine(3, cores=8) == 2 and threads_per_engine(4, cores=2) == 1
    assert threads_per_engine(1, cores=2) == 2 and threads_per_engine(0, cores=2) == 2


def test_openmp_env_waits_passively_without_overriding_the_user() -> None:
    env = {"GOMP_SPINCOUNT": "0"}
    assert openmp_env(env) == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert env == {"GOMP_SPINCOUNT": "0", "OMP_WAIT_POLICY": "PASSIVE"}
    fresh: dict[str, str] = {}
    openmp_env(fresh)
    assert fresh == OPENMP_ENV and int(fresh["GOMP_SPINCOUNT"]) < 300_000  # below libgomp's default


def test_runner_threads_default_to_the_usable_cores_and_warn_above(monkeypatch, caplog) -> None:
    torch = pytest.importorskip("torch")
    from lockgate.engine.core import runner

    before = torch.get_num_threads()
    monkeypatch.setattr(runner, "usable_cores", lambda: 2)
    try:
        assert runner.set_threads(None) == 2 and torch.get_num_threads() == 2
        assert runner.set_threads(1) == 1 and torch.get_num_threads() == 1
        assert "contend" not in caplog.text
        with caplog.at_level("WARNING"):
            assert runner.set_threads(3) == 3  # kept, as asked
        assert "num_threads 3 is more than the 2 cores this process may use" in caplog.text
    finally:
        torch.set_num_threads(before)
