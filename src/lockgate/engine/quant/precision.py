"""Which weight precision an engine runs: `quantization="auto"` is the checkpoint's stored one.

A GGUF whose projections are stored as 4-bit blocks (Q4_0/Q4_1) runs on those blocks (`int4`,
the native kernels: what llama.cpp and Ollama do with the file); dequantizing it to float buys
no fidelity to the file, only a model 5x larger and ~8x slower to decode on CPU. A Q8_0 file
runs on its own Q8_0 blocks (`int8`, native kernels; it passes the quality gate, docs/
PERFORMANCE.md) where the native kernels build, else in float. Float checkpoints (Hugging Face
directories, F16/F32 GGUF, random weights) run in their float dtype. Quantized kernels are
CPU-only: on a GPU "auto" is the float path.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

# `EngineConfig.quantization` values; None (not set) means "auto", as vLLM's quantization=None
# means "what the checkpoint is".
QUANTIZATION_CHOICES = ("auto", "none", "int4", "int8")
FOUR_BIT_TYPES = frozenset({"Q4_0", "Q4_1"})
EIGHT_BIT_TYPES = frozenset({"Q8_0"})


def stored_precision(projection_types: Iterable[str]) -> str | None:
    """The precision a checkpoint's projection matrices are stored in, from their GGUF type names:
    "int4" when most are Q4_0/Q4_1 (a 4-bit file may keep a few matrices in Q8_0/Q6_K; those are
    re-quantized to 4 bits), "int8" when most are Q8_0, None for float or other block types."""
    counts = Counter(projection_types)
    total = sum(counts.values())
    if 2 * sum(counts[t] for t in FOUR_BIT_TYPES) > total:
        return "int4"
    if 2 * sum(counts[t] for t in EIGHT_BIT_TYPES) > total:
        return "int8"
    return None


def resolve_quantization(requested: str | None, stored: str | None, device_type: str,
                         native: bool = True) -> str | None:
    """The quantization that runs: "int4", "int8" or None (the float path).
    `requested`: EngineConfig.quantization; `stored`: `stored_precision` of the checkpoint;
    `native`: whether the native kernels build here. A Q8_0 file's int8 passed the gate on the native
    kernels, on its own blocks; PyTorch's int8 kernel re-rounds them per channel (less agreement) and
    decodes slower than float at 16+ streams: without native kernels such a file runs in float."""
    if requested in ("int4", "int8"):
        return requested
    if requested == "none" or device_type != "cpu":
        return None
    if stored == "int4" or (stored == "int8" and native):
        return stored
    return None


def resolve_kernels(quantization: str | None, stored: str | None, kernels: str, native: bool = True) -> str:
    """`quantization_kernels` as quantize_model gets it: "auto" is native for int8 on a Q8_0 file's own
    blocks (the path that passed the gate; "auto" alone means PyTorch's kernel for int8 re-quantized
    from float, where native failed it), else unchanged (quantize_model: native for int4)."""
    if kernels == "auto" and quantization == "int8" and stored == "int8" and native:
        return "native"
    return kernels


def why_float(requested: str | None, stored: str | None, device_type: str) -> str:
    """Why `resolve_quantization` chose the float path (for the start-up log)."""
    if requested == "none":
        return "quantization='none'"
    if device_type != "cpu":
        return f"the quantized kernels are CPU-only (device {device_type})"
    if stored == "int8":
        return "a Q8_0 checkpoint runs on its blocks only with the native kernels, unavailable here"
    return "the checkpoint's weights are float"
