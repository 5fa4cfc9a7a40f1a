"""The pieces of benchmarks/gateway_overhead.py: process-tree CPU, the raw client, configurations, p95."""
from __future__ import annotations

import asyncio
import importlib.util
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lockgate.bench.proctree import cpu_seconds, descendants, is_engine, tree_cpu
from lockgate.bench.rawhttp import RawClient

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gateway_overhead.py"


def _script():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("gateway_overhead", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gateway_overhead"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_tree_cpu_counts_children_and_tells_engines_apart() -> None:
    busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\ntime.sleep(30)"
    child = subprocess.Popen([sys.executable, "-c", busy])
    fake_engine = subprocess.Popen([sys.executable, "-c", busy, "-m", "lockgate.engine.core"])
    try:
        time.sleep(1.0)
        assert child.pid in descendants(os.getpid()) and fake_engine.pid in descendants(os.getpid())
        assert is_engine(fake_engine.pid) and not is_engine(child.pid)
        api, engine = tree_cpu(os.getpid())
        assert engine >= 0.25 and api >= cpu_seconds(child.pid) >= 0.25
    finally:
        for p in (child, fake_engine):
            p.kill()
            p.wait()
    assert cpu_seconds(child.pid) == 0.0  # gone


def test_raw_client_keep_alive_and_chunked() -> None:
    async def run() -> tuple[list[int], int, list[bytes]]:
        seen: list[bytes] = []
        connections = 0

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal connections
            connections += 1
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    break
                length = int(next(ln.split(b":")[1] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")))
                seen.append(await reader.readexactly(length))
                if len(seen) % 2:
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                else:
                    writer.write(b"HTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = RawClient("127.0.0.1", port, "/x", {"Authorization": "Bearer k"}, b'{"a":1}', 2)
        statuses = [await client.post() for _ in range(4)]
        await client.aclose()
        server.close()
        await server.wait_closed()
        return statuses, connections, seen

    statuses, connections, bodies = asyncio.run(run())
    assert statuses == [200, 201, 200, 201] and connections == 1 and bodies == [b'{"a":1}'] * 4


def test_configs_and_p95() -> None:
    g = _script()
    assert g.Config.parse("off") == g.Config("off", "off", 1)
    assert g.Config.parse("pg-w2") == g.Config("pg-w2", "pg", 2)
    assert g.Config.parse("on") == g.Config("sqlite", "sqlite", 1)  # the old script's name
    assert g.Config.parse("sqlite-w1").name == "sqlite"
    for bad in ("mysql", "pg-w0", "off-wx"):
        with pytest.raises(ValueError):
            g.Config.parse(bad)
    ok = [g.Sample("x", 0.0, 0.0, i / 1000, "200") for i in range(1, 101)]  # 1..100 ms
    assert g.p95_ms(ok) == pytest.approx(95.0)
    failed = ok[:94] + [g.Sample("x", 0.0, 0.0, 0.001, "ReadTimeout")] * 6
    assert math.isinf(g.p95_ms(failed))  # a failure counts as over any bound
