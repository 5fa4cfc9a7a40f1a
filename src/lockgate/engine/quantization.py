"""Weight-only quantization for CPU decode: `quantize_model(model, "int4" | "int8")`.

A small-batch decode step is bound by reading every weight once, so fewer bytes
per weight is the speed-up:

- `int4`: 4-bit codes with a scale and zero per 32 weights. A GGUF Q4_0/Q4_1
  checkpoint's blocks map onto this exactly (the scale and zero are rounded to
  bfloat16), so the default model runs on its weights as stored; float
  checkpoints are quantized the Q4_1 way (min/max per group).
- `int8`: symmetric per-output-channel int8 of the float weights.

The token embedding (the tied LM head too) is stored as per-row int8 in both.
No float copy of a quantized matrix is kept unless `keep_float=True` (then
steps with more than `max_rows` rows multiply by it instead: for CPUs with
AMX, where a bf16 GEMM outruns the int kernels at large batches).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from lockgate.engine.quant.gguf_blocks import Int4Groups
from lockgate.engine.quant.linear import (
    Int4Linear,
    Int8Linear,
    QuantEmbedding,
    QuantLinear,
    int4_supported,
    quantize_int4,
    quantize_rows,
)

log = logging.getLogger(__name__)

QUANTIZATION_METHODS = ("int4", "int8")
# With keep_float, steps with more than this many rows use the float copy.
FLOAT_MIN_ROWS = 32

__all__ = ["QUANTIZATION_METHODS", "quantize_model", "weight_bytes", "Int4Linear", "Int8Linear",
           "QuantEmbedding", "QuantLinear", "quantize_rows", "quantize_int4"]

# fused module -> the HF projections stacked in it, in row order
_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and persistent buffer (rope tables excluded: they are not weights)."""
    seen: set[int] = set()
    total = 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name.startswith("rope.") or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def _stored_int4(source: dict[str, Any], prefix: str, proj: str) -> Int4Groups | None:
    """The checkpoint's own 4-bit groups for a (possibly fused) projection, when it has them all."""
    names = _FUSED.get(proj, (proj,))
    parts = [source.get(f"{prefix}.{n}.weight") for n in names]
    if not all(isinstance(p, Int4Groups) for p in parts):
        return None
    return Int4Groups(np.concatenate([p.codes for p in parts]), np.concatenate([p.scale for p in parts]),
                      np.concatenate([p.zero for p in parts]))


@torch.no_grad()
def quantize_model(model: nn.Module, method: str, device: torch.device,
                   stored: Callable[[], Iterator[tuple[str, Any]]] | None = None,
                   keep_float: bool = False, max_rows: int = FLOAT_MIN_ROWS) -> None:
    """Swap every linear layer and the embedding/LM head for quantized ones, in place.
    `stored`: a GGUF checkpoint's quantized tensors (loader), used as they are for int4."""
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)}; got {method!r}")
    if device.type != "cpu":
        raise ValueError(f"quantization {method!r} is a CPU decode path; device is {device.type}")
    source = dict(stored()) if (stored is not None and method == "int4") else {}
    from_file = 0
    for prefix, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear) or name == "lm_head":
                continue
            w, b = child.weight, child.bias
            keep = w if keep_float else None
            if method == "int8":
                setattr(parent, name, Int8Linear(*quantize_rows(w), b, keep, max_rows))
                continue
            if not int4_supported(*w.shape):
                log.info("%s.%s: shape %s does not fit the int4 kernel; left unquantized", prefix, name, tuple(w.shape))
                continue
            groups = _stored_int4(source, f"model.{prefix}", name)  # loader names carry "model."
            from_file += groups is not None
            setattr(parent, name, Int4Linear(groups or quantize_int4(w), b, keep, max_rows))
    if source:
        log.info("int4: %d matrices taken as stored in the checkpoint", from_file)
    head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    q, s = quantize_rows(head)
    model.head_q = QuantEmbedding(q, s, head.dtype)
    if model.lm_head is None:
        model.embed_tokens = model.head_q  # tied: one int8 table serves both
    else:
        eq, es = quantize_rows(model.embed_tokens.weight)
        model.embed_tokens = QuantEmbedding(eq, es, head.dtype)
        model.lm_head = None
