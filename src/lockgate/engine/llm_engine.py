"""LLMEngine: input processing + engine core + output processing in one process.

What the offline `LLM` drives. The server runs the same three parts split across
two processes (`core/proc.py` and `frontend/client.py`).
"""
from __future__ import annotations

from lockgate.engine.config import EngineConfig
from lockgate.engine.core.engine_core import EngineCore
from lockgate.engine.frontend.input_processor import InputProcessor
from lockgate.engine.frontend.output_processor import OutputProcessor
from lockgate.engine.messages import EngineStats
from lockgate.engine.outputs import RequestOutput
from lockgate.engine.sampling_params import SamplingParams


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.core = EngineCore(config)
        self.tokenizer = self.core.tokenizer
        self.model_config = self.core.model_config
        self.max_model_len = self.core.max_model_len
        self.input_processor = InputProcessor(self.tokenizer, self.model_config, self.max_model_len,
                                              config.max_logprobs)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._failed: list[tuple[str, str]] = []  # (request id, message): dropped by the core

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams, *,
                    priority: int = 0, cache_salt: str | None = None) -> None:
        """Validate and queue; raises ValueError on bad input and queues nothing then."""
        if request_id in self.output_processor.parents:
            raise ValueError(f"request id {request_id!r} is already in use")
        reqs = self.input_processor.process(request_id, prompt, params, priority=priority, cache_salt=cache_salt)
        for r in reqs:
            self.core.add_request(r)
        # The caller's params (with n); the children's carry n=1 and per-child seeds.
        self.output_processor.add_request(
            request_id, prompt if isinstance(prompt, str) else None, reqs[0].prompt_token_ids, params)

    def abort_request(self, request_id: str) -> None:
        self.core.abort_requests(self.output_processor.abort(request_id))

    def step(self) -> list[RequestOutput]:
        core_outputs = self.core.step()
        outputs, to_abort = self.output_processor.process(core_outputs, self.core.last_step_end)
        if to_abort:
            self.core.abort_requests(to_abort)
        for child_id, message in self.core.take_failed():
            entry = self.output_processor.child_to_parent.get(child_id)
            if entry is not None:  # a failed child fails its request (its siblings are aborted)
                parent = entry[0].request_id
                self.core.abort_requests(self.output_processor.abort(parent))
                self._failed.append((parent, message))
        return outputs

    def take_failed(self) -> list[tuple[str, str]]:
        """(request id, message) of requests the core dropped since the last call (a grammar that
        did not compile): they produce no further output."""
        failed, self._failed = self._failed, []
        return failed

    def has_unfinished_requests(self) -> bool:
        return self.output_processor.has_unfinished()

    def stats(self) -> EngineStats:
        return self.core.stats()
