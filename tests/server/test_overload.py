"""The bounded waiting queue: when full, new requests get 429 + Retry-After at once (fake engine:
one token per 20 ms step, so a running request holds its slot while the queue fills)."""
from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import httpx
import pytest

from tests.server.conftest import ServerProcess, start_server, wait_for


@pytest.fixture(scope="module")
def small_queue(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # One request runs at a time; at most 2 requests / 200 prompt tokens may wait.
    # Queue bounds only: SLO admission would refuse some of these earlier (tests/server/test_slo.py).
    srv = start_server(tmp_path_factory.mktemp("overload"), "--load-format", "fake", "--fake-step-delay", "0.02",
                       "--max-num-seqs", "1", "--no-slo-admission",
                       "--max-queued-requests", "2", "--max-queued-tokens", "200")
    yield srv
    srv.stop()


class _Background:
    """A streaming request held open on a thread until `close()`."""

    def __init__(self, base_url: str, prompt: str) -> None:
        self.first = threading.Event()
        self.status: int | None = None
        self._stop = threading.Event()
        self._sock: socket.socket | None = None
        self._client = httpx.Client(timeout=300)
        body = {"prompt": prompt, "max_tokens": 1000, "ignore_eos": True, "stream": True}
        self._t = threading.Thread(target=self._run, args=(base_url, body), daemon=True)
        self._t.start()

    def _run(self, base_url: str, body: dict) -> None:
        try:
            with self._client.stream("POST", f"{base_url}/v1/completions", json=body) as r:
                self.status = r.status_code
                self._sock = r.extensions["network_stream"].get_extra_info("socket")
                for line in r.iter_lines():
                    if line.startswith("data: ") and '"text":"' in line:
                        self.first.set()
                    if self._stop.is_set():
                        return
        except (httpx.HTTPError, RuntimeError):
            pass  # closed under us by close()

    def close(self) -> None:
        self._stop.set()
        # Hangs up even while no chunk arrives (a queued request). Closing the client alone does
        # not: the socket stays open while the thread blocks reading it, so a queued request stayed
        # queued, ran when it got the slot, and close() waited for it (up to the 1000 tokens, 20 s).
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed
        self._client.close()
        self._t.join(30)


def _queued(srv: ServerProcess) -> float:
    return srv.metrics()["lockgate:num_requests_queued"]


def test_queue_full_gives_429(small_queue: ServerProcess) -> None:
    url = small_queue.base_url
    running = _Background(url, "Tell me a story.")
    waiting: list[_Background] = []
    try:
        assert running.first.wait(120), "the first request never started"
        waiting = [_Background(url, "Short one."), _Background(url, "Short two.")]
        assert wait_for(lambda: _queued(small_queue) == 2, timeout=10)
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "one too many", "max_tokens": 2}, timeout=10)
        assert r.status_code == 429, r.text
        assert int(r.headers["Retry-After"]) >= 1
        err = r.json()["error"]
        assert err["code"] == "queue_full" and err["type"] == "rate_limit_error"
        assert small_queue.metrics()["lockgate:requests_rejected_total"] >= 1
    finally:
        for b in [running, *waiting]:
            b.close()
    # Once the queue empties, requests are accepted again.
    assert wait_for(lambda: small_queue.metrics()["lockgate:num_requests_in_flight"] == 0, timeout=15)
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "hello", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200


def test_queued_tokens_bound(small_queue: ServerProcess) -> None:
    url = small_queue.base_url
    running = _Background(url, "Tell me a story.")
    waiting: _Background | None = None
    try:
        assert running.first.wait(120)
        waiting = _Background(url, "Short one.")
        assert wait_for(lambda: _queued(small_queue) == 1, timeout=10)
        long_prompt = " ".join(["word"] * 300)  # ~300 tokens: over the 200-token queue bound
        r = httpx.post(f"{url}/v1/completions", json={"prompt": long_prompt, "max_tokens": 2}, timeout=10)
        assert r.status_code == 429, r.text
        assert "Retry-After" in r.headers
    finally:
        running.close()
        if waiting is not None:
            waiting.close()


def test_openai_sdk_sees_rate_limit(small_queue: ServerProcess) -> None:
    import openai

    url = small_queue.base_url
    running = _Background(url, "Tell me a story.")
    waiting: list[_Background] = []
    try:
        assert running.first.wait(120)
        waiting = [_Background(url, "a"), _Background(url, "b")]
        assert wait_for(lambda: _queued(small_queue) == 2, timeout=10)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.completions.create(model="SmolLM2-135M-Instruct", prompt="hi", max_tokens=2)
    finally:
        for b in [running, *waiting]:
            b.close()
