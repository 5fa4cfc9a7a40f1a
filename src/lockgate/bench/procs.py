"""Local server processes: a free port, a process's children, whether it still runs (Linux /proc),
and `ServerProcess`, a `python -m lockgate.server` (or any HTTP server) on a loopback port.

`ServerProcess` is the one way the tests and the scripts in benchmarks/ start a server: it picks a
port, logs to a file, polls /health until the server answers (or exits), reads /metrics, finds the
engine core among the children, and stops the process (SIGINT, then SIGKILL).
"""
from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

STARTUP_TIMEOUT_S = 240.0
_POLL_S = 0.05
_METRIC = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    """Direct children of `pid` (the engine core of an API process)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def pid_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie does not count)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def parse_metrics(text: str) -> dict[str, float]:
    """A Prometheus text page: each metric summed over its label sets under the bare name, and
    also kept per label set as `name{labels}`."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        m = _METRIC.match(line)
        if m:
            name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
            out[name] = out.get(name, 0.0) + value
            if labels:
                out[name + labels] = value
    return out


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when its parent dies, however it dies (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class ServerProcess:
    """`python -m lockgate.server --port P --no-access-log *args` on a free loopback port.

    `command` replaces that command line (another server, e.g. a peer in a benchmark; give `port`
    then, the one it listens on). With `wait` (the default) the constructor returns once /health
    answers 200; otherwise call `wait_healthy()`. `admin_key` is read from `--admin-key` in args:
    `metrics()` uses it unless told otherwise.
    """

    def __init__(self, args: Sequence[str], log_path: Path, *, wait: bool = True,
                 timeout: float = STARTUP_TIMEOUT_S, command: Sequence[str] | None = None,
                 port: int | None = None, cwd: Path | None = None, env: dict[str, str] | None = None,
                 die_with_parent: bool = False) -> None:
        args = list(args)
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.admin_key = args[args.index("--admin-key") + 1] if "--admin-key" in args else None
        self.log_path = log_path
        self.cmd = list(command) if command is not None else [
            sys.executable, "-m", "lockgate.server", "--port", str(self.port), "--no-access-log", *args]
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                     preexec_fn=_die_with_parent if die_with_parent else None)
        if wait:
            try:
                self.wait_healthy(timeout)
            except BaseException:
                self.stop(signal.SIGKILL)  # never leave a server behind that did not come up
                raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, timeout: float = STARTUP_TIMEOUT_S, path: str = "/health") -> None:
        """Until `path` answers 200; RuntimeError if the process exits first, TimeoutError after `timeout`."""
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=2) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
                try:
                    if client.get(f"{self.base_url}{path}").status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(_POLL_S)
        raise TimeoutError(f"server not healthy after {timeout} s:\n{self.log_text()[-4000:]}")

    def engine_pids(self) -> list[int]:
        """The live children of the API process (its engine cores)."""
        return [p for p in children(self.pid) if pid_alive(p)]

    def engine_pid(self) -> int:
        kids = self.engine_pids()
        if len(kids) != 1:
            raise RuntimeError(f"expected one engine process, found {kids}")
        return kids[0]

    def metrics_text(self, key: str | None = None) -> str:
        """The /metrics page, read with `key` (default: the admin key, if the server has one)."""
        key = key or self.admin_key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        r = httpx.get(f"{self.base_url}/metrics", headers=headers, timeout=10)
        if r.status_code != 200:
            raise RuntimeError(f"/metrics answered {r.status_code}: {r.text[:500]}")
        return r.text

    def metrics(self, key: str | None = None) -> dict[str, float]:
        return parse_metrics(self.metrics_text(key))

    def stop(self, sig: int = signal.SIGINT, timeout: float = 30) -> None:
        """`sig` (SIGINT: a graceful shutdown), SIGKILL after `timeout` s; closes the log."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

