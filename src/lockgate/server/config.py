"""Server-side knobs (the engine's are in `lockgate.engine.config.EngineConfig`)."""
from __future__ import annotations

from dataclasses import dataclass, field

from lockgate.engine.sampling_params import MAX_STOP_STRINGS

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"  # served name of the embedded default model


@dataclass(slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    # Names clients may put in `model`; the first is the one /v1/models reports.
    served_model_names: list[str] = field(default_factory=list)
    api_key: str | None = None  # when set, every route but the allowlist needs `Authorization: Bearer`
    max_request_body_bytes: int = 4 * 1024 * 1024
    # Bounded waiting queue: accepted engine requests that have no output yet, and their prompt tokens.
    max_queued_requests: int = 256
    max_queued_tokens: int = 262_144
    drain_timeout_s: float = 30.0  # SIGTERM: how long in-flight requests may take to finish
    max_n: int = 16
    max_stop: int = MAX_STOP_STRINGS
    max_messages: int = 1024
    max_prompts: int = 64  # prompts in one /v1/completions batch
    engine_startup_timeout_s: float = 600.0
    # No engine progress for this long while requests are in flight: fail them, restart the core (0: off).
    engine_stall_timeout_s: float = 60.0
    log_level: str = "info"

    def __post_init__(self) -> None:
        for name in ("max_request_body_bytes", "max_queued_requests", "max_queued_tokens", "max_n",
                     "max_stop", "max_messages", "max_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_stop > MAX_STOP_STRINGS:
            raise ValueError(f"max_stop must be <= {MAX_STOP_STRINGS}, got {self.max_stop}")
        if self.engine_stall_timeout_s < 0:
            raise ValueError(f"engine_stall_timeout_s must be >= 0, got {self.engine_stall_timeout_s}")
        if self.drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {self.drain_timeout_s}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be in [1, 65535], got {self.port}")
