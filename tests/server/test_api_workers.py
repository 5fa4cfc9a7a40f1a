"""`lockgate serve --api-workers 2`: two API processes on one port, one set of engine cores.

One real server (the fake engine: 2 replicas, one request per batch, slow steps, so requests
queue): requests through the one port are answered by both workers; the cores are the ones a
single worker would run; /metrics counts every worker's requests; admission sees the whole
server's queue (a worker's queued requests show in the primary's view); a dead worker is
restarted (an attached one alone, the primary with new cores the other worker follows); SIGTERM
drains both workers' in-flight streams and the server exits 0 with no process left behind.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from lockgate.bench.procs import children, pid_alive
from lockgate.server.__main__ import app as cli_app
from tests.server.conftest import ServerProcess, start_server, wait_for

WORKER = "x-lockgate-worker"
STEP_S = 0.02
REPLICAS = 2


def _descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        for kid in children(todo.pop()):
            if pid_alive(kid):
                out.append(kid)
                todo.append(kid)
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _cores(srv: ServerProcess) -> list[int]:
    return [p for p in _descendants(srv.pid) if "lockgate.engine.core" in _cmdline(p)]


def _workers(srv: ServerProcess) -> list[int]:
    return [p for p in children(srv.pid) if pid_alive(p)]


def _complete(srv: ServerProcess, max_tokens: int = 2) -> httpx.Response:
    """One request on a connection of its own (the kernel picks the worker per connection)."""
    with httpx.Client(base_url=srv.base_url, timeout=30) as c:
        return c.post("/v1/completions", json={"prompt": "hi", "max_tokens": max_tokens})


def _answers(srv: ServerProcess, n: int) -> list[httpx.Response]:
    """`n` concurrent requests, each on its own connection."""
    out: list[httpx.Response] = []
    threads = [threading.Thread(target=lambda: out.append(_complete(srv))) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _spread(srv: ServerProcess, n: int) -> dict[str, int]:
    """How many of `n` concurrent requests each worker answered (all must succeed)."""
    seen: dict[str, int] = {}
    for r in _answers(srv, n):
        assert r.status_code == 200, r.text
        seen[r.headers[WORKER]] = seen.get(r.headers[WORKER], 0) + 1
    return seen


def _serving(srv: ServerProcess, n: int = 8) -> set[str]:
    """The workers that answered some of `n` requests successfully (a restart may refuse some)."""
    return {r.headers[WORKER] for r in _answers(srv, n) if r.status_code == 200}


class Stream:
    """A streamed completion read in a thread; its worker known from the response's headers."""

    def __init__(self, srv: ServerProcess, max_tokens: int) -> None:
        self.client = httpx.Client(base_url=srv.base_url, timeout=60)
        self.cm = self.client.stream("POST", "/v1/completions",
                                     json={"prompt": "hi", "max_tokens": max_tokens, "stream": True})
        self.response = self.cm.__enter__()
        assert self.response.status_code == 200
        self.worker = self.response.headers[WORKER]
        self.tokens = 0
        self.finish: str | None = None
        self.done = False
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for line in self.response.iter_lines():
                if line == "data: [DONE]":
                    self.done = True
                elif line.startswith("data: "):
                    choice = json.loads(line[6:])["choices"][0]
                    self.tokens += 1
                    self.finish = choice.get("finish_reason") or self.finish
        except BaseException as exc:  # noqa: BLE001 - the test asserts on it
            self.error = exc

    def close(self) -> None:
        self.cm.__exit__(None, None, None)
        self.client.close()


def _streams_on_both(srv: ServerProcess, max_tokens: int, each: int = 1, limit: int = 30) -> list[Stream]:
    """Open streams until each worker holds at least `each`."""
    streams: list[Stream] = []
    while len(streams) < limit:
        streams.append(Stream(srv, max_tokens))
        if all(sum(s.worker == w for s in streams) >= each for w in ("0", "1")):
            return streams
    raise AssertionError(f"{limit} connections all went to workers {sorted({s.worker for s in streams})}")


@pytest.fixture(scope="module")
def srv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    s = start_server(tmp_path_factory.mktemp("api-workers"), "--api-workers", "2", "--load-format", "fake",
                     "--replicas", str(REPLICAS), "--max-num-seqs", "1", "--fake-step-delay", str(STEP_S),
                     "--no-slo-admission", "--request-log", "off",
                     "--data-dir", str(tmp_path_factory.mktemp("api-workers-data") / "data"))
    # Both workers up (the attached one comes up just after the primary).
    assert wait_for(lambda: _serving(s) == {"0", "1"}, 20)
    yield s
    s.stop()


def test_the_option_is_checked() -> None:
    runner = CliRunner()
    for bad in ("0", "65"):
        result = runner.invoke(cli_app, ["--api-workers", bad, "--load-format", "fake"])
        assert result.exit_code == 2, result.output
        assert "--api-workers must be an integer from 1 to 64" in result.output


def test_both_workers_answer_on_one_port_sharing_the_cores(srv: ServerProcess) -> None:
    seen = _spread(srv, 16)
    assert set(seen) == {"0", "1"}, seen
    assert len(_workers(srv)) == 2  # two API processes under the parent
    cores = _cores(srv)
    assert len(cores) == REPLICAS  # what one worker would run: the second attaches, starts none
    assert all(p in children(_workers(srv)[0]) or p in children(_workers(srv)[1]) for p in cores)
    assert len({pid for w in _workers(srv) for pid in children(w) if pid in cores}) == REPLICAS
    assert httpx.get(f"{srv.base_url}/health").json()["status"] == "ok"


def test_metrics_count_every_workers_requests(srv: ServerProcess) -> None:
    before = srv.metrics()
    seen = _spread(srv, 12)
    assert set(seen) == {"0", "1"}, seen
    pages = [srv.metrics() for _ in range(4)]  # whichever worker answers the scrape: the same totals
    for m in pages:
        assert m["lockgate:request_success_total"] - before.get("lockgate:request_success_total", 0) == 12
        assert m["lockgate:generation_tokens_total"] - before.get("lockgate:generation_tokens_total", 0) == 24
        assert m["lockgate:kv_cache_total_blocks"] == pages[0]["lockgate:kv_cache_total_blocks"]  # the primary's view
        assert m["lockgate:engine_healthy"] == 1


def test_admission_sees_the_whole_servers_queue(srv: ServerProcess) -> None:
    """Each core runs one request at a time; the rest wait. The queue admission reads (the
    num_requests_queued gauge is the primary's view) counts the other worker's requests too."""
    # Three on each worker: with two running in all, each worker has some queued.
    streams = _streams_on_both(srv, max_tokens=400, each=3)
    try:
        total = len(streams)
        expected = total - REPLICAS  # one running per core, the rest queued

        def load() -> tuple[float, float]:
            m = srv.metrics()
            return m["lockgate:num_requests_queued"], m["lockgate:num_requests_in_flight"]

        # Queued: the whole server's, in the primary's view; in flight: each worker's, summed.
        assert wait_for(lambda: load() == (expected, total), 10), (load(), expected, [s.worker for s in streams])
    finally:
        for s in streams:
            s.close()
    assert wait_for(lambda: srv.metrics()["lockgate:num_requests_queued"] == 0, 10)


def test_a_dead_worker_is_restarted(srv: ServerProcess) -> None:
    primary, attached = _workers(srv)
    cores = sorted(_cores(srv))
    os.kill(attached, signal.SIGKILL)  # an attached worker: the cores see it go (its pidfd), nothing more
    assert wait_for(lambda: len(_workers(srv)) == 2 and attached not in _workers(srv), 10)
    assert wait_for(lambda: srv.log_text().count(f"API process {attached} detached") == REPLICAS, 5)
    assert wait_for(lambda: _serving(srv) == {"0", "1"}, 20)
    assert sorted(_cores(srv)) == cores
    os.kill(primary, signal.SIGKILL)  # the primary: its cores go with it; new ones, which worker 1 follows
    assert wait_for(lambda: len(_cores(srv)) == REPLICAS and not set(_cores(srv)) & set(cores), 30)
    assert wait_for(lambda: _serving(srv) == {"0", "1"}, 30)
    assert set(_spread(srv, 12)) == {"0", "1"}  # and all succeed again
    assert srv.proc.poll() is None


def test_sigterm_drains_every_worker_and_exits_0(srv: ServerProcess) -> None:
    """Last: it stops the module's server."""
    streams = _streams_on_both(srv, max_tokens=30)
    processes = _descendants(srv.pid)
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(60) == 0, srv.log_text()[-4000:]
    for s in streams:
        s.thread.join(10)
        assert s.error is None, s.error
        assert s.done and s.finish == "length" and s.tokens >= 30, (s.worker, s.tokens, s.finish,
                                                                     srv.log_text()[-4000:])
        s.close()
    assert {s.worker for s in streams} == {"0", "1"}
    assert not [p for p in processes if pid_alive(p)]  # workers and cores all gone
    assert time.monotonic() - t0 < 30
    with pytest.raises(httpx.ConnectError):  # nobody listens any more
        httpx.get(f"{srv.base_url}/health", timeout=2)
