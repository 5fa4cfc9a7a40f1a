"""One JSON line per inference request, on its own logger (`lockgate.requests`).

`--request-log json` (the default) writes to stderr, or to `--request-log-file`;
`off` writes nothing. The line never holds prompt text unless the server runs
with `--log-prompts`. It does not propagate to the root logger, so the server's
own log format never wraps it: every line parses as JSON.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from lockgate.observability.record import RequestRecord

LOGGER_NAME = "lockgate.requests"
MODES = ("json", "off")


def _round(v: float | None, digits: int = 6) -> float | None:
    return None if v is None else round(v, digits)


def _timestamp(now: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"


def request_fields(r: RequestRecord, log_prompts: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "ts": _timestamp(time.time()),
        "event": "request",
        "request_id": r.request_id,
        "route": r.route,
        "tenant_id": r.tenant_id,
        "tenant": r.tenant_name,
        "key_id": r.key_id,
        "model": r.model or None,
        "class": r.cls.name if r.cls is not None else None,
        "stream": r.stream,
        "status": r.status,
        "error_code": r.code,
        "finish_reason": r.finish_reason,
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "cached_tokens": r.cached_tokens,
        "queue_s": _round(r.queue_s),
        "ttft_s": _round(r.ttft_s),
        "tpot_s": _round(r.tpot_s),
        "e2e_s": _round(r.e2e_s),
        "cost_usd": r.cost_usd,
        "slo_good": r.slo_good(),
    }
    if log_prompts and r.prompt is not None:
        out["prompt"] = r.prompt
    return out


class RequestLogger:
    """Writes `request_fields` as one JSON line per request."""

    def __init__(self, mode: str = "json", path: str | None = None, log_prompts: bool = False) -> None:
        if mode not in MODES:
            raise ValueError(f"request log must be one of {', '.join(MODES)}, got {mode!r}")
        self.enabled = mode == "json"
        self.log_prompts = log_prompts
        self.logger = logging.getLogger(LOGGER_NAME)
        self.logger.propagate = False  # the root logger's format would wrap the JSON
        self._handler: logging.Handler | None = None
        if self.enabled:
            try:
                handler: logging.Handler = (logging.FileHandler(path, encoding="utf-8") if path
                                            else logging.StreamHandler(sys.stderr))
            except OSError as exc:
                raise ValueError(f"cannot open the request log file {path}: {exc.strerror}") from None
            handler.setFormatter(logging.Formatter("%(message)s"))
            self.logger.addHandler(handler)
            self.logger.setLevel(logging.INFO)
            self._handler = handler

    def log(self, record: RequestRecord) -> None:
        if not self.enabled:
            return
        line = json.dumps(request_fields(record, self.log_prompts), ensure_ascii=False, default=str,
                          separators=(",", ":"))
        self.logger.info(line)

    def close(self) -> None:
        if self._handler is not None:
            self.logger.removeHandler(self._handler)
            self._handler.close()
            self._handler = None
