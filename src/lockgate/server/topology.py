"""The server's engine cores as the API workers share them (`lockgate serve --api-workers N`).

The primary worker (worker 0) starts, supervises and scales every engine core, as a single
server does; its `TopologyPublisher` writes where each replica's core listens (`Topology`:
per version, each replica's state and `CoreAddress`) to `topology.json` in the server's run
directory whenever it changes. Every other worker runs a `TopologyFollower`: its fleets are
`attached` (they start nothing, run no autoscaler), it attaches a replica for each of the
primary's that is up, releases one the primary drains or drops, and hands each attached
client its core (`locate`): the current one, or the next after a death or a primary restart.

What the primary's autoscalers read besides the cores' load comes back the other way: each
attached worker writes, per version, the requests it holds at zero replicas (the activator)
and its admission's cumulative asked/refused counts to `load/WORKER.json`; the primary adds
the held ones to its fleets' `remote_held` (waking their autoscaler, so a worker that finds no
replica gets one started as the primary would) and the counts' growth to its own admission's.

Polling a small file every `POLL_S` keeps this free of sockets and of ordering problems: a
worker that (re)starts reads the current state, and a primary that restarts rewrites it.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from pathlib import Path

import msgspec

from lockgate.engine.frontend.attached_transport import AttachedTransport, CoreAddress
from lockgate.engine.frontend.client import AsyncEngineClient
from lockgate.lifecycle.fleet import Fleet
from lockgate.lifecycle.registry import ModelRegistry
from lockgate.lifecycle.replica import ReplicaState

log = logging.getLogger("lockgate.server")

POLL_S = 0.1
LOAD_EVERY_S = 1.0  # an attached worker's admission counts go back this often (a held request at once)
TOPOLOGY_FILE = "topology.json"
LOAD_DIR = "load"


class ReplicaEntry(msgspec.Struct, forbid_unknown_fields=True):
    index: int
    state: str  # "up" (takes requests) | "draining" (going away) | "down" (starting, restarting or failed)
    core: CoreAddress | None = None  # its latest core that became ready (None: none yet)


class VersionEntry(msgspec.Struct, forbid_unknown_fields=True):
    state: str  # the primary's version state (lifecycle/version.py State): attached ones serve once "ready"
    configured: int
    replicas: list[ReplicaEntry]
    max_model_len: int = 0  # the primary's (kept at zero replicas, as requests are checked against it)


class Topology(msgspec.Struct, forbid_unknown_fields=True):
    primary: int  # the primary worker's pid
    versions: dict[str, VersionEntry]  # NAME@VERSION -> its replicas
    traffic: dict[str, dict[str, float]]  # model -> its traffic split (the primary's: rollbacks included)


class WorkerLoad(msgspec.Struct, array_like=True):
    """An attached worker's share of what one version's autoscaler reads."""

    held: int  # requests waiting for a replica now
    asked: int  # cumulative, as `Admission.num_asked`
    refused: int  # cumulative, as `Admission.num_refused`


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def snapshot(registry: ModelRegistry) -> Topology:
    """The primary's fleets as the other workers need them."""
    versions = {}
    for v in registry.versions():
        entries = []
        for r in sorted(v.fleet.replicas.values(), key=lambda r: r.index):
            c = r.client
            attach, pid = c.attach_address, c.engine_pid
            core = None
            if attach and pid:
                pub, replay = c.kv_event_addresses
                core = CoreAddress(pid=pid, generation=c.core_generation, attach=attach, kv_events=pub,
                                   kv_replay=replay)
            # Going away (drained, or stopping once the other workers have detached): they must let go.
            going = r.state in (ReplicaState.DRAINING, ReplicaState.STOPPED)
            state = "up" if r.up else ("draining" if going else "down")
            entries.append(ReplicaEntry(r.index, state, core))
        versions[v.spec.ref] = VersionEntry(str(v.state), v.fleet.configured, entries, v.fleet.max_model_len)
    traffic = {name: dict(m.traffic) for name, m in registry.models.items()}
    return Topology(os.getpid(), versions, traffic)


class TopologyPublisher:
    """The primary worker: `topology.json` kept current; the other workers' load read back."""

    def __init__(self, registry: ModelRegistry, run_dir: Path) -> None:
        self.registry = registry
        self.path = run_dir / TOPOLOGY_FILE
        self.load_dir = run_dir / LOAD_DIR
        self._last = b""
        self._seen: dict[str, int] = {}  # file -> mtime_ns
        self._loads: dict[str, dict[str, WorkerLoad]] = {}  # file -> {ref: its load}

    def publish(self) -> None:
        data = msgspec.json.encode(snapshot(self.registry))
        if data != self._last:
            _write_atomic(self.path, data)
            self._last = data

    def read_loads(self) -> None:
        """The other workers' load: held requests into each fleet's `remote_held` (a new one wakes its
        autoscaler), the growth of their asked/refused counts into the version's admission counts."""
        changed = False
        seen = set()
        with contextlib.suppress(FileNotFoundError), os.scandir(self.load_dir) as it:
            for entry in it:
                if not entry.name.endswith(".json"):
                    continue
                seen.add(entry.name)
                mtime = entry.stat().st_mtime_ns
                if self._seen.get(entry.name) == mtime:
                    continue
                self._seen[entry.name] = mtime
                try:
                    loads = msgspec.json.decode(Path(entry.path).read_bytes(), type=dict[str, WorkerLoad])
                except (OSError, msgspec.DecodeError):
                    continue
                self._count(self._loads.get(entry.name, {}), loads)
                self._loads[entry.name] = loads
                changed = True
        for gone in set(self._loads) - seen:  # a dead worker's (the parent removes its file)
            del self._loads[gone]
            self._seen.pop(gone, None)
            changed = True
        if not changed:
            return
        for v in self.registry.versions():
            fleet, ref = v.fleet, v.spec.ref
            before = fleet.remote_held
            fleet.remote_held = sum(w[ref].held for w in self._loads.values() if ref in w)
            if fleet.remote_held > before and fleet.wake_autoscaler is not None:
                fleet.wake_autoscaler()

    def _count(self, last: dict[str, WorkerLoad], now: dict[str, WorkerLoad]) -> None:
        for v in self.registry.versions():
            new = now.get(v.spec.ref)
            if new is None:
                continue
            old = last.get(v.spec.ref)
            asked, refused = new.asked, new.refused
            if old is not None and asked >= old.asked and refused >= old.refused:  # else: a restarted worker
                asked, refused = asked - old.asked, refused - old.refused
            v.admission.num_asked += asked
            v.admission.num_refused += refused

    async def run(self) -> None:
        self.load_dir.mkdir(exist_ok=True)
        while True:
            try:
                self.publish()
                self.read_loads()
            except OSError as exc:  # a full disk must not stop the primary from serving
                log.error("cannot write the API workers' topology: %s", exc)
            await asyncio.sleep(POLL_S)


class TopologyFollower:
    """An attached worker: its fleets follow the primary's topology."""

    def __init__(self, registry: ModelRegistry, run_dir: Path, worker: int) -> None:
        self.registry = registry
        self.run_dir = run_dir
        self.path = run_dir / TOPOLOGY_FILE
        self.load_path = run_dir / LOAD_DIR / f"{worker}.json"
        self.topology: Topology | None = None
        self._stamp: tuple[int, int] | None = None
        self._changed = asyncio.Event()
        self._load: dict[str, WorkerLoad] = {}
        self._load_at = 0.0

    def prepare(self) -> None:
        """Before the models start: attached fleets; no autoscaler, quality gate or automatic rollback
        here (the primary's decide: a version serves here once it is ready there, with its splits)."""
        for v in self.registry.versions():
            v.fleet.attached = True
            v.fleet.wake_autoscaler = None  # the load file reaches the primary's within POLL_S
            v.autoscaler = None
            v.spec.gate = None
        for model in self.registry.models.values():
            model.rules = dataclasses.replace(model.rules, enabled=False)

    async def locate(self, ref: str, index: int, dead: CoreAddress | None) -> CoreAddress:
        """Replica `index` of `ref`'s current core once it is up and is not `dead`."""
        while True:
            core = self._core(ref, index)
            if core is not None and core != dead:
                return core
            changed = self._changed
            await changed.wait()

    def _core(self, ref: str, index: int) -> CoreAddress | None:
        t = self.topology
        entry = t.versions.get(ref) if t is not None else None
        for r in entry.replicas if entry is not None else []:
            if r.index == index and r.state == "up":
                return r.core
        return None

    def read(self) -> bool:
        """Read `topology.json` when it changed; whether it did."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        stamp = (st.st_mtime_ns, st.st_ino)
        if stamp == self._stamp:
            return False
        try:
            topology = msgspec.json.decode(self.path.read_bytes(), type=Topology)
        except (OSError, msgspec.DecodeError) as exc:
            log.warning("unreadable API worker topology (%s); keeping the last one", exc)
            return False
        self._stamp = stamp
        self.topology = topology
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()
        return True

    def sync(self) -> None:
        """Attach the primary's replicas that are up and not here yet; release those it drains or dropped;
        its traffic splits (a rollback there is one here)."""
        t = self.topology
        if t is None:
            return
        for name, split in t.traffic.items():
            model = self.registry.models.get(name)
            # A starting primary has no split yet: keep this worker's until it has one.
            if model is not None and model.traffic != split and any(w > 0 for w in split.values()):
                model.traffic = dict(split)
        for v in self.registry.versions():
            fleet, ref = v.fleet, v.spec.ref
            entry = t.versions.get(ref)
            if entry is None:
                continue
            fleet.configured = entry.configured
            if entry.state == "ready":
                fleet.listed(entry.max_model_len)
            listed = {r.index: r for r in entry.replicas}
            for index, r in listed.items():
                here = fleet.replicas.get(index)
                if here is None:
                    if r.state == "up":
                        fleet.attach(index, self._client(fleet, ref, index))
                elif r.state == "draining" or here.state is ReplicaState.FAILED:
                    fleet.release(index)  # a failed attach is retried once it is gone
            for index in [i for i in fleet.replicas if i not in listed]:
                fleet.release(index)

    def _client(self, fleet: Fleet, ref: str, index: int) -> AsyncEngineClient:
        transport = AttachedTransport(lambda dead: self.locate(ref, index, dead), str(self.run_dir))
        # No stall watchdog here: the primary watches its cores (and kills a stuck one; we follow).
        return AsyncEngineClient(fleet.config, stall_timeout_s=None, queue=fleet.queue, transport=transport)

    def write_load(self) -> None:
        load = {v.spec.ref: WorkerLoad(v.fleet.local_held, v.admission.num_asked, v.admission.num_refused)
                for v in self.registry.versions()}
        if load == self._load:
            return
        now = time.monotonic()
        held_changed = {r: w.held for r, w in load.items()} != {r: w.held for r, w in self._load.items()}
        if held_changed or now - self._load_at >= LOAD_EVERY_S:
            _write_atomic(self.load_path, msgspec.json.encode(load))
            self._load, self._load_at = load, now

    async def run(self) -> None:
        self.load_path.parent.mkdir(exist_ok=True)
        while True:
            try:
                self.read()
                self.sync()
                self.write_load()
            except OSError as exc:
                log.error("cannot follow the API workers' topology: %s", exc)
            await asyncio.sleep(POLL_S)
