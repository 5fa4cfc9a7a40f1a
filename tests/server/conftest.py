"""A real `python -m lockgate.server` process on a free loopback port, shared per module.

The embedded SmolLM2-135M model is small enough for CPU tests; requests keep
max_tokens small so the whole suite stays within a few minutes on 2 cores.
"""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lockgate.bench.procs import children as _children
from lockgate.bench.procs import free_port, pid_alive

STARTUP_TIMEOUT_S = 240.0


class ServerProcess:
    def __init__(self, args: list[str], log_path: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        # With keys, /metrics needs one: metrics() uses the --admin-key unless told otherwise.
        self.admin_key = args[args.index("--admin-key") + 1] if "--admin-key" in args else None
        self.log_path = log_path
        self._log = open(log_path, "wb")
        cmd = [sys.executable, "-m", "lockgate.server", "--port", str(self.port), "--no-access-log", *args]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        self.wait_healthy()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server not healthy after {timeout} s:\n{self.log_text()[-4000:]}")

    def engine_pid(self) -> int:
        kids = [p for p in _children(self.pid) if pid_alive(p)]
        assert len(kids) == 1, f"expected one engine process, found {kids}"
        return kids[0]

    def metrics_text(self, key: str | None = None) -> str:
        """The /metrics page, read with `key` (default: the admin key, if the server has one)."""
        key = key or self.admin_key
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        r = httpx.get(f"{self.base_url}/metrics", headers=headers, timeout=10)
        assert r.status_code == 200, r.text
        return r.text

    def metrics(self, key: str | None = None) -> dict[str, float]:
        text = self.metrics_text(key)
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$", line)
            if m:
                # Summed over labels under the bare name, and also kept per label set.
                name, labels, value = m.group(1), m.group(2) or "", float(m.group(3))
                out[name] = out.get(name, 0.0) + value
                if labels:
                    out[name + labels] = value
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The default server most tests share (read-only use: nothing kills or drains it)."""
    srv = ServerProcess(["--max-request-body-bytes", "1000000", "--max-num-seqs", "256"],
                        tmp_path_factory.mktemp("server") / "server.log")
    yield srv
    srv.stop()


def start_server(tmp_path: Path, *args: str) -> ServerProcess:
    return ServerProcess(list(args), tmp_path / "server.log")


def wait_for(cond, timeout: float, interval: float = 0.05) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(interval)
    return cond()
