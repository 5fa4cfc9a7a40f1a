"""A replica as a Ray actor: `CoreKeeper` on the node, `RayCoreHost` in the API process.

`serve --ray` makes every replica of every version a Ray actor (`CoreKeeper`) placed by the
resources its version asks for (`VersionSpec.placement`), in a placement group of its own
(one bundle per replica today; a replica's tensor-parallel shards would be more bundles of
the same group, kept together). Ray places and restarts; it never carries a request:

- The actor starts the engine core on its node as a child process in bind mode (`python -m
  lockgate.engine.core --bind NODE_IP`): TCP sockets secured by CurveZMQ (the server keys come
  to the actor as arguments, and go to the core in its environment, never on a command line).
  It answers where the core listens; the API process connects to it (`RemoteTransport`).
- The checkpoint is read from the model path on the actor's node (memory-mapped where the
  loader maps it: a node that holds the files does not copy them); no weights travel through
  Ray's object store.
- `wait_core` returns when the core exits: the API process's supervisor awaits it as it awaits
  a local process. If the actor dies (its process killed, its node lost) the call fails and
  `RayCoreHost.wait_core` reports the core dead: the core died with it (`PR_SET_PDEATHSIG`,
  and it polls its parent). Ray restarts the actor (`max_restarts=-1`) in the same bundle;
  the supervisor's restart asks it for a new core. An actor killed for good (`ray.kill`) is
  made again by the next `start_core`.

`CoreKeeper` imports nothing of Ray (tests drive it directly as a host); Ray is imported only
by `RayCoreHost`, i.e. only under `serve --ray`.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import sys
import time
from typing import Any

import msgspec

from lockgate.engine.config import EngineConfig
from lockgate.engine.curve import ENV_VAR, CurveClient, CurveKeys
from lockgate.engine.errors import EngineStartError
from lockgate.engine.frontend.remote_transport import LOST, RemoteCoreInfo
from lockgate.engine.messages import encode_config
from lockgate.lifecycle.placement import Placement

log = logging.getLogger("lockgate.lifecycle")


class CoreKeeper:
    """The actor's body: one engine core at a time on this node (see the module docstring)."""

    def __init__(self, label: str, curve_env: str, host: str | None = None) -> None:
        self._label = label  # NAME@VERSION, for the log
        self._curve_env = curve_env  # CurveServer.to_env(): handed to the core, not kept anywhere else
        self._host = host or _node_ip()
        self._proc: asyncio.subprocess.Process | None = None
        self._generation = 0
        self._started = time.monotonic()

    async def ping(self) -> str:
        """The node's address (the first answer also says the actor is up)."""
        return self._host

    async def start_core(self, config_json: str, generation: int) -> str:
        """Start generation `generation`'s core (stopping any earlier one); returns `RemoteCoreInfo` as
        JSON once its sockets are bound (it loads the model after that; the API process waits for it)."""
        await self._stop_current()
        t0 = time.monotonic()
        read_fd, write_fd = os.pipe()
        try:
            # Its stdout/stderr are the actor's: Ray's worker logs, shown by the API process's driver.
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "lockgate.engine.core", "--bind", self._host,
                "--addresses-fd", str(write_fd), "--config", config_json, "--generation", str(generation),
                pass_fds=(write_fd,), env={**os.environ, ENV_VAR: self._curve_env})
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        self._proc, self._generation = proc, generation
        line = await asyncio.to_thread(_read_line, read_fd)
        if not line:
            rc = await proc.wait()
            raise RuntimeError(f"the engine core exited before binding its sockets (exit code {rc}; its "
                               "error is in this actor's log)")
        addresses = msgspec.json.decode(line, type=dict[str, str | None])
        info = RemoteCoreInfo(node=self._host, pid=proc.pid, input=addresses["input"] or "",
                              output=addresses["output"] or "", kv_events=addresses.get("kv_events"),
                              kv_replay=addresses.get("kv_replay"),
                              timings={"process_start_s": time.monotonic() - t0})
        log.info("%s: engine core %d (generation %d) listening on %s", self._label, proc.pid, generation, self._host)
        return msgspec.json.encode(info).decode()

    async def wait_core(self, generation: int) -> int:
        """The core's exit status once it exits (LOST at once if this actor never ran that generation:
        it was restarted since, and the core died with the old one)."""
        proc = self._proc
        if proc is None or generation != self._generation:
            return LOST
        return await proc.wait()

    def kill_core(self, generation: int) -> None:
        proc = self._proc
        if proc is not None and generation == self._generation and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    async def _stop_current(self) -> None:
        proc = self._proc
        if proc is not None and proc.returncode is None:
            log.warning("%s: stopping engine core %d (generation %d) to start another", self._label, proc.pid,
                        self._generation)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def _read_line(fd: int) -> bytes:
    """The first line written to the pipe (b"" if the writer closed it first)."""
    with os.fdopen(fd, "rb") as f:
        return f.readline()


@functools.cache
def _actor_class() -> Any:
    import ray

    return ray.remote(CoreKeeper)


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


def bundle(placement: Placement) -> dict[str, float]:
    """One replica's placement-group bundle (Ray refuses zero amounts)."""
    wanted = {"CPU": placement.num_cpus, "GPU": placement.num_gpus, **placement.resources}
    return {name: amount for name, amount in wanted.items() if amount > 0}


def check_feasible(wanted: dict[str, float], label: str) -> None:
    """EngineStartError at once when no live node could ever hold one replica's bundle."""
    import ray

    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    if any(all(res.get(k, 0.0) >= v for k, v in wanted.items()) for res in nodes):
        return
    have = "; ".join(", ".join(f"{k}={v:g}" for k, v in sorted(res.items()) if not k.startswith("node:"))
                     for res in nodes)
    raise EngineStartError(f"{label}: no node of the Ray cluster has {wanted} for one replica (nodes: {have or 'none'})")


class RayCoreHost:
    """One replica's actor and placement group, from the API process (`remote_transport.CoreHost`)."""

    def __init__(self, keys: CurveKeys, label: str, placement: Placement, start_timeout_s: float, *,
                 can_grow: bool = True) -> None:
        self.label = label
        self.placement = placement
        self.start_timeout_s = start_timeout_s
        self.can_grow = can_grow  # False: a cluster this server started (no autoscaler adds nodes)
        self.curve: CurveClient = keys.client
        self._keys = keys
        self._actor: Any = None
        self._group: Any = None
        self._closed = False

    async def start_core(self, config: EngineConfig, generation: int) -> RemoteCoreInfo:
        try:
            return await asyncio.wait_for(self._start_core(config, generation), self.start_timeout_s)
        except TimeoutError:
            raise EngineStartError(f"{self.label}: no engine core started on the Ray cluster within "
                                   f"{self.start_timeout_s:.0f} s (placement {self.placement.to_json()})") from None

    async def _start_core(self, config: EngineConfig, generation: int) -> RemoteCoreInfo:
        from ray.exceptions import ActorDiedError

        timings: dict[str, float] = {}
        if self._actor is None:
            timings = await self._create()
        payload = encode_config(config).decode()
        try:
            text = await self._actor.start_core.remote(payload, generation)
        except ActorDiedError:  # killed for good (ray.kill), not restarting: make it again
            log.warning("%s: the Ray actor is gone for good; starting a new one", self.label)
            self._actor = None
            timings = await self._create()
            text = await self._actor.start_core.remote(payload, generation)
        info = msgspec.json.decode(text, type=RemoteCoreInfo)
        info.timings = {**timings, **info.timings}
        return info

    async def _create(self) -> dict[str, float]:
        """The placement group (once) and a new actor in it; the seconds each took."""
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if self._closed:
            raise EngineStartError(f"{self.label}: stopped")
        timings: dict[str, float] = {}
        wanted = bundle(self.placement)
        options: dict[str, Any] = {}
        if wanted:
            if self._group is None:
                if not self.can_grow:
                    check_feasible(wanted, self.label)
                t0 = time.monotonic()
                group = placement_group([wanted], strategy="STRICT_PACK")
                self._group = group
                await group.ready()
                timings["placement_s"] = time.monotonic() - t0
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                self._group, placement_group_bundle_index=0, placement_group_capture_child_tasks=False)
        t0 = time.monotonic()
        self._actor = _actor_class().options(
            num_cpus=self.placement.num_cpus, num_gpus=self.placement.num_gpus,
            resources=dict(self.placement.resources) or None,
            max_restarts=-1, max_task_retries=0, **options,
        ).remote(self.label, self._keys.server.to_env())
        await self._actor.ping.remote()
        timings["actor_start_s"] = time.monotonic() - t0
        return timings

    async def wait_core(self, generation: int) -> int:
        from ray.exceptions import RayActorError

        actor = self._actor
        if actor is None:
            return LOST
        try:
            return await actor.wait_core.remote(generation)
        except RayActorError as exc:
            if not self._closed:
                log.error("%s: the Ray actor holding engine core generation %d died or became unreachable "
                          "(%s); the core is gone with it", self.label, generation, type(exc).__name__)
            return LOST

    def kill_core(self, generation: int) -> None:
        if self._actor is not None:
            self._actor.kill_core.remote(generation)  # fire and forget: wait_core tells when it is done

    async def close(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        self._closed = True
        actor, group, self._actor, self._group = self._actor, self._group, None, None
        if actor is not None:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        if group is not None:
            with contextlib.suppress(Exception):
                remove_placement_group(group)
