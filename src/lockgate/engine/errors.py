"""The errors a request sees when the engine cannot serve it.

Raised in the API process (`frontend/`): by the async client when no core is
up, by the supervisor when a core dies or stalls with requests in flight, and
when the core refuses a request the frontend had accepted.
"""
from __future__ import annotations


class EngineError(RuntimeError):
    """Base of the errors a request sees when the engine cannot serve it."""


class EngineDeadError(EngineError):
    """The engine-core process died (or failed) while the request was in flight."""


class EngineStalledError(EngineDeadError):
    """The engine-core process stopped making progress; it was killed and is being restarted."""


class EngineUnavailableError(EngineError):
    """No engine core is up right now (starting, restarting or shutting down)."""


class EngineStartError(EngineError):
    """The engine-core process could not start (bad model path, out of memory, ...)."""


class RequestRejectedError(ValueError):
    """The core refused a request the frontend had accepted (a limit only it knows)."""
