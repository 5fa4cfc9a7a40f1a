"""Process life cycle: SIGTERM drains, and a dead engine process is replaced.

On the fake engine (the model's tokens are not the point): one token per 50 ms step, so a
stream lasts as long as its max_tokens says.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.server.conftest import pid_alive, start_server, wait_for

MODEL = "SmolLM2-135M-Instruct"
FAKE = ["--load-format", "fake", "--fake-step-delay", "0.05"]


class _Stream:
    """Reads one streaming completion on a thread; keeps its events."""

    def __init__(self, base_url: str, max_tokens: int) -> None:
        self.events: list[str] = []
        self.first = threading.Event()
        self.done = threading.Event()
        body = {"prompt": "Count slowly:", "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
        threading.Thread(target=self._run, args=(base_url, body), daemon=True).start()

    def _run(self, base_url: str, body: dict) -> None:
        try:
            with httpx.stream("POST", f"{base_url}/v1/completions", json=body, timeout=200) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[6:])
                        self.first.set()
        except httpx.HTTPError as exc:
            self.events.append(f"transport error: {exc}")
        finally:
            self.done.set()

    def payloads(self) -> list[dict]:
        return [json.loads(e) for e in self.events if e.startswith("{")]


def _health(base_url: str) -> int:
    try:
        return httpx.get(f"{base_url}/health", timeout=1).status_code
    except httpx.HTTPError:
        return -1


def test_sigterm_drains_in_flight_then_exits(tmp_path: Path) -> None:
    srv = start_server(tmp_path, *FAKE, "--drain-timeout", "150")
    try:
        engine = srv.engine_pid()
        stream = _Stream(srv.base_url, max_tokens=80)  # about 4 s
        assert stream.first.wait(120)
        srv.proc.send_signal(signal.SIGTERM)
        # New requests are refused at once, and health tells load balancers to go away.
        assert wait_for(lambda: _health(srv.base_url) == 503, timeout=2)
        r = httpx.post(f"{srv.base_url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=5)
        assert r.status_code == 503 and r.json()["error"]["code"] == "server_draining"
        assert not stream.done.is_set(), "the in-flight request should still be streaming"
        # The in-flight request finishes normally...
        assert stream.done.wait(120)
        assert stream.events[-1] == "[DONE]"
        texts = [c for p in stream.payloads() for c in p.get("choices", [])]
        assert texts[-1]["finish_reason"] == "length"
        # ...then both processes exit cleanly.
        assert srv.proc.wait(60) == 0
        assert wait_for(lambda: not pid_alive(engine), timeout=10)
    finally:
        srv.stop()


def test_drain_timeout_cuts_long_requests(tmp_path: Path) -> None:
    srv = start_server(tmp_path, *FAKE, "--drain-timeout", "1")
    try:
        stream = _Stream(srv.base_url, max_tokens=5000)
        assert stream.first.wait(120)
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        assert stream.done.wait(30)
        errors = [p["error"] for p in stream.payloads() if "error" in p]
        assert errors and errors[0]["code"] == "engine_unavailable", stream.events[-3:]
        assert srv.proc.wait(30) == 0
        assert time.monotonic() - t0 < 20
    finally:
        srv.stop()


def test_engine_death_fails_requests_and_recovers(tmp_path: Path) -> None:
    srv = start_server(tmp_path, *FAKE)
    try:
        engine = srv.engine_pid()
        client = openai.OpenAI(base_url=f"{srv.base_url}/v1", api_key="x", max_retries=0, timeout=60)
        stream = _Stream(srv.base_url, max_tokens=2000)
        blocking_error: list[BaseException] = []

        def non_streaming() -> None:
            try:
                client.completions.create(model=MODEL, prompt="Go on and on", max_tokens=2000,
                                          extra_body={"ignore_eos": True})
            except openai.APIError as exc:
                blocking_error.append(exc)

        t = threading.Thread(target=non_streaming, daemon=True)
        t.start()
        assert stream.first.wait(120)
        os.kill(engine, signal.SIGKILL)
        t0 = time.monotonic()
        # Noticed at once (the supervisor awaits the process): well under the 5 s health-check
        # period of a typical load balancer, even on a loaded 2-core CI box.
        assert wait_for(lambda: _health(srv.base_url) == 503, timeout=5.0)
        assert time.monotonic() - t0 < 5.0
        # Every in-flight request ends with a clear error, none hangs.
        assert stream.done.wait(10)
        errors = [p["error"] for p in stream.payloads() if "error" in p]
        assert errors and errors[0]["code"] == "engine_dead"
        t.join(10)
        assert blocking_error and isinstance(blocking_error[0], openai.APIStatusError)
        assert blocking_error[0].status_code == 503
        # The supervisor brings a new engine up; requests work again.
        srv.wait_healthy(180)
        r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3)
        assert r.choices[0].text is not None and r.usage.completion_tokens >= 1
        assert srv.engine_pid() != engine
        assert srv.metrics()["lockgate:engine_restarts_total"] == 1
    finally:
        srv.stop()


@pytest.mark.parametrize("bad", [["--max-num-seqs", "0"], ["--model", "/no/such/model.gguf"]])
def test_bad_startup_exits_nonzero(tmp_path: Path, bad: list[str]) -> None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "lockgate.server", "--port", "1", *bad],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
