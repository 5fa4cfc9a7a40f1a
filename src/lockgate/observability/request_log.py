"""One JSON line per inference request, on its own logger (`lockgate.requests`).

`--request-log json` (the default) writes to stderr, or to `--request-log-file`;
`off` writes nothing. The line never holds prompt text unless the server runs
with `--log-prompts`. It does not propagate to the root logger, so the server's
own log format never wraps it: every line parses as JSON.

It runs for every request, so it is cheap: msgspec encodes the line, and while
the logger is as set up here (its one handler, no filters) the line goes
straight to that handler's stream, as logging would write it, without building
a LogRecord; anything else attached to the logger gets it the usual way.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

import msgspec

from lockgate.observability.record import RequestRecord

LOGGER_NAME = "lockgate.requests"
MODES = ("json", "off")


def _round(v: float | None, digits: int = 6) -> float | None:
    return None if v is None else round(v, digits)


_second: list[Any] = [None, ""]  # the last whole second formatted, and its text


def _timestamp(now: float) -> str:
    sec = int(now)
    if _second[0] != sec:  # strftime once a second, not once a line
        _second[0], _second[1] = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
    return f"{_second[1]}.{int(now * 1000) % 1000:03d}Z"


_encode = msgspec.json.Encoder(enc_hook=str).encode  # `default=str`, as the stdlib line had


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


_PLAIN = (logging.StreamHandler, logging.FileHandler)  # exactly these: a subclass may do more in emit


class RequestLogger:
    """Writes `request_fields` as one JSON line per request."""

    def __init__(self, mode: str = "json", path: str | None = None, log_prompts: bool = False) -> None:
        if mode not in MODES:
            raise ValueError(f"request log must be one of {', '.join(MODES)}, got {mode!r}")
        self.enabled = mode == "json"
        self.log_prompts = log_prompts
        self.logger = logging.getLogger(LOGGER_NAME)
        self.logger.propagate = False  # the root logger's format would wrap the JSON
        self._handler: logging.StreamHandler[Any] | None = None
        self._formatter: logging.Formatter | None = None
        if self.enabled:
            try:
                handler: logging.StreamHandler[Any] = (logging.FileHandler(path, encoding="utf-8") if path
                                                       else logging.StreamHandler(sys.stderr))
            except OSError as exc:
                raise ValueError(f"cannot open the request log file {path}: {exc.strerror}") from None
            self._formatter = logging.Formatter("%(message)s")
            handler.setFormatter(self._formatter)
            self.logger.addHandler(handler)
            self.logger.setLevel(logging.INFO)
            self._handler = handler

    def log(self, record: RequestRecord) -> None:
        if not self.enabled:
            return
        fields = request_fields(record, self.log_prompts)
        try:
            line = _encode(fields).decode()
        except (msgspec.EncodeError, UnicodeError, TypeError, ValueError):  # e.g. a lone surrogate in a prompt
            line = json.dumps(fields, default=str, separators=(",", ":"))
        if not self._write_direct(line):
            self.logger.info(line)

    def _write_direct(self, line: str) -> bool:
        """The line on our handler's stream, as `StreamHandler.emit` would write it with our format;
        False (nothing written) when the logger is set up otherwise."""
        handler, logger = self._handler, self.logger
        if (handler is None or type(handler) not in _PLAIN or handler.formatter is not self._formatter
                or handler.stream is None or logger.handlers != [handler] or logger.filters or handler.filters
                or handler.level > logging.INFO or not logger.isEnabledFor(logging.INFO)):
            return False
        handler.acquire()
        try:
            handler.stream.write(line + handler.terminator)
            handler.stream.flush()
        except Exception:  # noqa: BLE001 - reported as logging reports a failed emit
            handler.handleError(logging.LogRecord(logger.name, logging.INFO, __file__, 0, line, None, None))
        finally:
            handler.release()
        return True

    def close(self) -> None:
        if self._handler is not None:
            self.logger.removeHandler(self._handler)
            self._handler.close()
            self._handler = None
