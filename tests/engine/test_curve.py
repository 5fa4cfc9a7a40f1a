"""CurveZMQ on an engine core's network sockets (engine/curve.py): only the cluster's client key
gets through; a plain client, a wrong client key and a wrong server key get nothing, and each
refusal is logged (naming the socket, and the peer where ZeroMQ says it)."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time

import pytest
import zmq

from lockgate.engine.curve import ENV_VAR, CurveClient, CurveGuard, CurveKeys, CurveServer

LOGGER = "lockgate.engine.core"


@pytest.fixture
def guarded() -> tuple[zmq.Context, zmq.Socket, CurveGuard, CurveKeys, str]:
    keys = CurveKeys.generate()
    ctx = zmq.Context()
    guard = CurveGuard(ctx, keys.server)
    server = ctx.socket(zmq.PULL)
    server.setsockopt(zmq.LINGER, 0)
    guard.protect(server, "input")
    server.bind("tcp://127.0.0.1:*")
    guard.start()
    yield ctx, server, guard, keys, server.last_endpoint.decode()
    guard.stop()
    server.close(linger=0)
    ctx.term()


def _push(ctx: zmq.Context, endpoint: str, curve: CurveClient | None) -> zmq.Socket:
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    if curve is not None:
        curve.apply(sock)
    sock.connect(endpoint)
    sock.send(b"hello")
    return sock


def test_only_the_cluster_client_gets_through(guarded, caplog: pytest.LogCaptureFixture) -> None:  # noqa: ANN001
    ctx, server, guard, keys, endpoint = guarded
    stranger_public, stranger_secret = zmq.curve_keypair()
    attempts = {
        "plain ZeroMQ": None,
        "an unknown key": CurveClient(stranger_public, stranger_secret, keys.server_public),
        "the wrong server key": CurveClient(keys.client_public, keys.client_secret, zmq.curve_keypair()[0]),
    }
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        socks = [_push(ctx, endpoint, curve) for curve in attempts.values()]
        assert not server.poll(1000)  # none of them got a message in
        good = _push(ctx, endpoint, keys.client)
        assert server.poll(5000) and server.recv() == b"hello"
        assert not server.poll(200)
    for s in [*socks, good]:
        s.close(linger=0)
    refusals = [r.getMessage() for r in caplog.records if "refused a connection to its input socket" in r.getMessage()]
    assert any("without CURVE" in m for m in refusals), refusals
    assert any(f"unknown key ({stranger_public.decode()})" in m and "from 127.0.0.1" in m for m in refusals), refusals
    assert any("wrong server key" in m for m in refusals), refusals
    assert guard.num_admitted >= 1 and guard.num_refused >= 3
    assert keys.client_secret.decode() not in caplog.text and keys.server_secret.decode() not in caplog.text


def test_a_retrying_client_is_summarised_not_logged_each_time(guarded, caplog: pytest.LogCaptureFixture) -> None:  # noqa: ANN001
    ctx, _server, guard, keys, endpoint = guarded
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 10)  # retry fast
        CurveClient(keys.client_public, keys.client_secret, zmq.curve_keypair()[0]).apply(sock)
        sock.connect(endpoint)
        deadline = time.monotonic() + 5
        while guard.num_refused < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        sock.close(linger=0)
    assert guard.num_refused >= 5
    lines = [r for r in caplog.records if "refused a connection" in r.getMessage()]
    assert 1 <= len(lines) <= 2, [r.getMessage() for r in lines]


def test_server_keys_travel_in_the_environment_and_are_checked() -> None:
    keys = CurveKeys.generate()
    env = keys.server.to_env()
    again = CurveServer.from_env(env)
    assert again == keys.server and keys.server_secret.decode() not in repr(again)
    assert keys.client_secret.decode() not in repr(keys) + repr(keys.client)
    for bad in ("", "{}", '{"public": "x", "secret": "y", "clients": ["z"]}',
                env.replace('"clients":[', '"clients":["short",')):
        with pytest.raises(ValueError) as err:
            CurveServer.from_env(bad)
        assert keys.server_secret.decode() not in str(err.value)
    with pytest.raises(ValueError, match="admits no client"):
        CurveServer.from_env(env.split('"clients"')[0] + '"clients":[]}')


def test_a_core_never_binds_a_network_socket_without_keys() -> None:
    proc = subprocess.run([sys.executable, "-m", "lockgate.engine.core", "--bind", "127.0.0.1", "--addresses-fd", "1",
                           "--config", "{}"], capture_output=True, text=True, timeout=60,
                          env={k: v for k, v in os.environ.items() if k != ENV_VAR})
    assert proc.returncode == 2 and "CURVE keys" in proc.stderr, proc.stderr
