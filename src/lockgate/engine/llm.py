"""The offline API: `LLM(model).generate(prompts, SamplingParams(...))`, `LLM(model).embed(prompts)`."""
from __future__ import annotations

import itertools
import sys
from collections.abc import Sequence

from lockgate.engine.config import EngineConfig
from lockgate.engine.errors import RequestRejectedError
from lockgate.engine.generation_defaults import checkpoint_source, resolve
from lockgate.engine.llm_engine import LLMEngine
from lockgate.engine.outputs import RequestOutput
from lockgate.engine.sampling_params import SamplingParams
from lockgate.engine.threads import openmp_env

Prompt = str | list[int]


class LLM:
    """`model=None` means the embedded default model; other keyword arguments are
    `EngineConfig` fields (dtype, quantization, kv_cache_dtype, num_threads, max_num_seqs, ...).

    The model runs in its stored precision unless told (`quantization="auto"`: the default
    model's Q4_1 blocks as int4; `quantization="none"` dequantizes it to float), with as many
    threads as this process may use cores (`num_threads`). Made before torch is imported, it
    sets OpenMP's wait policy to passive in this process (engine/threads.py) unless set."""

    def __init__(self, model: str | None = None, **engine_options) -> None:
        config = EngineConfig(model=model, **engine_options)
        if "torch" not in sys.modules:  # libgomp reads its wait policy once, when torch loads it
            openmp_env()
        if config.generation_config not in ("auto", "vllm"):  # a path: read before the model loads
            resolve(config.generation_config, None)
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()
        # Sampling defaults from the model's generation config (engine/generation_defaults.py).
        self.generation_defaults = resolve(config.generation_config, self.engine.model_config.sampling_defaults,
                                           checkpoint_source(model))

    def get_default_sampling_params(self) -> SamplingParams:
        """What `generate` and `chat` use without `sampling_params`, as vLLM's: the model's generation
        config (temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens) over
        SamplingParams' own defaults; `generation_config="vllm"` leaves SamplingParams' alone."""
        return SamplingParams(**self.generation_defaults.values)

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 *, priority: Sequence[int] | None = None) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in prompt order. A prompt given
        as a list of ints is one tokenized prompt; a list of those is a batch."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        params = [sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        ids = [f"offline-{next(self._ids)}" for _ in prompts]
        added: list[str] = []
        try:  # all or nothing: a bad prompt leaves no half-submitted batch behind
            for i, (rid, prompt, p) in enumerate(zip(ids, prompts, params)):
                self.engine.add_request(rid, prompt, p, priority=priority[i] if priority else 0)
                added.append(rid)
        except Exception:
            for rid in added:
                self.engine.abort_request(rid)
            raise
        return self._run(ids)

    def embed(self, prompts: Prompt | Sequence[Prompt]) -> list[list[float]]:
        """One embedding per prompt, in prompt order (as vLLM's `LLM.embed`): the mean of the
        prompt's final-normed hidden states, L2-normalized (the model's hidden size, float32 values).
        Batched in the engine like prefills; prompts as `generate` takes them."""
        outs = self.generate(prompts, SamplingParams(max_tokens=0, embed=True))
        vectors = [o.embedding for o in outs]
        assert all(v is not None for v in vectors), "a pooling request finished without its embedding"
        return vectors  # type: ignore[return-value]

    def _run(self, ids: list[str]) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        while len(done) < len(ids):
            if not self.engine.has_unfinished_requests():
                raise RuntimeError(f"engine went idle with {len(ids) - len(done)} requests unfinished")
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
            failed = self.engine.take_failed()
            if failed:  # the core dropped one (its grammar did not compile): the batch fails as a whole
                for rid in ids:
                    if rid not in done:
                        self.engine.abort_request(rid)
                raise RequestRejectedError(failed[0][1])
        return [done[rid] for rid in ids]

    def chat(self, messages: list[dict] | list[list[dict]],
             sampling_params: SamplingParams | None = None) -> list[RequestOutput]:
        """Apply the model's chat template (with the generation prompt) and generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.encode(self.tokenizer.apply_chat_template(c, add_generation_prompt=True),
                                         add_special_tokens=False) for c in convs]
        return self.generate(prompts, sampling_params)
