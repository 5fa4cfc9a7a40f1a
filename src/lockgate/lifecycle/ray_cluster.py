"""The Ray cluster a server runs its replicas on (`serve --ray [local|auto|ADDRESS]`).

Started or joined once per server process, before its models are built (`join`), and left
when the server exits (`RayCluster.shutdown`: a cluster this process started stops with it).
Every replica of every version is then a Ray actor (`ray_replica.py`) reached over CurveZMQ
with the keys made here for this cluster (`engine/curve.py`).

Nothing here imports Ray until `join` is called: a server without `--ray` never loads it.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

from lockgate.engine.curve import CurveKeys
from lockgate.engine.frontend.remote_transport import RemoteTransport
from lockgate.lifecycle.placement import Placement

log = logging.getLogger("lockgate.lifecycle")

RAY_VERSION = "2.60.0"
INSTALL_HINT = f"pip install 'lockgate[ray]' (or pip install ray=={RAY_VERSION})"
NAMESPACE = "lockgate"
# local: a new cluster on this machine; auto: the one `ray start` runs here; HOST:PORT or ray://HOST:PORT.
_ADDRESS = re.compile(r"^(local|auto|(ray://)?[A-Za-z0-9.\-]{1,253}:\d{1,5}|(ray://)?\[[0-9A-Fa-f:.]+\]:\d{1,5})$")


def check_address(address: str) -> str:
    """`address` if it names a cluster (local, auto, HOST:PORT, ray://HOST:PORT); ValueError otherwise."""
    if not isinstance(address, str) or not _ADDRESS.match(address):
        raise ValueError(f"--ray takes local, auto or a cluster address HOST:PORT (or ray://HOST:PORT), "
                         f"got {address!r}")
    port = int(address.rsplit(":", 1)[1]) if address not in ("local", "auto") else 1
    if not 0 < port < 65536:
        raise ValueError(f"--ray {address!r}: the port must be in [1, 65535]")
    return address


def require_ray() -> Any:
    """The `ray` module; ValueError with the install command when it is missing (checked before
    anything starts)."""
    try:
        import ray
    except ImportError:
        raise ValueError(f"--ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


@dataclass(slots=True)
class RayCluster:
    address: str
    started_here: bool  # a local cluster this process started: it stops with the server
    keys: CurveKeys = field(default_factory=CurveKeys.generate, repr=False)

    def transport(self, label: str, placement: Placement, start_timeout_s: float) -> RemoteTransport:
        """A replica's link to its core, held by a new Ray actor (made when the core first starts)."""
        from lockgate.lifecycle.ray_replica import RayCoreHost

        return RemoteTransport(RayCoreHost(self.keys, label, placement, start_timeout_s,
                                           can_grow=not self.started_here))

    def shutdown(self) -> None:
        """Leave the cluster (stopping it if this process started it)."""
        import ray

        global _active
        if _active is self:
            _active = None
        if ray.is_initialized():
            ray.shutdown()
        log.info("left the Ray cluster at %s%s", self.address, " (stopped it)" if self.started_here else "")


_active: RayCluster | None = None


def active() -> RayCluster | None:
    """The cluster this server process joined (`serve --ray`); None: replicas are local processes."""
    return _active


def join(address: str) -> RayCluster:
    """Start (`local`) or join (`auto`, an address) a cluster for this process's replicas.
    ValueError, saying why, when Ray is missing or the cluster cannot be reached."""
    global _active
    ray = require_ray()
    check_address(address)
    if _active is not None:
        raise ValueError("this process already runs its replicas on a Ray cluster")
    kwargs: dict[str, Any] = {"namespace": NAMESPACE, "log_to_driver": True}
    if address == "local":
        kwargs["include_dashboard"] = False
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ValueError(f"cannot {'start' if address == 'local' else 'join'} the Ray cluster "
                         f"({address}): {exc}") from None
    cluster = RayCluster(address, started_here=address == "local")
    _active = cluster
    resources = ray.cluster_resources()
    log.info("replicas run as Ray actors on %s (%s): %s", address, "started here" if cluster.started_here
             else "joined", ", ".join(f"{k}={v:g}" for k, v in sorted(resources.items()) if "node:" not in k))
    return cluster
