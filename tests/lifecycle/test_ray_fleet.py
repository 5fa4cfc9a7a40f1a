"""Replicas as Ray actors, their cores reached over CurveZMQ TCP (`serve --ray`, issue 20).

Without Ray: the remote transport against `CoreKeeper` driven directly (a core in bind mode on
loopback), nothing imports Ray unless `--ray` is given, and `--ray` without Ray fails at once.

With Ray (skipped when it is not importable): ONE server started with `--ray local` for the
module, i.e. one local cluster, two fake-engine replicas placed with `num_cpus: 0.5` each (two
fit a 2-CPU cluster). Killing a replica's actor under load loses nothing that had not started,
Ray brings it back, and a core refuses clients without the cluster's keys.
"""
from __future__ import annotations

import asyncio
import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import msgspec
import pytest
import zmq

from lockgate.bench.procs import ServerProcess, children, pid_alive
from lockgate.engine.config import EngineConfig
from lockgate.engine.curve import CurveClient, CurveKeys
from lockgate.engine.errors import EngineDeadError
from lockgate.engine.frontend.client import AsyncEngineClient
from lockgate.engine.frontend.kv_events_sub import KVEventSubscriber
from lockgate.engine.frontend.remote_transport import RemoteCoreInfo, RemoteTransport
from lockgate.engine.messages import encode_config
from lockgate.engine.sampling_params import SamplingParams
from lockgate.lifecycle.ray_cluster import check_address
from lockgate.lifecycle.ray_replica import CoreKeeper, bundle
from lockgate.lifecycle.placement import Placement
from lockgate.server.launch import bare_ray_is_local
from tests.server.conftest import wait_for

HAS_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="ray is not installed (pip install 'lockgate[ray]')")
ADMIN = "sk-admin-ray-test"
MODEL = "fleet"
REPLICA_HEADER = "x-lockgate-replica"


# ---- without Ray -------------------------------------------------------------------------------


class KeeperHost:
    """`CoreHost` over a `CoreKeeper` in this process: the actor's body without Ray."""

    def __init__(self, keys: CurveKeys) -> None:
        self.curve = keys.client
        self.keeper = CoreKeeper("test@v1", keys.server.to_env(), host="127.0.0.1")
        self.closed = False

    async def start_core(self, config: EngineConfig, generation: int) -> RemoteCoreInfo:
        text = await self.keeper.start_core(encode_config(config).decode(), generation)
        return msgspec.json.decode(text, type=RemoteCoreInfo)

    async def wait_core(self, generation: int) -> int:
        return await self.keeper.wait_core(generation)

    def kill_core(self, generation: int) -> None:
        self.keeper.kill_core(generation)

    async def close(self) -> None:
        self.closed = True


async def _until(cond, timeout: float = 30.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


def test_remote_core_over_curve_dies_and_restarts_like_a_local_one() -> None:
    async def main() -> None:
        keys = CurveKeys.generate()
        host = KeeperHost(keys)
        config = EngineConfig(load_format="fake", num_kv_blocks=64, max_model_len=512, fake_step_delay_s=0.02)
        client = AsyncEngineClient(config, transport=RemoteTransport(host), max_restart_backoff_s=1.0,
                                   stall_timeout_s=None)
        await client.start()
        events: list[object] = []
        sub = KVEventSubscriber(*client.kv_event_addresses, events.extend, lambda: events.append("reset"),
                                curve=client.kv_event_curve)
        try:
            assert client.core_node == "127.0.0.1" and client.core_pid == client.engine_pid
            pub, replay = client.kv_event_addresses
            assert pub.startswith("tcp://127.0.0.1:") and replay.startswith("tcp://127.0.0.1:")
            assert {"start_call_s", "process_start_s", "load_s", "total_s"} <= set(client.core_timings)
            await sub.start()
            outs = [o async for o in client.generate("a", list(range(100, 140)), SamplingParams(max_tokens=3))]
            assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 3
            await _until(lambda: any(type(e).__name__ == "BlockStored" for e in events))  # CURVE subscriber

            first_pid = client.core_pid
            stream = client.add_request("b", [1, 2, 3], SamplingParams(max_tokens=400))
            await stream.__anext__()
            os.kill(first_pid, signal.SIGKILL)  # type: ignore[arg-type]
            with pytest.raises(EngineDeadError):
                async for _ in stream:
                    pass
            await _until(lambda: client.num_restarts == 1 and client.healthy)
            assert client.core_pid != first_pid and client.kv_event_addresses != (pub, replay)  # new ports
            outs = [o async for o in client.generate("c", [5, 6, 7], SamplingParams(max_tokens=2))]
            assert outs[-1].finished
        finally:
            await sub.close()
            await client.shutdown()
        assert host.closed and not pid_alive(client.core_pid)  # type: ignore[arg-type]

    asyncio.run(main())


def test_ray_settings_are_checked() -> None:
    for good in ("local", "auto", "10.0.0.5:6379", "ray://head.example:10001", "[::1]:6379"):
        assert check_address(good) == good
    for bad in ("", "remote", "10.0.0.5", "host:0", "host:99999", "a b:1", "local;rm"):
        with pytest.raises(ValueError, match="--ray"):
            check_address(bad)
    assert bare_ray_is_local(["--ray"]) == ["--ray", "local"]
    assert bare_ray_is_local(["--ray", "--replicas", "2"]) == ["--ray", "local", "--replicas", "2"]
    assert bare_ray_is_local(["--ray", "auto", "--port", "1"]) == ["--ray", "auto", "--port", "1"]
    assert bare_ray_is_local(["--", "--ray"]) == ["--", "--ray"]
    assert bundle(Placement(0.5, 0.0, {"gpu_80gb": 1.0})) == {"CPU": 0.5, "gpu_80gb": 1.0}


def _python(code: str, env: dict[str, str] | None = None, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          timeout=120, env=env, cwd=Path(__file__).parents[2])


def test_without_the_flag_nothing_imports_ray() -> None:
    proc = _python("""
        import sys
        import lockgate.cli, lockgate.server.launch, lockgate.lifecycle.registry, lockgate.lifecycle.ray_cluster
        from lockgate.engine.config import EngineConfig
        from lockgate.server.app import build_app
        from lockgate.server.config import ServerConfig
        import tempfile
        build_app(EngineConfig(load_format="fake"), ServerConfig(data_dir=tempfile.mkdtemp(), replicas=2))
        assert "ray" not in sys.modules, "ray was imported"
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


def test_ray_flag_without_ray_fails_at_once_with_the_install_command(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['ray'] = None  # import ray fails\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    t0 = time.monotonic()
    proc = _python("import sys; sys.argv[0] = 'lockgate'; from lockgate.cli import app; app()", env,
                   "serve", "--ray", "--load-format", "fake", "--data-dir", str(tmp_path / "data"))
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "pip install 'lockgate[ray]'" in proc.stderr and "ray==2.60.0" in proc.stderr, proc.stderr
    assert time.monotonic() - t0 < 60 and not (tmp_path / "data").exists()  # before anything started


# ---- with Ray: one server, one local cluster ---------------------------------------------------


def _client(srv: ServerProcess, key: str) -> httpx.Client:
    return httpx.Client(base_url=srv.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def _version(admin: httpx.Client) -> dict:
    return next(v for v in admin.get(f"/admin/models/{MODEL}").json()["versions"] if v["version"] == "v1")


def _replicas(admin: httpx.Client) -> list[dict]:
    return _version(admin)["replicas"]["list"]


def _all_ready(admin: httpx.Client, n: int = 2) -> bool:
    reps = _replicas(admin)
    return len(reps) == n and all(r["state"] == "ready" and r["healthy"] for r in reps)


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1].split()[1])


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")


def _descendants(pid: int) -> set[int]:
    out, todo = set(), [pid]
    while todo:
        for kid in children(todo.pop()):
            if kid not in out:
                out.add(kid)
                todo.append(kid)
    return out


class RayFleet:
    def __init__(self, srv: ServerProcess) -> None:
        self.srv = srv
        self.admin = _client(srv, ADMIN)
        t = self.admin.post("/admin/tenants", json={"name": "a", "models": ["*"]}).json()
        self.user = _client(srv, self.admin.post(f"/admin/tenants/{t['id']}/keys", json={"name": "a"}).json()["key"])


@pytest.fixture(scope="module")
def ray_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayFleet]:
    if not HAS_RAY:
        pytest.skip("ray is not installed")
    tmp = tmp_path_factory.mktemp("ray")
    config = tmp / "models.yaml"
    # num_cpus 0.5: both replicas' bundles fit a 2-CPU cluster with room to spare.
    config.write_text(f"models:\n  - name: {MODEL}\n    versions:\n"
                      "      - {version: v1, path: default, replicas: 2, placement: {num_cpus: 0.5}}\n")
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    srv = ServerProcess(["--ray", "local", "--config", str(config), "--load-format", "fake",
                         "--fake-step-delay", "0.02", "--max-num-seqs", "2", "--admin-key", ADMIN,
                         "--data-dir", str(tmp / "data")], tmp / "server.log", env=env)
    try:
        fleet = RayFleet(srv)
        assert wait_for(lambda: _all_ready(fleet.admin), 60), srv.log_text()[-3000:]
        yield fleet
    finally:
        srv.stop()


def _complete(c: httpx.Client, prompt: str, max_tokens: int = 2) -> httpx.Response:
    return c.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": max_tokens})


@needs_ray
def test_replicas_are_ray_actors_placed_by_resources(ray_fleet: RayFleet) -> None:
    version = _version(ray_fleet.admin)
    assert version["placement"]["num_cpus"] == 0.5
    reps = _replicas(ray_fleet.admin)
    for r in reps:
        assert pid_alive(r["pid"]) and "lockgate.engine.core --bind" in _cmdline(r["pid"])
        assert "ray::CoreKeeper" in _cmdline(_parent(r["pid"]))  # a Ray actor's child, not the server's
        assert r["kv_events"]["publisher"].startswith("tcp://") and r["kv_events"]["replay"].startswith("tcp://")
    assert _parent(reps[0]["pid"]) != _parent(reps[1]["pid"])  # one actor each
    with ThreadPoolExecutor(8) as pool:
        rs = list(pool.map(lambda i: _complete(ray_fleet.user, f"question {i} " * 20, 4), range(8)))
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs]
    assert {r.headers[REPLICA_HEADER] for r in rs} == {f"{MODEL}@v1/0", f"{MODEL}@v1/1"}
    assert "replicas run as Ray actors on local (started here)" in ray_fleet.srv.log_text()


@needs_ray
def test_a_core_refuses_clients_without_the_cluster_keys(ray_fleet: RayFleet) -> None:
    replay = _replicas(ray_fleet.admin)[0]["kv_events"]["replay"]
    ctx = zmq.Context()
    try:
        stranger_public, stranger_secret = zmq.curve_keypair()
        for curve in (None, CurveClient(stranger_public, stranger_secret, zmq.curve_keypair()[0])):
            sock = ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            if curve is not None:
                curve.apply(sock)
            sock.connect(replay)
            sock.send_multipart([b"", (0).to_bytes(8, "big")])  # a replay from seq 0: a keyed client gets the cache
            assert not sock.poll(1500), "an unauthenticated client got an answer"
            sock.close(linger=0)
    finally:
        ctx.term()
    port = replay.rsplit(":", 1)[1]

    def logged(cause: str) -> bool:
        return any("refused a connection to its kv-replay socket at tcp://" in line and f":{port}:" in line
                   and cause in line for line in ray_fleet.srv.log_text().splitlines())

    # A plain client is named as such when ZeroMQ reports the mechanism mismatch; on a busy machine it
    # may report only a handshake that did not complete. Either way the attempt is logged.
    assert wait_for(lambda: (logged("without CURVE") or logged("handshake that did not complete"))
                    and logged("wrong server key"), 15), ray_fleet.srv.log_text()[-3000:]


@needs_ray
def test_killed_actor_loses_nothing_not_started_and_ray_brings_it_back(ray_fleet: RayFleet) -> None:
    admin = ray_fleet.admin
    # 16 requests of 20 tokens at 0.02 s a step, 2 running per replica: most wait in the queues. The
    # victim is the replica holding the most (the router's split depends on timing): at least 8 at first.
    with ThreadPoolExecutor(16) as pool:
        futs = [pool.submit(_complete, ray_fleet.user, f"load {i} " * 10, 20) for i in range(16)]
        seen: list[list[int]] = []

        def loaded() -> bool:
            seen.append([r["in_flight"] for r in _replicas(admin)])
            return max(seen[-1]) >= 4

        assert wait_for(loaded, 10), seen
        index = max(range(2), key=lambda i: seen[-1][i])
        victim = _replicas(admin)[index]
        actor = _parent(victim["pid"])
        os.kill(actor, signal.SIGKILL)  # the actor's worker process; its core dies with it
        rs = [f.result() for f in futs]
    outcome = Counter(r.status_code == 200 or r.json()["error"]["code"] for r in rs)
    # Only those running on the victim (max_num_seqs 2) had started: they fail, clearly; the rest are rerouted.
    assert outcome[True] >= 14 and set(outcome) <= {True, "engine_dead"}, [r.text for r in rs if r.status_code != 200]
    assert _version(admin)["replicas"]["rerouted"] >= 1  # queued there, not started: sent to the other one
    assert wait_for(lambda: not pid_alive(victim["pid"]), 5)
    assert wait_for(lambda: _all_ready(admin), 60)  # Ray restarted the actor; the supervisor a core in it
    now = _replicas(admin)[index]
    assert now["restarts"] == 1 and now["pid"] != victim["pid"]
    new_actor = _parent(now["pid"])
    assert new_actor != actor and "ray::CoreKeeper" in _cmdline(new_actor)
    name = f"{MODEL}@v1/{index}"
    assert wait_for(lambda: any(_complete(ray_fleet.user, f"again {i}").headers.get(REPLICA_HEADER) == name
                                for i in range(4)), 20)  # it takes traffic again


@needs_ray
def test_server_exit_stops_the_cluster_it_started(ray_fleet: RayFleet) -> None:
    spawned = _descendants(ray_fleet.srv.pid)
    assert any("raylet" in _cmdline(p) for p in spawned if pid_alive(p))
    ray_fleet.srv.stop()
    assert ray_fleet.srv.proc.returncode == 0
    assert wait_for(lambda: not any(pid_alive(p) for p in spawned), 20), [_cmdline(p) for p in spawned if pid_alive(p)]
