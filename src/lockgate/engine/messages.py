"""Wire messages between the API process and the engine-core process.

Every message is a tagged msgspec Struct, encoded with msgpack: the receiving
side decodes into exactly these types (no pickle, nothing executable crosses a
socket). Request and output payloads reuse the dataclasses in `outputs.py`.
"""
from __future__ import annotations

import msgspec

from lockgate.engine.config import EngineConfig, ModelConfig
from lockgate.engine.outputs import EngineCoreOutput, EngineCoreRequest, EngineStats

# ---- API process -> engine core ---------------------------------------------------


class AddRequests(msgspec.Struct, tag="add"):
    """New requests; n > 1 arrives here already fanned out into child requests."""

    requests: list[EngineCoreRequest]


class AbortRequests(msgspec.Struct, tag="abort"):
    request_ids: list[str]


class Shutdown(msgspec.Struct, tag="shutdown"):
    pass


ClientMessage = AddRequests | AbortRequests | Shutdown

# ---- engine core -> API process ----------------------------------------------------


class Ready(msgspec.Struct, tag="ready"):
    """Sent once, after the model is loaded: what the frontend needs to validate requests."""

    pid: int
    max_model_len: int
    model_config: ModelConfig
    num_total_blocks: int
    block_size: int
    stats: EngineStats
    # Unix time minus monotonic time in the core: turns the core's timestamps into wall time (traces).
    clock_offset: float = 0.0


class StepOutputs(msgspec.Struct, tag="outputs"):
    """Token deltas of one step (possibly none) plus the engine state after it.

    The core also sends an empty one after handling inputs and as a heartbeat
    (every second when idle, every half second when its steps produce no output),
    so the frontend's view of the queue is never stale for long and its stall
    watchdog knows the core still makes progress.
    """

    outputs: list[EngineCoreOutput]
    stats: EngineStats
    # When the step that produced `outputs` sampled them (the core's monotonic clock): one stamp
    # per message, from which the frontend takes each request's first and last token times.
    timestamp: float = 0.0


class RequestFailed(msgspec.Struct, tag="failed"):
    """The core refused a request (validation it alone can do); the request never ran."""

    request_id: str
    message: str


class EngineFailed(msgspec.Struct, tag="fatal"):
    """The core hit an unrecoverable error (at start-up or in a step) and is exiting."""

    message: str


CoreMessage = Ready | StepOutputs | RequestFailed | EngineFailed


def encode_config(config: EngineConfig) -> bytes:
    return msgspec.json.encode(config)


def decode_config(data: bytes | str) -> EngineConfig:
    return msgspec.json.decode(data, type=EngineConfig)
