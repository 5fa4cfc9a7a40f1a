"""Fallbacks: the other models a request may go to when its model cannot serve it, and when.

A model's `fallbacks:` (models config) are tried in order, each followed by its own
fallbacks (depth first, each model once; cycles are refused at load). A request moves
on only for a reason that says this model cannot serve it now and another may:

- 429 `slo_unattainable` / `queue_full`: its queue cannot start the request in time;
- 503 from the model (`engine_unavailable`, `engine_dead`, `model_version_unavailable`,
  `circuit_open`): it is down, restarting or failing;
- 400 `context_length_exceeded`: the prompt does not fit (a longer-context model may take it);
- `first_token_timeout`: no first token within the model's `first_token_timeout_s`.

Never once any output has reached the client: the pipeline only moves a request before
its response starts. The tenant's own limits (rate, budget), bad input and a draining
server are never a reason: another model would answer the same.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lockgate.errors import APIError

FALL_BACK_ON = {
    429: frozenset({"slo_unattainable", "queue_full"}),
    503: frozenset({"engine_unavailable", "engine_dead", "model_version_unavailable", "circuit_open"}),
    400: frozenset({"context_length_exceeded"}),
    504: frozenset({"first_token_timeout"}),
}


def should_fall_back(err: APIError) -> bool:
    return err.code in FALL_BACK_ON.get(err.status, frozenset())


def first_token_timeout(model: str, timeout_s: float) -> APIError:
    return APIError(504, f"`{model}` gave no first token within {timeout_s:g} s", code="first_token_timeout",
                    type_="server_error")


def chain(start: str, fallbacks_of: Callable[[str], list[str]]) -> list[str]:
    """The models tried after `start`, in order: each fallback, then its own (depth first, once each)."""
    out: list[str] = []
    seen = {start}

    def walk(name: str) -> None:
        for f in fallbacks_of(name):
            if f not in seen:
                seen.add(f)
                out.append(f)
                walk(f)

    walk(start)
    return out


@dataclass(slots=True)
class Attempt:
    """One model a request tried and left, for the ledger (`usage.attempts`) and the logs."""

    model: str
    version: str | None
    status: int
    code: str

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version, "status": self.status, "code": self.code}
