"""Server processes for the tests: `ServerProcess` (lockgate.bench.procs, shared with benchmarks/),
the session's one real-model server, and `start_server` for a module's own (mostly fake-engine) one.

The embedded SmolLM2-135M model is small enough for CPU tests; only tests whose point is the
model's tokens use it (the shared `server`); the rest run the fake engine (`--load-format fake`).
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lockgate.bench.procs import ServerProcess, pid_alive  # noqa: F401  (re-exported)

@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The session's one real-model server (read-only use: nothing kills or drains it)."""
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
