"""Hardening round two against a real keyed server: request-head deadlines that hold on busy
keep-alive and pipelined connections, /metrics behind a key, and a private data directory."""
from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lockgate.bench.procs import free_port
from tests.server.conftest import ServerProcess, start_server, wait_for

ADMIN = "transport-admin-key"
HEADER_TIMEOUT_S = 1.5
SLACK_S = 2.0
MAX_CONNECTIONS = 4
ATTACKERS = MAX_CONNECTIONS - 1  # with one more connection every slot is taken
FAKE = ["--load-format", "fake", "--fake-step-delay", "0.01", "--no-slo-admission", "--max-model-len", "4096"]
LONG = 1500  # tokens: a 15 s stream at 0.01 s a step, far past the head deadline


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("transport")
    data = tmp / "data"
    old_umask = os.umask(0o022)  # the usual default: what made data directories 0755 before
    try:
        data.mkdir()
        assert stat.S_IMODE(data.stat().st_mode) == 0o755
        # An existing directory open to others is refused before anything starts ...
        refused = subprocess.run(
            [sys.executable, "-m", "lockgate.server", "--port", str(free_port()), "--admin-key", ADMIN,
             "--data-dir", str(data), "--metrics-auth", *FAKE],
            capture_output=True, text=True, timeout=120)
        left = sorted(os.listdir(data))
        # ... and after the chmod it names, the server starts.
        os.chmod(data, 0o700)
        s = start_server(tmp, "--admin-key", ADMIN, "--data-dir", str(data), *FAKE,
                         "--header-timeout", str(HEADER_TIMEOUT_S), "--max-connections", str(MAX_CONNECTIONS))
    finally:
        os.umask(old_umask)
    s.data_dir, s.refused, s.left = data, refused, left  # type: ignore[attr-defined]
    with httpx.Client(base_url=s.base_url, headers=_auth(ADMIN), timeout=30) as c:
        tenant = c.post("/admin/tenants", json={"name": "transport"}).json()["id"]
        s.tenant = tenant  # type: ignore[attr-defined]
        s.keys = {scopes: c.post(f"/admin/tenants/{tenant}/keys",  # type: ignore[attr-defined]
                                 json={"name": scopes, "scopes": scopes.split("+")}).json()["key"]
                  for scopes in ("inference", "admin", "metrics")}
        r = c.post("/admin/keys", json={"name": "prometheus", "scopes": ["metrics"]})  # a scraper's: no tenant
        assert r.status_code == 201, r.text
        s.keys["global-metrics"] = r.json()["key"]  # type: ignore[attr-defined]
    yield s
    s.stop()


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _error(r: httpx.Response, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert err["code"] == code and err["message"], err
    return err


def _idle(srv: ServerProcess) -> bool:
    m = srv.metrics()
    return (m["lockgate:num_requests_in_flight"] == 0 and m["lockgate:num_requests_running"] == 0
            and m["lockgate:num_requests_queued"] == 0)


def assert_clean(srv: ServerProcess) -> None:
    """Nothing in flight or running, and a normal request completes."""
    assert wait_for(lambda: _idle(srv), 10), srv.metrics()
    r = httpx.post(f"{srv.base_url}/v1/completions", headers=_auth(srv.keys["inference"]),  # type: ignore[attr-defined]
                   json={"prompt": "Hello", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text


# ---- the request-head deadline --------------------------------------------------------------

def _stream_head(srv: ServerProcess, max_tokens: int) -> bytes:
    body = b'{"prompt": "Tell a story", "max_tokens": %d, "ignore_eos": true, "stream": true}' % max_tokens
    return (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + srv.keys["inference"].encode() +  # type: ignore[attr-defined]
            b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


def _read_until(s: socket.socket, marker: bytes, timeout: float) -> bytes:
    s.settimeout(timeout)
    out = b""
    while marker not in out:
        chunk = s.recv(65536)
        assert chunk, out
        out += chunk
    return out


def _drip_until_closed(s: socket.socket, data: bytes, every_s: float, limit_s: float) -> tuple[float, bytes]:
    """Send `data` a byte at a time, reading meanwhile; seconds from the first byte to the close."""
    t0 = time.monotonic()
    out = b""
    i = 0
    while time.monotonic() - t0 < limit_s:
        try:
            if i < len(data):
                s.sendall(data[i:i + 1])
                i += 1
            s.settimeout(every_s)
            chunk = s.recv(65536)
        except TimeoutError:
            continue
        except OSError:  # reset: the connection was cut
            return time.monotonic() - t0, out
        if not chunk:
            return time.monotonic() - t0, out
        out += chunk
    raise AssertionError(f"the connection was still open {limit_s} s after the head's first byte: {out[-300:]!r}")


SLOW_HEAD = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 200 + b"\r\n\r\n"


def test_a_head_dripped_behind_a_streaming_response_is_cut_off(srv: ServerProcess) -> None:
    """Every slot held by a stream with a second head dripping behind it: the heads' deadline frees them."""
    results: list[tuple[float, bytes, bytes] | BaseException] = []
    streaming = threading.Barrier(ATTACKERS + 1)

    def attacker() -> None:
        try:
            with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
                s.sendall(_stream_head(srv, LONG))
                first = _read_until(s, b"data: {", 30)  # the stream is in flight
                streaming.wait(30)
                elapsed, rest = _drip_until_closed(s, SLOW_HEAD, 0.2, HEADER_TIMEOUT_S + 10)
                results.append((elapsed, first, rest))
        except BaseException as exc:  # noqa: BLE001 - reported below
            results.append(exc)
            streaming.abort()

    threads = [threading.Thread(target=attacker) for _ in range(ATTACKERS)]
    for t in threads:
        t.start()
    streaming.wait(60)
    r = httpx.get(f"{srv.base_url}/health", timeout=10)
    assert r.status_code == 503  # every slot is taken (the test holds them)
    for t in threads:
        t.join(60)
    assert len(results) == ATTACKERS and all(isinstance(x, tuple) for x in results), results
    for elapsed, first, rest in results:  # type: ignore[misc]
        assert first.startswith(b"HTTP/1.1 200"), first
        assert elapsed < HEADER_TIMEOUT_S + SLACK_S, elapsed
        assert b"[DONE]" not in rest and b"HTTP/1.1 " not in rest  # cut off, not finished; no reply misplaced
    # The slots are free at once, and the streams cut short released everything they held.
    assert httpx.get(f"{srv.base_url}/health", timeout=10).status_code == 200
    assert_clean(srv)


def test_a_head_after_a_stream_is_timed_from_its_first_byte(srv: ServerProcess) -> None:
    """The stream ends while the next head drips: that head still gets its 408 at the deadline."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
        s.sendall(_stream_head(srv, 30))  # about 0.3 s of tokens
        _read_until(s, b"data: {", 30)
        elapsed, rest = _drip_until_closed(s, SLOW_HEAD, 0.2, HEADER_TIMEOUT_S + 10)
    assert b"data: [DONE]" in rest and rest.count(b"HTTP/1.1 ") == 1, rest
    assert b"HTTP/1.1 408 " in rest and b'"request_timeout"' in rest, rest
    assert HEADER_TIMEOUT_S - 0.3 < elapsed < HEADER_TIMEOUT_S + SLACK_S, elapsed
    assert_clean(srv)


def test_a_head_after_an_idle_gap_is_timed_from_its_first_byte(srv: ServerProcess) -> None:
    health = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
        s.sendall(health)
        _read_until(s, b'{"status":"ok"}', 10)
        time.sleep(HEADER_TIMEOUT_S * 0.8)  # idle keep-alive, shorter than its timeout
        for i in range(len(health)):  # a head sent slowly but within the deadline of its first byte
            s.sendall(health[i:i + 1])
            time.sleep(HEADER_TIMEOUT_S * 0.5 / len(health))
        assert _read_until(s, b'{"status":"ok"}', 10).startswith(b"HTTP/1.1 200")
        time.sleep(HEADER_TIMEOUT_S * 0.8)
        elapsed, rest = _drip_until_closed(s, SLOW_HEAD, 0.2, HEADER_TIMEOUT_S + 10)
    assert rest.startswith(b"HTTP/1.1 408 ") and b'"request_timeout"' in rest, rest
    assert HEADER_TIMEOUT_S - 0.3 < elapsed < HEADER_TIMEOUT_S + SLACK_S, elapsed


def test_blank_lines_between_requests_do_not_hold_a_connection(srv: ServerProcess) -> None:
    """Empty lines before a request line are skipped by the parser: they still start the deadline."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        _read_until(s, b'{"status":"ok"}', 10)
        elapsed, rest = _drip_until_closed(s, b"\r\n" * 200, 0.2, HEADER_TIMEOUT_S + 10)
    assert rest.startswith(b"HTTP/1.1 408 "), rest
    assert elapsed < HEADER_TIMEOUT_S + SLACK_S, elapsed


def test_a_body_dripped_after_its_answer_does_not_hold_a_connection(srv: ServerProcess) -> None:
    """A request refused before its body was read (no key: 401) keeps its connection; the rest of
    the body then has the head's deadline (each byte used to cancel the keep-alive timer)."""
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000\r\n\r\n{")
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
        s.sendall(head)
        answer = _read_until(s, b'"invalid_api_key"', 10)
        assert answer.startswith(b"HTTP/1.1 401 "), answer
        elapsed, rest = _drip_until_closed(s, b"a" * 1000, 0.2, HEADER_TIMEOUT_S + 10)
    assert b"HTTP/1.1 401" not in rest and (rest == b"" or rest.startswith(b"HTTP/1.1 408 ")), rest
    assert elapsed < HEADER_TIMEOUT_S + SLACK_S, elapsed
    assert httpx.get(f"{srv.base_url}/health", timeout=10).status_code == 200


def test_pipelined_requests_behind_a_stream_are_still_served(srv: ServerProcess) -> None:
    health = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
        s.sendall(_stream_head(srv, 100) + health + health)  # whole heads, queued behind a 1 s stream
        out = _read_until(s, b'{"status":"ok"}', 30)
        out += _read_until(s, b'{"status":"ok"}', 10) if out.count(b'{"status":"ok"}') < 2 else b""
    assert out.count(b"HTTP/1.1 200 ") == 3 and b"data: [DONE]" in out, out
    assert out.index(b"data: [DONE]") < out.index(b'{"status":"ok"}')  # in order


# ---- /metrics needs a key -------------------------------------------------------------------

def test_metrics_need_a_metrics_or_global_admin_key(srv: ServerProcess) -> None:
    url = f"{srv.base_url}/metrics"
    keys = srv.keys  # type: ignore[attr-defined]
    tenant = srv.tenant  # type: ignore[attr-defined]
    refusals = [_error(httpx.get(url, timeout=10), 401, "invalid_api_key"),
                _error(httpx.get(url, headers=_auth("lg-not-a-key"), timeout=10), 401, "invalid_api_key"),
                _error(httpx.get(url, headers={"Authorization": ADMIN}, timeout=10), 401, "invalid_api_key")]
    for scope in ("inference", "admin"):  # a tenant's key, even its admin key, sees only its own tenant
        err = _error(httpx.get(url, headers=_auth(keys[scope]), timeout=10), 403, "insufficient_scope")
        assert "metrics scope" in err["message"], err
        refusals.append(err)
    assert httpx.head(url, timeout=10).status_code == 401
    for r in refusals:
        assert "lockgate:" not in str(r) and tenant not in str(r)  # nothing of the page leaks
    for key in (ADMIN, keys["metrics"], keys["global-metrics"]):
        r = httpx.get(url, headers=_auth(key), timeout=10)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), r.text
        assert "lockgate:num_requests_running" in r.text
    # A scraper's key reads metrics, nothing else.
    for key in (keys["metrics"], keys["global-metrics"]):
        r = httpx.post(f"{srv.base_url}/v1/completions", headers=_auth(key),
                       json={"prompt": "Hello", "max_tokens": 1}, timeout=30)
        _error(r, 403, "insufficient_scope")
        _error(httpx.get(f"{srv.base_url}/admin/tenants", headers=_auth(key), timeout=10), 403,
               "insufficient_scope")
    assert httpx.get(f"{srv.base_url}/health", timeout=10).status_code == 200  # probes stay open
    assert_clean(srv)


# ---- the data directory is private ------------------------------------------------------------

def test_an_existing_world_readable_data_dir_is_refused(srv: ServerProcess) -> None:
    refused: subprocess.CompletedProcess[str] = srv.refused  # type: ignore[attr-defined]
    out = refused.stdout + refused.stderr
    assert refused.returncode == 2, out
    assert f"chmod 700 {srv.data_dir}" in out and "0755" in out, out  # type: ignore[attr-defined]
    assert "Traceback" not in out, out
    assert "--metrics-auth is deprecated" in out, out
    assert srv.left == []  # type: ignore[attr-defined]  # nothing was created in it


def test_the_database_files_are_private(srv: ServerProcess) -> None:
    data: Path = srv.data_dir  # type: ignore[attr-defined]
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    files = sorted(p.name for p in data.iterdir())
    assert "lockgate.db" in files and "lockgate.db-wal" in files, files
    for name in files:
        assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name
