"""Hostile input against a real server: huge integers, template arguments, content types,
Host/Origin, HTTP framing, slow and idle connections, injected failures at every admission
step. Afterwards nothing is queued, in flight or holding KV blocks, and requests still work.
The server runs the fake engine: none of this depends on the model's tokens."""
from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from lockgate.gateway.lease import FAULT_POINTS
from lockgate.server.prompts import RESERVED_TEMPLATE_KEYS
from tests.server.conftest import ServerProcess, start_server, wait_for

CHAT = [{"role": "user", "content": "hi"}]
JSON = {"content-type": "application/json"}
HEADER_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 2.0
HUGE = [2**64, 2**70, -(2**70)]

COMPLETION_INT_FIELDS = ["n", "max_tokens", "seed", "top_k", "min_tokens", "priority", "logprobs", "best_of"]
CHAT_INT_FIELDS = ["n", "max_tokens", "max_completion_tokens", "seed", "top_k", "min_tokens", "priority",
                   "top_logprobs"]


@pytest.fixture(scope="module")
def hard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = start_server(tmp_path_factory.mktemp("hard"), "--load-format", "fake", "--fake-step-delay", "0.01",
                       "--enable-fault-injection",
                       "--allowed-origins", "https://app.example",
                       "--header-timeout", str(HEADER_TIMEOUT_S), "--body-timeout", str(BODY_TIMEOUT_S),
                       "--max-model-len", "512", "--num-kv-blocks", "64", "--scheduling-policy", "fcfs")
    yield srv
    srv.stop()


def _error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and err["type"] and err["code"], err
    if code is not None:
        assert err["code"] == code, err
    if param is not None:
        assert err["param"] == param, err
    return err


def assert_clean(srv: ServerProcess) -> None:
    """Nothing queued or in flight, every KV block free, and a normal request completes."""
    def idle() -> bool:
        m = srv.metrics()
        return (m["lockgate:num_requests_queued"] == 0 and m["lockgate:num_requests_in_flight"] == 0
                and m["lockgate:num_requests_running"] == 0
                and m["lockgate:kv_cache_free_blocks"] == m["lockgate:kv_cache_total_blocks"])
    assert wait_for(idle, 30), srv.metrics()
    r = httpx.post(f"{srv.base_url}/v1/completions", json={"prompt": "Hello", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1, r.text


# ---- integers past any bound ------------------------------------------------------------------

@pytest.mark.parametrize("field", COMPLETION_INT_FIELDS)
@pytest.mark.parametrize("value", HUGE)
def test_huge_integers_in_completions(hard: ServerProcess, field: str, value: int) -> None:
    body = {"prompt": "hi", "max_tokens": 1, field: value}
    r = httpx.post(f"{hard.base_url}/v1/completions", content=json.dumps(body), headers=JSON, timeout=30)
    _error(r, 400, param=field)


@pytest.mark.parametrize("field", CHAT_INT_FIELDS)
@pytest.mark.parametrize("value", HUGE)
def test_huge_integers_in_chat(hard: ServerProcess, field: str, value: int) -> None:
    body = {"messages": CHAT, "max_tokens": 1, field: value}
    r = httpx.post(f"{hard.base_url}/v1/chat/completions", content=json.dumps(body), headers=JSON, timeout=30)
    _error(r, 400, param=field)


@pytest.mark.parametrize("value", HUGE)
def test_huge_integers_in_lists(hard: ServerProcess, value: int) -> None:
    for route, body, param in [
        ("/v1/completions", {"prompt": "hi", "stop_token_ids": [value]}, "stop_token_ids.0"),
        ("/v1/chat/completions", {"messages": CHAT, "stop_token_ids": [1, value]}, "stop_token_ids.1"),
        ("/detokenize", {"tokens": [value]}, "tokens.0"),
        ("/v1/completions", {"prompt": [1, value]}, None),
    ]:
        r = httpx.post(f"{hard.base_url}{route}", content=json.dumps(body), headers=JSON, timeout=30)
        _error(r, 400, param=param)


def test_priority_is_refused_when_the_policy_ignores_it(hard: ServerProcess) -> None:
    r = httpx.post(f"{hard.base_url}/v1/chat/completions", json={"messages": CHAT, "priority": 1}, timeout=30)
    _error(r, 400, "unsupported_parameter", "priority")
    r = httpx.post(f"{hard.base_url}/v1/chat/completions", json={"messages": CHAT, "priority": 0, "max_tokens": 1},
                   timeout=60)
    assert r.status_code == 200
    # A class name is accepted under FCFS: it drives admission and metrics, not the engine's order.
    r = httpx.post(f"{hard.base_url}/v1/chat/completions",
                   json={"messages": CHAT, "priority": "batch", "max_tokens": 1}, timeout=60)
    assert r.status_code == 200


@pytest.mark.parametrize("key", sorted(RESERVED_TEMPLATE_KEYS))
def test_reserved_chat_template_kwargs(hard: ServerProcess, key: str) -> None:
    body = {"messages": CHAT, "max_tokens": 1, "chat_template_kwargs": {key: True}}
    r = httpx.post(f"{hard.base_url}/v1/chat/completions", json=body, timeout=30)
    err = _error(r, 400, "invalid_value", "chat_template_kwargs")
    assert key in err["message"]


def test_free_chat_template_kwargs_still_work(hard: ServerProcess) -> None:
    body = {"messages": CHAT, "max_tokens": 1, "chat_template_kwargs": {"enable_thinking": False, "x": [1, {"y": 2}]}}
    assert httpx.post(f"{hard.base_url}/v1/chat/completions", json=body, timeout=60).status_code == 200


# ---- content types, Host, Origin ---------------------------------------------------------------

@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"])
@pytest.mark.parametrize("ctype", ["text/plain", "application/x-www-form-urlencoded", None])
def test_inference_routes_are_json_only(hard: ServerProcess, route: str, ctype: str | None) -> None:
    body = json.dumps({"prompt": "hi", "max_tokens": 1, "messages": CHAT, "tokens": [1]}).encode()
    headers = {"content-type": ctype} if ctype else {}
    with httpx.Client() as c:
        req = c.build_request("POST", f"{hard.base_url}{route}", content=body, headers=headers)
        assert ("content-type" in req.headers) == (ctype is not None)
        _error(c.send(req), 415, "unsupported_media_type")


def test_foreign_host_and_origin_are_refused(hard: ServerProcess) -> None:
    body = {"prompt": "hi", "max_tokens": 1}
    url = f"{hard.base_url}/v1/completions"
    _error(httpx.post(url, json=body, headers={"host": "attacker.example"}), 403, "host_not_allowed")
    _error(httpx.get(f"{hard.base_url}/metrics", headers={"host": "attacker.example"}), 403, "host_not_allowed")
    r = httpx.post(url, json=body, headers={"origin": "https://attacker.example"})
    _error(r, 403, "origin_not_allowed")
    assert "access-control-allow-origin" not in r.headers
    pre = httpx.options(url, headers={"origin": "https://app.example", "access-control-request-method": "POST",
                                      "access-control-request-headers": "content-type"})
    assert pre.status_code == 204 and pre.headers["access-control-allow-origin"] == "https://app.example"
    ok = httpx.post(url, json=body, headers={"origin": "https://app.example"}, timeout=60)
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"


def test_head_and_get_on_health(hard: ServerProcess) -> None:
    assert httpx.head(f"{hard.base_url}/health").status_code == 200
    assert httpx.get(f"{hard.base_url}/health").json() == {"status": "ok"}


# ---- injected failures at every admission step --------------------------------------------------

def _post(srv: ServerProcess, route: str, body: dict, fault: str | None = None) -> httpx.Response:
    headers = {"x-lockgate-fault": fault} if fault else {}
    return httpx.post(f"{srv.base_url}{route}", json=body, headers=headers, timeout=60)


@pytest.mark.parametrize("point", FAULT_POINTS)
def test_a_failure_at_each_admission_step_releases_everything(hard: ServerProcess, point: str) -> None:
    before = hard.metrics()
    tracebacks = hard.log_text().count("Traceback")
    bodies = [("/v1/completions", {"prompt": "Count:", "max_tokens": 4, "ignore_eos": True}),
              ("/v1/completions", {"prompt": ["a", "b"], "n": 2, "max_tokens": 4, "ignore_eos": True}),
              ("/v1/chat/completions", {"messages": CHAT, "max_tokens": 4, "ignore_eos": True})]
    failures = 0
    for route, body in bodies:
        for stream in (False, True):
            r = _post(hard, route, {**body, "stream": stream}, fault=point)
            failures += 1
            if point == "stream" and stream:  # failed after the status line: reported in-band
                assert r.status_code == 200
                events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
                assert events[-1] == "[DONE]"
                err = json.loads(events[-2])["error"]
                assert err["code"] == "internal_error" and err["type"] == "server_error"
            elif point == "stream":  # non-streaming routes never reach that step: they succeed
                assert r.status_code == 200, r.text
                failures -= 1
            else:
                _error(r, 500, "internal_error")
    assert_clean(hard)
    after = hard.metrics()

    def internal(m: dict[str, float]) -> float:  # every tenant and class label set with reason="internal"
        return sum(v for k, v in m.items()
                   if k.startswith("lockgate:request_failure_total{") and 'reason="internal"' in k)

    assert internal(after) - internal(before) == failures
    # Each failure is logged once, with one traceback (not twice, as Starlette's default does).
    assert hard.log_text().count("Traceback") - tracebacks == failures


def test_hundreds_of_bad_requests_leave_nothing_behind(hard: ServerProcess) -> None:
    url = hard.base_url
    kinds: list[tuple[str, str, bytes, dict[str, str]]] = []
    for value in HUGE:
        for field in COMPLETION_INT_FIELDS:
            kinds.append(("POST", "/v1/completions", json.dumps({"prompt": "x", field: value}).encode(), JSON))
        for field in CHAT_INT_FIELDS:
            kinds.append(("POST", "/v1/chat/completions",
                          json.dumps({"messages": CHAT, field: value}).encode(), JSON))
    kinds += [
        ("POST", "/v1/completions", b"{not json", JSON),
        ("POST", "/v1/completions", b'{"prompt": "x"}', {"content-type": "text/plain"}),
        ("POST", "/v1/completions", json.dumps({"prompt": [5] * 600}).encode(), JSON),
        ("POST", "/v1/chat/completions", json.dumps({"messages": CHAT, "chat_template_kwargs": {"messages": 1}}).encode(),
         JSON),
        ("POST", "/v1/chat/completions", json.dumps({"messages": CHAT, "model": "nope"}).encode(), JSON),
        ("POST", "/v1/completions", b'{"prompt": "x", "max_tokens": 2}', {**JSON, "x-lockgate-fault": "submit"}),
        ("POST", "/v1/completions", b'{"prompt": "x", "max_tokens": 2, "stream": true}',
         {**JSON, "x-lockgate-fault": "respond"}),
        ("GET", "/v1/models", b"", {"origin": "https://attacker.example"}),
        ("GET", "/v1/models", b"", {"host": "attacker.example"}),
    ]
    work = (kinds * (400 // len(kinds) + 1))[:400]

    def send(k: tuple[str, str, bytes, dict[str, str]]) -> int:
        method, route, body, headers = k
        with httpx.Client(timeout=60) as c:
            return c.request(method, f"{url}{route}", content=body or None, headers=headers).status_code

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(send, work))
    assert len(statuses) == 400
    assert all(400 <= s < 500 or s == 500 for s in statuses), sorted(set(statuses))
    assert statuses.count(500) == sum(1 for k in work if b"x-lockgate-fault" in str(k[3]).encode())
    assert_clean(hard)


# ---- HTTP framing and slow or idle connections --------------------------------------------------

def _raw(srv: ServerProcess, data: bytes, wait_s: float = 5.0) -> tuple[bytes, bool]:
    """Send raw bytes; return what came back and whether the server closed the connection."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=wait_s) as s:
        s.sendall(data)
        out = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    return out, True
                out += chunk
        except TimeoutError:
            return out, False


def _status_lines(raw: bytes) -> list[bytes]:
    return [ln for ln in raw.split(b"\r\n") if ln.startswith(b"HTTP/1.")]


def _json_body(raw: bytes) -> dict:
    return json.loads(raw.split(b"\r\n\r\n", 1)[1])


BODY = b'{"prompt": "hi", "max_tokens": 1}'
HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
PIPELINED = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def test_transfer_encoding_with_content_length_is_refused_and_closed(hard: ServerProcess) -> None:
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY)
    req = HEAD + b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % len(BODY) + chunked + PIPELINED
    out, closed = _raw(hard, req)
    assert _status_lines(out) == [b"HTTP/1.1 400 Bad Request"] and closed, out  # the pipelined one unanswered
    assert _json_body(out)["error"]["code"] == "bad_http_request"


def test_duplicate_content_length_is_refused(hard: ServerProcess) -> None:
    req = HEAD + b"Content-Length: %d\r\nContent-Length: 4\r\n\r\n" % len(BODY) + BODY + PIPELINED
    out, closed = _raw(hard, req)
    assert _status_lines(out) == [b"HTTP/1.1 400 Bad Request"] and closed, out


def test_garbage_gets_a_json_400(hard: ServerProcess) -> None:
    out, closed = _raw(hard, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400") and closed
    assert b"content-type: application/json" in out.lower()


def test_oversized_headers_are_431(hard: ServerProcess) -> None:
    out, closed = _raw(hard, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 431") and closed
    assert _json_body(out)["error"]["code"] == "headers_too_large"


def test_slow_headers_are_cut_off(hard: ServerProcess) -> None:
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", hard.port), timeout=30) as s:
        s.sendall(b"GET /health HTTP/1.1\r\n")
        out = b""
        for i in range(60):  # a slowloris: one header byte every 0.25 s
            try:
                s.sendall(b"X-Slow-%d: 1\r\n" % i)
            except OSError:
                break
            s.settimeout(0.25)
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                break
            out += chunk
    elapsed = time.monotonic() - t0
    assert out.startswith(b"HTTP/1.1 408"), out
    assert HEADER_TIMEOUT_S - 0.5 <= elapsed < HEADER_TIMEOUT_S + 10


def test_idle_connection_is_closed(hard: ServerProcess) -> None:
    t0 = time.monotonic()
    _, closed = _raw(hard, b"", wait_s=HEADER_TIMEOUT_S + 10)
    assert closed and time.monotonic() - t0 < HEADER_TIMEOUT_S + 10


def test_slow_body_is_408_and_releases_the_request(hard: ServerProcess) -> None:
    out, closed = _raw(hard, HEAD + b"Content-Length: 500\r\n\r\n" + b'{"prompt": ', wait_s=BODY_TIMEOUT_S + 10)
    assert out.startswith(b"HTTP/1.1 408") and closed, out
    assert _json_body(out)["error"]["code"] == "request_timeout"
    assert_clean(hard)


def test_client_vanishing_mid_stream_releases_everything(hard: ServerProcess, tmp_path: Path) -> None:
    for _ in range(5):
        with httpx.stream("POST", f"{hard.base_url}/v1/completions", timeout=60,
                          json={"prompt": "Tell a story", "max_tokens": 200, "ignore_eos": True, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    break  # leave after the first token
    assert_clean(hard)


def test_a_body_just_over_the_limit_gets_its_413_not_a_reset(hard: ServerProcess) -> None:
    """The refused body is drained before the connection closes (else a TCP reset can eat the 413)."""
    import asyncio

    async def post() -> int:
        async with httpx.AsyncClient(timeout=60) as c:
            r = await c.post(f"{hard.base_url}/v1/completions", content=b'{"prompt": "' + b"a" * 4_500_000 + b'"}',
                             headers=JSON)
            assert r.json()["error"]["code"] == "request_too_large"
            return r.status_code

    async def main() -> list[int]:
        return list(await asyncio.gather(*(post() for _ in range(5))))

    assert asyncio.run(main()) == [413] * 5
