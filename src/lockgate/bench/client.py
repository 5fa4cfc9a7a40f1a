"""One streamed request to an OpenAI-compatible server, timed per content chunk (httpx, SSE).

The clock starts just before the request is written and each non-empty content
chunk is stamped as its line arrives, so TTFT and ITL include everything the
user would wait for (network, queueing, prefill). `stream_options.include_usage`
gives the real token counts; without a usage chunk, chunks are counted.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec

from lockgate.bench.record import CANCELLED, ERROR, OK, REJECT_STATUSES, REJECTED, RequestRecord
from lockgate.bench.tenants import PRIORITY_HEADER
from lockgate.bench.workload import RequestSpec

ENDPOINTS = {"completions": "/completions", "chat": "/chat/completions"}


@dataclass(slots=True)
class Target:
    base_url: str          # ends in /v1 (or the server's own prefix)
    model: str
    endpoint: str = "completions"   # completions | chat
    api_key: str = ""
    ignore_eos: bool = False

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + ENDPOINTS[self.endpoint]


def body(target: Target, spec: RequestSpec) -> dict[str, Any]:
    b: dict[str, Any] = {"model": target.model, "max_tokens": spec.max_tokens, "stream": True,
                         "stream_options": {"include_usage": True}}
    if target.endpoint == "chat":
        b["messages"] = spec.messages if spec.messages is not None else [{"role": "user", "content": spec.prompt}]
    else:  # a chat line on the completions endpoint: its contents as plain text
        b["prompt"] = spec.prompt if spec.prompt is not None else "\n".join(
            str(m.get("content", "")) for m in spec.messages or [])
    if target.ignore_eos:
        b["ignore_eos"] = True
    return b


def headers(target: Target, spec: RequestSpec) -> dict[str, str]:
    h = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    key = spec.tenant.key or target.api_key
    if key:
        h["Authorization"] = f"Bearer {key}"
    if spec.tenant.priority_class:
        h[PRIORITY_HEADER] = spec.tenant.priority_class
    return h


def _error_fields(raw: bytes | Any) -> tuple[str, str]:
    """(code, message) from an OpenAI error body (or a bare one from other servers)."""
    try:
        obj = msgspec.json.decode(raw) if isinstance(raw, bytes) else raw
    except msgspec.DecodeError:
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        return "", text[:300]
    err = obj.get("error", obj) if isinstance(obj, dict) else obj
    if isinstance(err, dict):
        code = err.get("code") or err.get("type") or ""
        return str(code), str(err.get("message", ""))[:300]
    return "", str(err)[:300]


def _chunk_text(choice: dict[str, Any]) -> str:
    if "text" in choice:
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    # reasoning models (vLLM, SGLang) stream thoughts in their own field: tokens all the same
    return (delta.get("content") or "") + (delta.get("reasoning_content") or delta.get("reasoning") or "")


async def send(http: httpx.AsyncClient, target: Target, spec: RequestSpec, scheduled_s: float,
               t0: float) -> RequestRecord:
    """Send `spec`, stream the answer, return what was measured. Never raises for a server's failure."""
    rec = RequestRecord(spec.index, spec.tenant.name, spec.tenant.priority_class, scheduled_s,
                        time.perf_counter() - t0, max_tokens=spec.max_tokens, cancel_after=spec.cancel_after)
    start = time.perf_counter()
    last = start
    try:
        async with http.stream("POST", target.url, json=body(target, spec), headers=headers(target, spec)) as resp:
            rec.http_status = resp.status_code
            if resp.status_code != 200:
                rec.error_code, rec.error_message = _error_fields(await resp.aread())
                rec.status = REJECTED if resp.status_code in REJECT_STATUSES else ERROR
                rec.e2e_s = time.perf_counter() - start
                return rec
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                obj = msgspec.json.decode(data)
                if isinstance(obj, dict) and "error" in obj:  # a failure after the 200 went out
                    rec.error_code, rec.error_message = _error_fields(obj)
                    rec.status, rec.e2e_s = ERROR, now - start
                    return rec
                usage = obj.get("usage")
                if usage:
                    rec.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                    rec.output_tokens = int(usage.get("completion_tokens") or 0)
                choices = obj.get("choices") or []
                if choices and _chunk_text(choices[0]):
                    if rec.ttft_s is None:
                        rec.ttft_s = now - start
                    else:
                        rec.itl_s.append(now - last)
                    last = now
                    rec.chunks += 1
                    if spec.cancel_after and rec.chunks >= spec.cancel_after:
                        rec.status = CANCELLED
                        break  # leaving the block closes the connection: the server sees a disconnect
        rec.e2e_s = (last if rec.status == CANCELLED else time.perf_counter()) - start
        rec.output_tokens = rec.output_tokens or rec.chunks
        if rec.status != CANCELLED:
            if rec.chunks:
                rec.status = OK
            else:
                rec.status, rec.error_code, rec.error_message = ERROR, "no_tokens", "the stream ended without content"
    except httpx.TimeoutException as e:
        rec.status, rec.error_code, rec.error_message = ERROR, "timeout", f"{type(e).__name__}: {e}"[:300]
    except httpx.HTTPError as e:
        rec.status, rec.error_code, rec.error_message = ERROR, "connection_error", f"{type(e).__name__}: {e}"[:300]
    except (msgspec.DecodeError, AttributeError, TypeError, ValueError) as e:
        rec.status, rec.error_code, rec.error_message = ERROR, "bad_stream", f"{type(e).__name__}: {e}"[:300]
    if rec.status == ERROR and rec.e2e_s is None:
        rec.e2e_s = time.perf_counter() - start
    return rec
