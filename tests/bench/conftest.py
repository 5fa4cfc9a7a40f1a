"""A fake-engine server of known capacity for the bench tests (no model compute).

`--max-num-seqs 4 --fake-step-delay 0.02`: one token per running request per
20 ms step, at most 4 requests at once; with 10 output tokens per request that
is about 4 / (10 * 0.02) = 20 requests/s.
"""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from lockgate.bench.procs import ServerProcess

MAX_NUM_SEQS = 4
STEP_DELAY_S = 0.02
OUTPUT_LEN = 10
MAX_QUEUED = 16
CAPACITY_RPS = MAX_NUM_SEQS / (OUTPUT_LEN * STEP_DELAY_S)


@pytest.fixture(scope="session")
def fake_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    d = tmp_path_factory.mktemp("bench-server")
    srv = ServerProcess(["--host", "127.0.0.1", "--load-format", "fake", "--fake-step-delay", str(STEP_DELAY_S),
                         "--max-num-seqs", str(MAX_NUM_SEQS), "--max-queued-requests", str(MAX_QUEUED),
                         "--insecure-no-auth", "--data-dir", str(d / "data")],
                        d / "server.log")
    yield srv
    srv.stop()
