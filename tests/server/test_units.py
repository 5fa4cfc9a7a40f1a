"""In-process checks that need no model: wire messages, stream merging, the guard middleware."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import msgspec
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.requests import Request
from starlette.responses import JSONResponse

from lockgate.engine.config import EngineConfig
from lockgate.engine.frontend.stream import RequestStream
from lockgate.engine.messages import AddRequests, ClientMessage, EngineCoreRequest, decode_config, encode_config
from lockgate.engine.outputs import CompletionOutput, RequestOutput
from lockgate.engine.sampling_params import SamplingParams
from lockgate.server.config import ServerConfig
from lockgate.server.errors import install_error_handlers
from lockgate.server.middleware import GuardMiddleware


def test_messages_round_trip_without_pickle() -> None:
    req = EngineCoreRequest("r1", [1, 2, 3], SamplingParams(n=1, temperature=0.5, stop=["x"], seed=7), 12.5)
    data = msgspec.msgpack.encode(AddRequests([req]))
    back = msgspec.msgpack.Decoder(ClientMessage).decode(data)
    assert isinstance(back, AddRequests) and back.requests[0] == req
    cfg = EngineConfig(max_num_seqs=8, num_threads=1)
    assert decode_config(encode_config(cfg)) == cfg


def test_invalid_params_are_refused_on_decode() -> None:
    # SamplingParams validates in __post_init__, which msgspec runs on decode too.
    bad = msgspec.msgpack.encode({"type": "add", "requests": [
        {"request_id": "r", "prompt_token_ids": [1], "params": {"temperature": -1}, "arrival_time": 0.0}]})
    with pytest.raises(msgspec.ValidationError):
        msgspec.msgpack.Decoder(ClientMessage).decode(bad)


def _out(text: str, ids: list[int], finished: bool = False) -> RequestOutput:
    c = CompletionOutput(0, text, ids, "length" if finished else None, delta_text=text[-1:], delta_token_ids=ids[-1:])
    return RequestOutput("r", None, [1], [c], finished)


def test_stream_merges_backlog_and_ends() -> None:
    ended: list[str] = []
    s = RequestStream("r", 1, 3, lambda st: ended.append(st.request_id))

    async def read() -> list[RequestOutput]:
        return [o async for o in s]

    s.put(_out("a", [1]))
    s.put(_out("ab", [1, 2]))
    s.put(_out("abc", [1, 2, 3], finished=True))
    outs = asyncio.run(read())
    assert len(outs) == 1  # three pending outputs read as one
    c = outs[0].outputs[0]
    assert (c.delta_text, c.delta_token_ids, c.text, c.finish_reason) == ("abc", [1, 2, 3], "abc", "length")
    assert ended == ["r"] and s.finished_normally


def test_stream_failure_surfaces_after_pending_outputs() -> None:
    s = RequestStream("r", 1, 3, lambda st: None)
    s.put(_out("a", [1]))
    s.fail(RuntimeError("engine died"))

    async def read() -> tuple[list[RequestOutput], BaseException | None]:
        got = []
        try:
            async for o in s:
                got.append(o)
        except RuntimeError as exc:
            return got, exc
        return got, None

    got, exc = asyncio.run(read())
    assert len(got) == 1 and isinstance(exc, RuntimeError)


class _Metrics:
    """Records what the guard reports."""

    def __init__(self) -> None:
        self.rejected: list[str] = []
        self.responses: list[tuple[str, int]] = []
        self.errors: list[tuple[int, str | None]] = []
        self.failures: list[str] = []

    def reject(self, reason: str) -> None:
        self.rejected.append(reason)

    def http_response(self, route: str, status: int) -> None:
        self.responses.append((route, status))

    def error(self, status: int, code: str | None) -> None:
        self.errors.append((status, code))

    def fail(self, reason: str) -> None:
        self.failures.append(reason)


JSON = {"Content-Type": "application/json"}


def _guarded_app(tenant_key: str | None = None, **cfg: object) -> tuple[TestClient, SimpleNamespace]:
    from tests.server.test_guard import gateway_with

    cfg.setdefault("allowed_hosts", ["testserver"])  # TestClient's Host
    ctx = SimpleNamespace(config=ServerConfig(**cfg), draining=False, inflight=0, metrics=_Metrics(),
                          gateway=gateway_with(tenant_key=tenant_key))
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/echo")
    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({"size": len(await request.body()), "inflight": ctx.inflight})

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    app.add_middleware(GuardMiddleware, state=ctx)
    return TestClient(app), ctx


def test_guard_api_key() -> None:
    client, _ = _guarded_app(tenant_key="sekret")
    r = client.post("/echo", content=b"{}", headers=JSON)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert client.post("/echo", content=b"{}", headers={**JSON, "Authorization": "Bearer wrong"}).status_code == 401
    ok = client.post("/echo", content=b"{}", headers={**JSON, "Authorization": "Bearer sekret"})
    assert ok.status_code == 200 and ok.json()["inflight"] == 1
    assert client.get("/health").status_code == 200  # on the allowlist


def test_guard_body_limit_and_drain() -> None:
    client, ctx = _guarded_app(max_request_body_bytes=100)
    assert client.post("/echo", content=b"x" * 100, headers=JSON).json()["size"] == 100
    r = client.post("/echo", content=b"x" * 101, headers=JSON)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    ctx.draining = True
    r = client.post("/echo", content=b"{}", headers=JSON)
    assert r.status_code == 503 and r.json()["error"]["code"] == "server_draining"
    assert client.get("/health").status_code == 200  # the route itself reports draining in the real app
