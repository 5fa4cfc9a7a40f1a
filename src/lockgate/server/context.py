"""What every route needs: the engine client, configs, metrics, and the admission checks."""
from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from lockgate.engine.client import AsyncEngineClient
from lockgate.engine.config import EngineConfig
from lockgate.engine.tokenizer import Tokenizer
from lockgate.gateway.admission import Admission, AdmissionPolicy, QueueBounds
from lockgate.gateway.classes import PriorityClass
from lockgate.gateway.gateway import Gateway, GatewayConfig
from lockgate.gateway.lease import Lease
from lockgate.observability.observer import Observer
from lockgate.server.config import ServerConfig
from lockgate.server.errors import bad_request, model_not_found, unavailable
from lockgate.server.metrics import ServerMetrics

if TYPE_CHECKING:
    from lockgate.lifecycle.registry import ModelRegistry

T = TypeVar("T")

LEASE_SCOPE_KEY = "lockgate.lease"  # where the guard middleware puts each request's Lease
PRINCIPAL_SCOPE_KEY = "lockgate.principal"  # and the authenticated caller (keyed mode)

# Longer texts are tokenized in a worker thread so the event loop keeps streaming.
_INLINE_TOKENIZE_CHARS = 4096
# The tokenizer releases the GIL on long texts (engine/tokenizer.py): one worker per core
# tokenizes in parallel, and no more, so a burst of long prompts queues here instead of taking
# every thread of asyncio's default pool.
_TOKENIZE_POOL = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2), thread_name_prefix="tokenize")


@dataclass
class ServerContext:
    config: ServerConfig
    engine_config: EngineConfig
    client: AsyncEngineClient
    metrics: ServerMetrics
    model_names: list[str]
    created: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False
    inflight: int = 0  # HTTP requests (past the guard middleware) not yet fully answered
    admission: Admission = field(init=False)
    gateway: Gateway = field(init=False)
    # Every served model and version (lifecycle/registry.py); routes bind a request to one version,
    # whose engine is then `client` (the server's first version's until then).
    models: ModelRegistry = field(init=False)
    observer: Observer = field(init=False)  # request records: logs, SLOs, traces

    def __post_init__(self) -> None:
        bounds = QueueBounds(self.config.max_queued_requests, self.config.max_queued_tokens)
        policy = AdmissionPolicy(self.config.classes, slo=self.config.slo_admission,
                                 fcfs=self.engine_config.scheduling_policy == "fcfs",
                                 aging_s=self.engine_config.priority_aging_s)
        self.admission = Admission(bounds, self.client.queue, policy, self.metrics.reject,
                                   lambda: self.metrics.ttft_ema_s)
        self.gateway = Gateway(GatewayConfig(self.config.data_dir, self.config.admin_key))
        self.observer = Observer.from_config(self.config, self.metrics, self.config.classes)
        self.metrics.max_queued.labels(self.model_name).set(self.config.max_queued_requests)

    @property
    def model_name(self) -> str:
        return self.model_names[0]

    @property
    def tokenizer(self) -> Tokenizer:
        tok = self.client.tokenizer
        if tok is None:
            raise unavailable("the model is still loading", "engine_unavailable", retry_after_s=5)
        return tok

    def resolve_model(self, model: str | None) -> str:
        if model is None or model in self.model_names:
            return self.model_name
        raise model_not_found(model)

    def check_engine(self) -> None:
        if self.draining:
            self.metrics.reject("draining")
            raise unavailable("the server is shutting down", "server_draining")
        if not self.client.healthy:
            self.metrics.reject("engine_unavailable")
            raise unavailable("the engine is unavailable (restarting); retry shortly", "engine_unavailable",
                              retry_after_s=5)

    def admit(self, lease: Lease, num_requests: int, num_tokens: int, cls: PriorityClass | None = None,
              priority: int | None = None) -> None:
        """Queue and SLO admission (429); nothing is taken yet, so nothing to release."""
        lease.checkpoint("admit")
        self.admission.check(num_requests, num_tokens, cls, priority)

    def check_context(self, num_prompt_tokens: int, max_tokens: int | None, param: str) -> None:
        limit = self.client.max_model_len
        wanted = num_prompt_tokens + (max_tokens or 1)
        if wanted > limit:
            what = "messages" if param == "messages" else "prompt"
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{wanted} tokens ({num_prompt_tokens} in the {what}, {max_tokens or 1} in the completion). "
                f"Please reduce the length of the {what} or completion.",
                param=param, code="context_length_exceeded")

    def max_prompt_chars(self) -> int | None:
        """The longest text that could fit the context: max_model_len tokens of the longest
        text one token stands for. Sound (never refuses a prompt that could fit); None for a
        tokenizer that can drop or fuse text, which has no such bound (engine/tokenizer.py)."""
        per_token = self.tokenizer.max_token_chars
        return None if per_token is None else self.client.max_model_len * per_token

    async def check_prompt_chars(self, text: str, param: str) -> None:
        """400 context_length_exceeded for a text too long to fit, before it is tokenized."""
        limit = self.max_prompt_chars()
        if limit is None or len(text) <= limit:
            return
        num_chars = await run_blocking(self.tokenizer.countable_chars, text)  # tens of ms at 4 MB
        if num_chars > limit:
            what = "messages" if param.startswith("messages") else "prompt"
            raise bad_request(
                f"This model's maximum context length is {self.client.max_model_len} tokens, which hold at "
                f"most {limit} characters of text. However, the {what} has {num_chars} characters. "
                f"Please reduce the length of the {what}.",
                param=param, code="context_length_exceeded")

    async def encode(self, text: str, add_special_tokens: bool, param: str = "prompt") -> list[int]:
        """Token ids of a prompt; a text too long for the context is refused before tokenizing."""
        tok = self.tokenizer
        await self.check_prompt_chars(text, param)
        if len(text) <= _INLINE_TOKENIZE_CHARS:
            return tok.encode(text, add_special_tokens=add_special_tokens)
        return await run_blocking(tok.encode, text, add_special_tokens)


async def run_blocking(fn: Callable[..., T], *args: Any) -> T:
    """Tokenizer work off the event loop, on the tokenizing threads."""
    return await asyncio.get_running_loop().run_in_executor(_TOKENIZE_POOL, fn, *args)
