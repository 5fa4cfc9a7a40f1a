"""Stall watchdog: an engine that is alive but stuck is noticed, its requests fail cleanly,
it is restarted, and requests afterwards succeed. An idle engine is never declared stuck."""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import msgspec
import zmq

from lockgate.engine.config import EngineConfig
from lockgate.engine.core.proc import CoreLoop
from lockgate.engine.frontend.watchdog import StallWatchdog
from lockgate.engine.messages import CoreMessage, EngineStats, Shutdown, StepOutputs
from tests.server.conftest import start_server

# Short, but well above a step of the fake engine (no weights to page in) on a loaded 2-core box.
STALL_TIMEOUT_S = 3.0
MARGIN_S = 30.0  # generous: a loaded 2-core CI box
HANG_AT_STEP = 5


# ---- unit level ----------------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _watchdog(clock: _Clock, state: dict[str, bool], stalls: list[float]) -> StallWatchdog:
    return StallWatchdog(STALL_TIMEOUT_S, is_active=lambda: state["active"], has_pending=lambda: state["pending"],
                         on_stall=stalls.append, clock=clock)


def test_watchdog_never_fires_without_pending_work() -> None:
    clock, stalls = _Clock(), []
    state = {"active": True, "pending": False}
    wd = _watchdog(clock, state, stalls)
    for _ in range(100):  # an idle engine that sends nothing at all for a long time
        clock.t += 10
        assert wd.check() is None
    # Work appears: the clock starts now, not at the last message from the core.
    state["pending"] = True
    clock.t += STALL_TIMEOUT_S - 0.1
    assert wd.check() is None
    wd.progress()  # the core is stepping
    clock.t += STALL_TIMEOUT_S - 0.1
    assert wd.check() is None
    clock.t += 0.2
    assert wd.check() is not None
    # No core up (restarting): never a stall.
    state["active"] = False
    clock.t += 100
    assert wd.check() is None


def test_a_reader_that_catches_up_within_the_grace_period_is_no_stall() -> None:
    """A busy event loop, not a stuck core: the reader gets one more chance before the verdict."""
    import asyncio

    stalls: list[float] = []
    state = {"active": True, "pending": True}
    def on_stall(seconds: float) -> None:  # as the client does: the core is killed, not serving
        stalls.append(seconds)
        state["active"] = False

    wd = StallWatchdog(0.2, is_active=lambda: state["active"], has_pending=lambda: state["pending"],
                       on_stall=on_stall)

    suspected = asyncio.Event()
    check = wd.check

    def spying_check() -> float | None:
        out = check()
        if out is not None:
            suspected.set()
        return out

    wd.check = spying_check  # type: ignore[method-assign]

    async def reader_behind() -> None:
        await suspected.wait()  # past the timeout, the watchdog suspects a stall ...
        while True:  # ... but the reader drains waiting messages as soon as it runs
            wd.progress()
            await asyncio.sleep(0.01)

    async def main() -> None:
        task = asyncio.ensure_future(reader_behind())
        watch = asyncio.ensure_future(wd.run())
        await asyncio.sleep(1.5)
        assert stalls == [], stalls
        task.cancel()  # now the core really says nothing
        await asyncio.sleep(1.0)
        watch.cancel()

    asyncio.run(main())
    assert len(stalls) == 1


def test_watchdog_disabled_with_zero_timeout() -> None:
    for timeout in (0, None):
        wd = StallWatchdog(timeout, is_active=lambda: True, has_pending=lambda: True,
                           on_stall=lambda s: None)
        assert not wd.enabled and wd.check() is None


class _BusyCore:
    """Stands in for EngineCore: `steps` steps of `step_s` each that produce no output
    (a long chunked prefill)."""

    def __init__(self, steps: int, step_s: float) -> None:
        self.left, self.step_s = steps, step_s
        self.last_step_end = time.monotonic()  # stamped on every StepOutputs

    def has_unfinished_requests(self) -> bool:
        return self.left > 0

    def step(self) -> list:
        time.sleep(self.step_s)
        self.left -= 1
        self.last_step_end = time.monotonic()
        return []

    def take_failed(self) -> list:  # no request is ever dropped here
        return []

    def stats(self) -> EngineStats:
        return EngineStats(1, 0, 0, 0, 0, 0.0, 0, 0, 0)


def test_core_heartbeats_while_busy_without_outputs(tmp_path: Path) -> None:
    ctx = zmq.Context()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    push.bind(f"ipc://{tmp_path}/in")
    pull.bind(f"ipc://{tmp_path}/out")
    # A hang option is set, but this is a restarted core (generation 2): it must not hang.
    loop = CoreLoop(EngineConfig(debug_hang_at_step=1), f"ipc://{tmp_path}/in", f"ipc://{tmp_path}/out",
                    generation=2)
    loop.core = _BusyCore(steps=20, step_s=0.1)  # ~2 s of steps with no output
    rc: list[int] = []
    thread = threading.Thread(target=lambda: rc.append(loop.run()), daemon=True)
    decoder = msgspec.msgpack.Decoder(CoreMessage)
    try:
        thread.start()
        busy_beats = 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if not pull.poll(5000):
                break
            msg = decoder.decode(pull.recv())
            assert isinstance(msg, StepOutputs) and not msg.outputs
            if loop.core.left == 0:
                break
            busy_beats += 1
        assert loop.num_steps == 20
        assert busy_beats >= 2, "a busy core must send heartbeats even when steps produce no output"
        push.send(msgspec.msgpack.encode(Shutdown()))
        thread.join(30)
        assert rc == [0]
    finally:
        loop.close()
        push.close(0)
        pull.close(0)
        ctx.term()


# ---- a real server --------------------------------------------------------------------------


def _health(base_url: str) -> int:
    try:
        return httpx.get(f"{base_url}/health", timeout=2).status_code
    except httpx.HTTPError:
        return -1


def test_stuck_engine_is_detected_and_restarted(tmp_path: Path) -> None:
    # The fake engine: the watchdog watches the core loop's steps, not the model's tokens.
    srv = start_server(tmp_path, "--load-format", "fake", "--fake-step-delay", "0.02",
                       "--engine-stall-timeout", str(STALL_TIMEOUT_S), "--debug-hang-at-step", str(HANG_AT_STEP))
    try:
        engine = srv.engine_pid()
        # Steps 1-2 (a cold engine's first step may be slow, but not a stall).
        r = httpx.post(f"{srv.base_url}/v1/completions",
                       json={"prompt": "Hello", "max_tokens": 2, "ignore_eos": True}, timeout=60)
        assert r.status_code == 200, r.text
        assert srv.metrics().get("lockgate:engine_stalls_total") == 0
        assert _health(srv.base_url) == 200 and srv.engine_pid() == engine

        # A streaming request gets the tokens of steps 3 and 4, then the engine hangs in step 5.
        events: list[str] = []
        first, done = threading.Event(), threading.Event()

        def streaming() -> None:
            body = {"prompt": "Count slowly:", "max_tokens": 50, "ignore_eos": True, "stream": True}
            try:
                with httpx.stream("POST", f"{srv.base_url}/v1/completions", json=body, timeout=120) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            events.append(line[6:])
                            first.set()
            except httpx.HTTPError as exc:
                events.append(f"transport error: {exc}")
            finally:
                done.set()

        blocking: list[httpx.Response] = []

        def non_streaming() -> None:
            body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 20}
            blocking.append(httpx.post(f"{srv.base_url}/v1/chat/completions", json=body, timeout=120))

        threading.Thread(target=streaming, daemon=True).start()
        assert first.wait(120), events
        t0 = time.monotonic()
        t = threading.Thread(target=non_streaming, daemon=True)
        t.start()

        # Detected within the stall timeout (plus a generous margin); both requests end cleanly.
        assert done.wait(STALL_TIMEOUT_S + MARGIN_S), "the stuck engine was not noticed"
        assert time.monotonic() - t0 < STALL_TIMEOUT_S + MARGIN_S
        assert _health(srv.base_url) == 503  # restarting
        payloads = [json.loads(e) for e in events if e.startswith("{")]
        assert any("choices" in p for p in payloads)  # it did stream before the hang
        errors = [p["error"] for p in payloads if "error" in p]
        assert errors and errors[0]["code"] == "engine_dead", events[-3:]
        assert "stopped making progress" in errors[0]["message"]
        t.join(STALL_TIMEOUT_S + MARGIN_S)
        assert blocking, "the non-streaming request did not end"
        r = blocking[0]
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert err["code"] == "engine_dead" and "stopped making progress" in err["message"]
        assert set(err) >= {"message", "type", "code"}

        # A new engine comes up (the hang option only affects the first one); requests work again.
        srv.wait_healthy(180)
        assert srv.engine_pid() != engine
        m = srv.metrics()
        assert m["lockgate:engine_stalls_total"] == 1
        assert m["lockgate:engine_restarts_total"] == 1
        r = httpx.post(f"{srv.base_url}/v1/completions",
                       json={"prompt": "Hello", "max_tokens": 5, "ignore_eos": True}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 5
        with httpx.stream("POST", f"{srv.base_url}/v1/completions", timeout=60,
                          json={"prompt": "Hi", "max_tokens": 4, "ignore_eos": True, "stream": True}) as s:
            lines = [ln[6:] for ln in s.iter_lines() if ln.startswith("data: ")]
        assert lines[-1] == "[DONE]" and not any('"error"' in ln for ln in lines)
        assert "made no progress" in srv.log_text()
    finally:
        srv.stop()


def test_overload_with_the_watchdog_on_never_wedges_the_reader(tmp_path: Path) -> None:
    """Regression: the watchdog once asked the ZeroMQ socket whether data waited (ZMQ_EVENTS),
    which consumed the asyncio socket's wake-up: under load the output reader then slept
    forever and every later completion hung while /health still said ok."""
    import asyncio

    import httpx

    srv = start_server(tmp_path, "--load-format", "fake", "--engine-stall-timeout", "2")
    try:
        body = {"prompt": "Write one word about the sea.", "max_tokens": 1}

        async def burst() -> int:
            limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
            async with httpx.AsyncClient(base_url=srv.base_url, limits=limits, timeout=3) as c:
                async def one() -> int:
                    try:
                        return (await c.post("/v1/completions", json=body)).status_code
                    except httpx.HTTPError:
                        return 0
                results = []
                for _ in range(8):  # waves of requests while the watchdog checks every 0.5 s
                    results += await asyncio.gather(*(one() for _ in range(100)))
                return results.count(200)

        assert asyncio.run(burst()) > 0
        for _ in range(5):  # afterwards every request is answered
            r = httpx.post(f"{srv.base_url}/v1/completions", json=body, timeout=30)
            assert r.status_code == 200, r.text
    finally:
        srv.stop()
