"""The response cache over HTTP (`--response-cache`): one fake-engine server, keyed, two tenants,
a short TTL. Hits and misses by header, identical choices, the ledger row of a hit (cache='hit',
billed the tenant's `cache_hit` price, no tpm taken), what the key covers, tenants apart, expiry,
streamed hits through the `openai` SDK, Cache-Control, Idempotency-Key replays, bad prices; the
flags' bad values, the default (off), and what is stored and replayed (recording and replay
streams on fake engine streams) without a server."""
from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from typer.testing import CliRunner

from lockgate.bench.procs import parse_metrics
from lockgate.cli import app as cli_app
from lockgate.engine.outputs import CompletionOutput, Logprob, RequestOutput
from lockgate.gateway.response_cache import CacheControl, ResponseCache
from lockgate.server.cached_response import CachedCall, _decode, _Recording, _Replay
from lockgate.server.config import ServerConfig
from tests.server.conftest import ServerProcess, start_server, wait_for

ADMIN = "sk-admin-response-cache-test"
MODEL = "SmolLM2-135M-Instruct"
HEADER = "x-lockgate-cache"
TTL_S = 3.0
HIT_PRICE = 0.001  # USD per cached answer
PRICES = {"*": {"prompt": 1.0, "completion": 2.0, "cache_hit": HIT_PRICE}}  # USD per 1M tokens


@dataclass
class Env:
    srv: ServerProcess
    admin: httpx.Client
    a: httpx.Client  # tenant A's inference key (tpm 600: a hit's tokens would show)
    b: httpx.Client  # tenant B's
    a_key: str
    tenant_a: str
    db: Path

    def sdk(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.srv.base_url}/v1", api_key=self.a_key, max_retries=0, timeout=60)


def _client(srv: ServerProcess, key: str) -> httpx.Client:
    return httpx.Client(base_url=srv.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=60)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    tmp = tmp_path_factory.mktemp("response_cache")
    srv = start_server(tmp, "--load-format", "fake", "--fake-step-delay", "0.002", "--admin-key", ADMIN,
                       "--data-dir", str(tmp / "data"), "--no-slo-admission",
                       "--response-cache", "1MiB", "--response-cache-ttl", str(TTL_S))
    admin = _client(srv, ADMIN)
    ids, keys = [], []
    for name, extra in (("a", {"tpm": 600, "prices": PRICES}), ("b", {})):
        r = admin.post("/admin/tenants", json={"name": name, **extra})
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
        keys.append(admin.post(f"/admin/tenants/{ids[-1]}/keys", json={"name": name}).json()["key"])
    yield Env(srv, admin, _client(srv, keys[0]), _client(srv, keys[1]), keys[0], ids[0], tmp / "data" / "lockgate.db")
    srv.stop()


def _complete(c: httpx.Client, prompt: str, headers: dict[str, str] | None = None, **kw: Any) -> httpx.Response:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, **kw}
    r = c.post("/v1/completions", json=body, headers=headers or {})
    assert r.status_code == 200, r.text
    return r


def _ledger(env: Env, request_id: str) -> dict[str, Any]:
    def row() -> tuple | None:
        with sqlite3.connect(env.db) as conn:
            return conn.execute("SELECT cache, cost_nusd, prompt_tokens, completion_tokens, finish_reason "
                                "FROM usage WHERE request_id = ?", (request_id,)).fetchone()

    assert wait_for(lambda: row() is not None, 20), request_id
    return dict(zip(("cache", "cost_nusd", "prompt_tokens", "completion_tokens", "finish_reason"), row()))


def _metric(env: Env, name: str) -> float:
    return parse_metrics(env.srv.metrics_text(ADMIN)).get(name, 0.0)  # summed over its label sets


def test_a_greedy_repeat_is_a_hit_billed_at_the_cache_price_with_no_tokens_taken(env: Env) -> None:
    hits_before = _metric(env, "lockgate:response_cache_hits_total")
    miss = _complete(env.a, "the first cached answer", max_tokens=16)
    hit = _complete(env.a, "the first cached answer", max_tokens=16)
    assert (miss.headers[HEADER], hit.headers[HEADER]) == ("miss", "hit")
    m, h = miss.json(), hit.json()
    assert h["choices"] == m["choices"] and h["usage"] == m["usage"] and m["usage"]["completion_tokens"] == 16
    assert h["id"] != m["id"] and h["id"].startswith("cmpl-")
    # tpm 600 refills 10 tokens a second: a hit that took its ~20 tokens would show here.
    assert int(hit.headers["x-ratelimit-remaining-tokens"]) >= int(miss.headers["x-ratelimit-remaining-tokens"])
    fresh, cached = _ledger(env, m["id"]), _ledger(env, h["id"])
    usage = m["usage"]
    assert fresh["cache"] is None
    assert fresh["cost_nusd"] == usage["prompt_tokens"] * 1000 + usage["completion_tokens"] * 2000
    assert cached == {"cache": "hit", "cost_nusd": 1_000_000, "prompt_tokens": usage["prompt_tokens"],
                      "completion_tokens": 16, "finish_reason": "length"}
    assert _metric(env, "lockgate:response_cache_hits_total") == hits_before + 1
    assert _metric(env, "lockgate:response_cache_entries") >= 1 and _metric(env, "lockgate:response_cache_bytes") > 0


def test_sampled_requests_are_never_cached_and_seeded_ones_are(env: Env) -> None:
    for _ in range(2):
        r = _complete(env.a, "a sampled answer", temperature=0.9)
        assert HEADER not in r.headers
    first = _complete(env.a, "a sampled answer", temperature=0.9, seed=42, n=2)
    again = _complete(env.a, "a sampled answer", temperature=0.9, seed=42, n=2)
    assert (first.headers[HEADER], again.headers[HEADER]) == ("miss", "hit")
    assert again.json()["choices"] == first.json()["choices"] and len(first.json()["choices"]) == 2
    assert _complete(env.a, "a sampled answer", temperature=0.9, seed=43, n=2).headers[HEADER] == "miss"


def test_the_key_covers_the_effective_parameters(env: Env) -> None:
    assert _complete(env.a, "parameters matter").headers[HEADER] == "miss"
    assert _complete(env.a, "parameters matter", max_tokens=7).headers[HEADER] == "miss"
    assert _complete(env.a, "parameters matter", stop=["zzz"]).headers[HEADER] == "miss"
    assert _complete(env.a, "parameters matter", logprobs=1).headers[HEADER] == "miss"
    assert _complete(env.a, "parameters matter", temperature=0, max_tokens=8).headers[HEADER] == "hit"
    # The chat route renders its own prompt: never the completions entry.
    r = env.a.post("/v1/chat/completions", json={"model": MODEL, "temperature": 0, "max_tokens": 8,
                                                 "messages": [{"role": "user", "content": "parameters matter"}]})
    assert r.status_code == 200 and r.headers[HEADER] == "miss"


def test_a_tenant_never_gets_another_tenants_entry(env: Env) -> None:
    a1 = _complete(env.a, "whose answer is this")
    assert a1.headers[HEADER] == "miss" and _complete(env.a, "whose answer is this").headers[HEADER] == "hit"
    b1 = _complete(env.b, "whose answer is this")
    assert b1.headers[HEADER] == "miss"
    assert _complete(env.b, "whose answer is this").headers[HEADER] == "hit"  # its own entry now


def test_entries_expire_after_the_ttl(env: Env) -> None:
    assert _complete(env.a, "short lived").headers[HEADER] == "miss"
    assert _complete(env.a, "short lived").headers[HEADER] == "hit"
    time.sleep(TTL_S + 0.3)
    assert _complete(env.a, "short lived").headers[HEADER] == "miss"


def test_streamed_hits_through_the_sdk(env: Env) -> None:
    sdk = env.sdk()
    messages = [{"role": "user", "content": "stream me from the cache"}]
    raw = sdk.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert raw.headers[HEADER] == "miss"
    full = raw.parse()
    raw = sdk.chat.completions.with_raw_response.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                                        stream=True, stream_options={"include_usage": True})
    assert raw.headers[HEADER] == "hit"
    chunks = list(raw.parse())
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content and text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == full.usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert len({c.id for c in chunks}) == 1 and chunks[0].id != full.id
    # And the other way: a streamed answer, stored once complete, answers a plain request.
    other = [{"role": "user", "content": "streamed first, then asked plainly"}]
    raw = sdk.chat.completions.with_raw_response.create(model=MODEL, messages=other, max_tokens=6, temperature=0,
                                                        stream=True)
    assert raw.headers[HEADER] == "miss"
    streamed = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    raw = sdk.chat.completions.with_raw_response.create(model=MODEL, messages=other, max_tokens=6, temperature=0)
    assert raw.headers[HEADER] == "hit" and raw.parse().choices[0].message.content == streamed


def test_cache_control_no_cache_and_no_store(env: Env) -> None:
    r = _complete(env.a, "cache control one", headers={"Cache-Control": "no-store"})
    assert HEADER not in r.headers
    assert _complete(env.a, "cache control one").headers[HEADER] == "miss"  # no-store wrote nothing
    # An entry exists now; no-cache does not read it.
    assert _complete(env.a, "cache control one", headers={"Cache-Control": "no-cache"}).headers[HEADER] == "miss"
    assert _complete(env.a, "cache control one", headers={"Cache-Control": "no-store"}).headers.get(HEADER) is None
    # no-cache still stores its fresh answer.
    assert _complete(env.a, "cache control two", headers={"Cache-Control": "no-cache"}).headers[HEADER] == "miss"
    assert _complete(env.a, "cache control two").headers[HEADER] == "hit"


def test_an_idempotent_replay_is_not_a_cache_hit(env: Env) -> None:
    first = _complete(env.a, "idempotent and cached", headers={"Idempotency-Key": "rc-1"})
    replay = _complete(env.a, "idempotent and cached", headers={"Idempotency-Key": "rc-1"})
    assert first.headers[HEADER] == "miss"
    assert replay.headers.get("idempotent-replayed") == "true" and HEADER not in replay.headers
    assert replay.json()["id"] == first.json()["id"]
    assert _complete(env.a, "idempotent and cached").headers[HEADER] == "hit"


@pytest.mark.parametrize("value, says", [(-0.5, "greater than or equal to 0"), (2**70, "less than or equal to"),
                                         ("free", "valid number")])
def test_a_bad_cache_hit_price_is_a_400_naming_the_field(env: Env, value: Any, says: str) -> None:
    bad = {"*": {"prompt": 1.0, "completion": 1.0, "cache_hit": value}}
    for r in (env.admin.post("/admin/tenants", json={"name": "bad-price", "prices": bad}),
              env.admin.patch(f"/admin/tenants/{env.tenant_a}", json={"prices": bad})):
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "prices.*.cache_hit" and says in err["message"], err
    shown = env.admin.get(f"/admin/tenants/{env.tenant_a}").json()["prices"]["*"]
    assert shown["cache_hit"] == HIT_PRICE  # unchanged


# ---- without a server -------------------------------------------------------------------------

def test_the_cache_is_off_by_default() -> None:
    assert ServerConfig().response_cache_bytes == 0
    with pytest.raises(ValueError, match="--response-cache: must be between 0"):
        ServerConfig(response_cache_bytes=-1)


@pytest.mark.parametrize("args, message", [
    (["--response-cache", "abc"], "--response-cache: expected a size in bytes such as 67108864 or 64MiB"),
    (["--response-cache=-1"], "--response-cache: expected a size in bytes"),
    (["--response-cache", "2TiB"], "--response-cache: must be between 0 (off) and"),
    (["--response-cache", "64MiB", "--response-cache-ttl", "0"], "--response-cache-ttl: must be in (0, 2592000]")])
def test_bad_flags_are_refused_at_start(tmp_path: Path, args: list[str], message: str) -> None:
    r = CliRunner().invoke(cli_app, ["serve", "--port", "0", "--data-dir", str(tmp_path / "data"), *args])
    assert r.exit_code == 2 and message in r.output, r.output
    assert not (tmp_path / "data").exists()  # refused before the store was opened


class _Stream:
    """An engine stream's outputs as a fleet stream gives them (for the recording wrapper)."""

    def __init__(self, outs: list[RequestOutput]) -> None:
        self.outs, self.aborted, self.copies = outs, False, []

    def abort(self) -> None:
        self.aborted = True

    def copy(self, request_id: str, fleet: object = None) -> _Stream:
        self.copies.append((request_id, fleet))
        return _Stream(self.outs)

    async def _gen(self):  # noqa: ANN202
        for out in self.outs:
            yield out

    def __aiter__(self):  # noqa: ANN204
        return self._gen()


def _out(text: str, ids: list[int], reason: str | None, lps: list | None = None) -> RequestOutput:
    c = CompletionOutput(0, text, ids, reason, None, None, lps, text, ids)
    return RequestOutput("r", None, [1, 2], [c], reason is not None, 1, None)


class _Metrics:
    def __init__(self) -> None:
        self.sizes: list[tuple[int, int]] = []

    def cache_size(self, entries: int, nbytes: int) -> None:
        self.sizes.append((entries, nbytes))


def _call(cache: ResponseCache, n: int) -> tuple[CachedCall, _Metrics]:
    metrics = _Metrics()
    p = type("P", (), {"app": type("A", (), {"metrics": metrics})()})()
    return CachedCall(p, cache, b"k" * 32, CacheControl(), [[1, 2]] * n), metrics  # type: ignore[arg-type]


async def _drain(streams: list) -> None:
    for s in streams:
        async for _ in s:
            pass


def test_only_complete_answers_are_stored_and_replayed_whole() -> None:
    cache = ResponseCache(1 << 20)
    lps = [{7: Logprob(-0.5, "a", 1)}, {8: Logprob(-0.25, "b", 1)}]
    # One of two prompts aborted: nothing stored.
    call, metrics = _call(cache, 2)
    asyncio.run(_drain(call.record([_Stream([_out("a", [7], None), _out("ab", [7, 8], "length", lps)]),
                                    _Stream([_out("x", [9], "abort")])])))
    assert cache.get(b"k" * 32) is None and metrics.sizes == []
    # Both complete: stored once the last one ends, and replayed as all tokens, then the finish.
    call, metrics = _call(cache, 2)
    asyncio.run(_drain(call.record([_Stream([_out("a", [7], None), _out("ab", [7, 8], "length", lps)]),
                                    _Stream([_out("x", [9], "stop")])])))
    assert len(metrics.sizes) == 1 and metrics.sizes[0][0] == 1
    hit, _ = _call(cache, 2)
    hit.answer = _decode(cache.get(b"k" * 32))

    async def replayed() -> list[RequestOutput]:
        return [o async for o in _Replay("r-0", [1, 2], hit.answer[0])]

    first, last = asyncio.run(replayed())
    assert (first.outputs[0].delta_text, first.outputs[0].delta_token_ids, first.outputs[0].finish_reason) == \
        ("ab", [7, 8], None) and not first.finished
    assert (last.outputs[0].text, last.outputs[0].delta_text, last.outputs[0].finish_reason) == ("ab", "", "length")
    assert last.finished and last.outputs[0].logprobs == lps and last.num_cached_tokens == 1
    # A hedge's copy on the same version is watched too; on another version's fleet it is not.
    rec = _Recording(_Stream([]), call, 0)  # type: ignore[arg-type]
    assert isinstance(rec.copy("r-hedge"), _Recording) and not isinstance(rec.copy("r-hedge", object()), _Recording)
    rec.abort()
    assert rec.stream.aborted
