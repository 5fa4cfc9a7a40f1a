"""Clients that hang up mid-generation: their requests leave the engine at once.

What is checked is the engine's bookkeeping (running, waiting, KV blocks, in flight), not the
model's tokens, so the server runs the fake engine (`--load-format fake`: the real tokenizer,
scheduler, KV cache and output path, no model), with room for the whole storm at once. 50 ms a
step: a request that was not dropped would still be generating long after the waits below (500
tokens: 25 s; 2000: 100 s), as on the real model.
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.server.conftest import ServerProcess, start_server, wait_for

STORM = 100


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """This module's own fake-engine server, in place of the session's real-model `server`."""
    d = tmp_path_factory.mktemp("cancellation")
    srv = start_server(d, "--load-format", "fake", "--fake-step-delay", "0.05", "--max-num-seqs", "256",
                       "--data-dir", str(d / "data"))
    yield srv
    srv.stop()


def _engine_idle(server: ServerProcess) -> bool:
    m = server.metrics()
    return (m["lockgate:num_requests_running"] == 0 and m["lockgate:num_requests_waiting"] == 0
            and m["lockgate:kv_cache_usage_perc"] == 0
            and m["lockgate:kv_cache_free_blocks"] == m["lockgate:kv_cache_total_blocks"]
            and m["lockgate:num_requests_in_flight"] == 0)


async def _stream_then_hang_up(client: httpx.AsyncClient, i: int, chunks_to_read: int) -> int:
    body = {"prompt": f"Story number {i}: once upon a time", "max_tokens": 500, "stream": True,
            "ignore_eos": True}
    got = 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                got += 1
                if got >= chunks_to_read:
                    break  # leaving the block closes the connection mid-stream
    return got


def test_cancellation_storm(server: ServerProcess) -> None:
    async def storm() -> list[int]:
        limits = httpx.Limits(max_connections=STORM + 10)
        async with httpx.AsyncClient(base_url=server.base_url, timeout=300, limits=limits) as client:
            return await asyncio.gather(*(_stream_then_hang_up(client, i, 2 + i % 3) for i in range(STORM)))

    counts = asyncio.run(storm())
    assert all(c >= 2 for c in counts)  # every request was cancelled mid-generation
    # The engine drops all of them (running count, KV blocks) within moments.
    assert wait_for(lambda: _engine_idle(server), timeout=10), server.metrics()
    t0 = time.monotonic()
    r = httpx.post(f"{server.base_url}/v1/completions", json={"prompt": "Hello", "max_tokens": 4}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert time.monotonic() - t0 < 10


def test_non_streaming_disconnect_aborts(server: ServerProcess) -> None:
    body = {"prompt": "Write a long essay.", "max_tokens": 2000, "ignore_eos": True}
    with httpx.Client(base_url=server.base_url, timeout=1.5) as client:
        try:
            client.post("/v1/completions", json=body)
            raise AssertionError("expected the request to time out")
        except httpx.TimeoutException:
            pass  # the client hangs up while the engine is generating
    assert wait_for(lambda: _engine_idle(server), timeout=5), server.metrics()
