"""Model architecture and engine configuration (plain data)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from lockgate.engine.generation_defaults import check_option as check_generation_option
from lockgate.engine.quant.precision import QUANTIZATION_CHOICES
from lockgate.engine.spec.config import SpeculativeConfig, parse_speculative_config

# Architectures one `models/llama.py` covers, with the switches each needs.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


@dataclass(slots=True)
class RopeScaling:
    """Llama-3.1 style ("llama3") frequency scaling; `None` type means plain RoPE."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(slots=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v projections
    qk_norm: bool = False  # Qwen3: RMSNorm on q and k per head
    sliding_window: int | None = None  # Mistral v0.1: max_model_len is capped to it (no windowed kernel)
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # The checkpoint's sampling defaults (generation_config.json, GGUF general.sampling.*), as
    # SamplingParams fields; engine/generation_defaults.py.
    sampling_defaults: dict[str, float | int] = field(default_factory=dict)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Parse a Hugging Face `config.json` dict (transformers 4.x or 5.x layout)."""
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"unsupported architecture {archs or cfg.get('model_type')!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        family = SUPPORTED_ARCHITECTURES[arch]
        heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        # transformers >= 5 writes `rope_parameters`; published repos use rope_theta + rope_scaling.
        rope = cfg.get("rope_parameters") or {}
        theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling_src = cfg.get("rope_scaling") or rope
        scaling = None
        rtype = scaling_src.get("rope_type", scaling_src.get("type", "default")) if scaling_src else "default"
        if rtype == "llama3":
            scaling = RopeScaling(
                rope_type="llama3",
                factor=float(scaling_src["factor"]),
                low_freq_factor=float(scaling_src.get("low_freq_factor", 1.0)),
                high_freq_factor=float(scaling_src.get("high_freq_factor", 4.0)),
                original_max_position_embeddings=int(scaling_src.get("original_max_position_embeddings", 8192)),
            )
        elif rtype not in ("default", None):
            raise ValueError(f"unsupported rope scaling {rtype!r}; supported: default, llama3")
        eos = cfg.get("eos_token_id")
        eos_ids = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=family == "qwen2" or bool(cfg.get("attention_bias", False)),
            qk_norm=family == "qwen3",
            sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=[int(e) for e in eos_ids],
        )

# KV cache element types (EngineConfig.kv_cache_dtype); no 8-bit type yet.
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass(slots=True)
class EngineConfig:
    """Knobs of the engine. Names follow vLLM's where one exists."""

    model: str | None = None  # None: the embedded default model
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda
    load_format: str = "auto"  # auto | dummy (random weights from a config) | fake (no model: core/fake_runner.py)
    # load_format="fake" only: seconds each engine step sleeps (one sleep per step, shared by the batch).
    fake_step_delay_s: float = 0.0
    # load_format="fake" only: seconds per token computed in a step (prefill or decode), added to
    # fake_step_delay_s: step time = fake_step_delay_s + fake_token_delay_s * tokens in the step.
    fake_token_delay_s: float = 0.0
    # load_format="fake" only: this fraction of requests (chosen by a hash of the request id) reach
    # their reader fake_stall_s late: a replica with stalls, for hedging's tail-latency benchmark.
    fake_stall_fraction: float = 0.0
    fake_stall_s: float = 0.0
    # Weight precision (engine/quant/precision.py): "auto" (None means the same) runs the checkpoint as
    # stored: a Q4_0/Q4_1 GGUF on its 4-bit blocks (int4, CPU), float checkpoints in float; "none" the
    # float path (a GGUF dequantized); "int4" | "int8" quantize any checkpoint (weight-only, CPU decode).
    quantization: str | None = "auto"
    # With quantization: keep a float copy of each quantized matrix and multiply by it in steps of
    # more than this many rows (CPUs whose bf16 GEMM outruns the int kernels at large batches, e.g.
    # AMX). None: no copy, the quantized kernels serve every batch size (least memory).
    quantization_float_above: int | None = None
    # Kernels for quantized weights: "native" (GGUF blocks, engine/native; needs a C compiler),
    # "torch" (PyTorch's int4/int8 CPU kernels) or "auto" (native for int4 where it builds; torch
    # for int8, whose native form failed the quality gate).
    quantization_kernels: str = "auto"
    # The native kernels' activation codes per 32 values: "int8" (llama.cpp's choice, the fastest) or
    # "int16" (258x less rounding: greedy agreement with float32 0.69 -> 0.77 here, 20-40% slower;
    # docs/PERFORMANCE.md). The weights are the same either way.
    quantization_activations: str = "int8"
    seed: int = 0
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: sized from kv_cache_memory_gb
    kv_cache_memory_gb: float = 1.0
    # Element type of the KV cache: "auto" is 16-bit (the model's dtype when that is 16-bit, else
    # float16: half the bytes attention reads per step, twice the blocks per GiB) unless dtype is
    # "float32" explicitly; or one of KV_CACHE_DTYPES' types (core/runner.py resolve_kv_dtype).
    kv_cache_dtype: str = "auto"
    max_model_len: int | None = None  # None: the model's max_position_embeddings (capped)
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    scheduling_policy: str = "fcfs"  # fcfs | priority (priority classes, aging, fair share between tenants)
    # Per-step cap on prefill tokens (chunked prefill), so one long prompt cannot make a step long
    # for everyone decoding; decodes never count against it. Without chunked prefill a prompt is
    # never split: the cap only stops further prompts from joining a step that already has one.
    max_prefill_tokens: int = 512
    # Priority policy: a request's effective priority value drops by 1 for every this many seconds
    # since it entered the scheduler, so a low class is never starved. 0 disables aging.
    priority_aging_s: float = 10.0
    max_logprobs: int = 20
    # Structured outputs: a grammar compile over this many seconds fails its requests (a 400); the
    # core goes on (engine/structured/compiler.py).
    grammar_compile_timeout_s: float = 10.0
    # Structured outputs: compiles one tenant may have queued; past that its new constrained requests
    # fail at once, so one tenant's flood of distinct schemas cannot delay the others' compiles.
    max_queued_compiles_per_tenant: int = 64
    # CPU threads of the engine process; None: the cores this process may use (affinity, cgroup
    # quota; engine/threads.py), which a server divides among its engine processes.
    num_threads: int | None = None
    # Test only: the first engine-core process hangs forever in this step (1-based), so the
    # stall watchdog can be tested; a restarted core does not hang again. Never set in production.
    debug_hang_at_step: int | None = None
    # Sampling defaults for requests that leave fields out (vLLM's --generation-config): "auto" (the
    # model's generation config), "vllm" (none: temperature 1.0, ...) or a directory holding a
    # generation_config.json (engine/generation_defaults.py).
    generation_config: str = "auto"
    # Speculative decoding (engine/spec/, docs/SPECULATIVE.md): None (off), or vLLM's JSON object as
    # text, a dict or a SpeculativeConfig: n-gram prompt lookup or a draft model, verified in one step.
    speculative_config: SpeculativeConfig | None = None
    # Rows of a step computed the same way whatever else is in the step (a request's tokens do not
    # depend on the batch): the native CPU path always is; the PyTorch CPU path pads small matmuls
    # and attends row by row. None: on where speculation runs on the PyTorch path (greedy output
    # with speculation then equals one-row decoding token for token), off elsewhere.
    batch_invariant: bool | None = None

    def __post_init__(self) -> None:
        check_generation_option(self.generation_config)
        self.speculative_config = parse_speculative_config(self.speculative_config)  # type: ignore[arg-type]
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if not (isinstance(self.max_prefill_tokens, int) and not isinstance(self.max_prefill_tokens, bool)
                and self.max_prefill_tokens >= 1):
            raise ValueError(f"max_prefill_tokens must be an integer >= 1, got {self.max_prefill_tokens!r}")
        _check_seconds("priority_aging_s", self.priority_aging_s)
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(f"scheduling_policy must be 'fcfs' or 'priority', got {self.scheduling_policy!r}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be one of auto, float32, bfloat16, float16; got {self.dtype!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; "
                             f"got {self.kv_cache_dtype!r}")
        if self.quantization is None:
            self.quantization = "auto"
        if self.quantization not in QUANTIZATION_CHOICES:
            raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_CHOICES)}; "
                             f"got {self.quantization!r}")
        if self.num_threads is not None and (not isinstance(self.num_threads, int)
                                             or isinstance(self.num_threads, bool) or self.num_threads < 1):
            raise ValueError(f"num_threads must be an integer >= 1, got {self.num_threads!r}")
        if self.quantization_float_above is not None and self.quantization_float_above < 0:
            raise ValueError(f"quantization_float_above must be >= 0, got {self.quantization_float_above}")
        if self.quantization_activations not in ("int8", "int16"):
            raise ValueError(f"quantization_activations must be 'int8' or 'int16', got {self.quantization_activations!r}")
        if self.quantization_kernels not in ("auto", "native", "torch"):
            raise ValueError(f"quantization_kernels must be 'auto', 'native' or 'torch', "
                             f"got {self.quantization_kernels!r}")
        if self.debug_hang_at_step is not None and self.debug_hang_at_step < 1:
            raise ValueError(f"debug_hang_at_step must be >= 1, got {self.debug_hang_at_step}")
        if self.load_format not in ("auto", "dummy", "fake"):
            raise ValueError(f"load_format must be 'auto', 'dummy' or 'fake', got {self.load_format!r}")
        _check_seconds("fake_step_delay_s", self.fake_step_delay_s)
        _check_seconds("fake_token_delay_s", self.fake_token_delay_s)
        _check_seconds("fake_stall_s", self.fake_stall_s)
        if not 0.0 <= self.fake_stall_fraction <= 1.0:
            raise ValueError(f"fake_stall_fraction must be in [0, 1], got {self.fake_stall_fraction!r}")
        _check_seconds("grammar_compile_timeout_s", self.grammar_compile_timeout_s)
        if self.grammar_compile_timeout_s <= 0:
            raise ValueError(f"grammar_compile_timeout_s must be > 0, got {self.grammar_compile_timeout_s!r}")
        if not (isinstance(self.max_queued_compiles_per_tenant, int)
                and not isinstance(self.max_queued_compiles_per_tenant, bool)
                and self.max_queued_compiles_per_tenant >= 1):
            raise ValueError(f"max_queued_compiles_per_tenant must be an integer >= 1, "
                             f"got {self.max_queued_compiles_per_tenant!r}")


def checkpoint_load_format(load_format: str) -> str:
    """What to pass the loader: "fake" reads the real checkpoint lazily (config + tokenizer only)."""
    return "auto" if load_format == "fake" else load_format


def _check_seconds(name: str, value: object) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
