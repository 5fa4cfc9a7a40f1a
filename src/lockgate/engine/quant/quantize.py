"""Weight-only quantization for CPU decode: `quantize_model(model, "int4" | "int8")`.

A small-batch decode step is bound by reading every weight once, so fewer bytes
per weight is the speed-up. Two kernel sets:

- native (the default for int4 where a C compiler is found, engine/native/): GGUF blocks. `int4`
  is Q4_1 (a GGUF Q4_0/Q4_1 checkpoint's blocks exactly, so the default model runs
  on its weights as stored; float checkpoints quantized min/max per 32 weights),
  `int8` is Q8_0; the embedding and tied LM head are Q8_0 (the GGUF's own when it
  has one). Decodes and short prefills run the whole model in one native call.
- torch (the default for int8, the fallback, or `kernels="torch"`): PyTorch's int4/int8 CPU kernels. `int4`:
  4-bit codes with a bfloat16 scale and zero per 32 weights; `int8`: symmetric
  per-output-channel int8. The embedding (and tied head) is per-row int8.
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

from lockgate.engine.native import blocks as native_blocks
from lockgate.engine.native.build import load as load_native
from lockgate.engine.native.linear import BlockEmbedding, BlockLinear
from lockgate.engine.quant.gguf_blocks import Int4Groups, Int8Groups
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
KERNELS = ("auto", "native", "torch")
# With keep_float, steps with more than this many rows use the float copy.
FLOAT_MIN_ROWS = 32

__all__ = ["QUANTIZATION_METHODS", "KERNELS", "quantize_model", "weight_bytes", "Int4Linear", "Int8Linear",
           "QuantEmbedding", "QuantLinear", "BlockLinear", "BlockEmbedding", "quantize_rows", "quantize_int4"]

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


def _stored_int8(source: dict[str, Any], prefix: str, proj: str) -> Int8Groups | None:
    """The checkpoint's own Q8_0 groups for a (possibly fused) projection, when it has them all."""
    parts = [source.get(f"{prefix}.{n}.weight") for n in _FUSED.get(proj, (proj,))]
    if not all(isinstance(p, Int8Groups) for p in parts):
        return None
    return Int8Groups(np.concatenate([p.codes for p in parts]), np.concatenate([p.scale for p in parts]))


@torch.no_grad()
def quantize_model(model: nn.Module, method: str, device: torch.device,
                   stored: Callable[[], Iterator[tuple[str, Any]]] | None = None,
                   keep_float: bool = False, max_rows: int = FLOAT_MIN_ROWS, kernels: str = "auto") -> str:
    """Swap every linear layer and the embedding/LM head for quantized ones, in place.
    `stored`: a GGUF checkpoint's quantized tensors (loader), used as they are where they fit.
    `kernels`: "native" (GGUF blocks, engine/native), "torch" (PyTorch's int kernels) or
    "auto" (native where it builds). Returns the kernel set used."""
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)}; got {method!r}")
    if kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(KERNELS)}; got {kernels!r}")
    if device.type != "cpu":
        raise ValueError(f"quantization {method!r} is a CPU decode path; device is {device.type}")
    if kernels != "torch" and load_native() is None:
        if kernels == "native":
            raise ValueError("native CPU kernels are unavailable (no C compiler, or LOCKGATE_NATIVE=0)")
        kernels = "torch"
    if kernels == "auto":
        # Native int8 re-quantizing float weights (Q8_0 of the weights, int8 activations) sits at
        # the edge of the quality gate on the default model (failed once at 6/10 answers vs
        # float32's 8/10, then passed at 7/10; docs/PERFORMANCE.md): not a default. A Q8_0 file's
        # own blocks pass it: the runner asks for "native" there (quant/precision.resolve_kernels).
        kernels = "native" if method == "int4" else "torch"
    # The checkpoint's blocks (decoding them all takes seconds): PyTorch's int8 path uses none.
    uses_stored = stored is not None and (kernels == "native" or method == "int4")
    source = dict(stored()) if uses_stored else {}
    if kernels == "native":
        _quantize_native(model, method, source, keep_float, max_rows)
    else:
        _quantize_torch(model, method, source, keep_float, max_rows)
    return kernels


def _linears(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, nn.Linear]]:
    for prefix, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and name != "lm_head":
                yield prefix, parent, name, child


def _quantize_native(model: nn.Module, method: str, source: dict[str, Any], keep_float: bool, max_rows: int) -> None:
    wtype = native_blocks.Q4_1 if method == "int4" else native_blocks.Q8_0
    from_file = total = 0
    for prefix, parent, name, child in _linears(model):
        total += 1
        w, b = child.weight, child.bias
        n, k = w.shape
        if not native_blocks.fits(n, k):  # PyTorch's kernels take it, if they can
            log.info("%s.%s: shape %s does not fit the native kernels", prefix, name, (n, k))
            _torch_linear(parent, name, child, method, source, prefix, keep_float, max_rows)
            continue
        table = None
        if method == "int4":
            groups = _stored_int4(source, f"model.{prefix}", name)  # loader names carry "model."
            table = None if groups is None else native_blocks.q4_1_from_groups(groups)
        else:  # a Q8_0 file's own blocks
            groups8 = _stored_int8(source, f"model.{prefix}", name)
            table = None if groups8 is None else native_blocks.q8_0_from_groups(groups8)
        from_file += table is not None
        if table is None:
            table = (native_blocks.q4_1_from_float if method == "int4" else native_blocks.q8_0_from_float)(w)
        setattr(parent, name, BlockLinear(table, wtype, k, n, b, w if keep_float else None, max_rows))
    if source:
        log.info("%s: %d matrices taken as stored in the checkpoint", method, from_file)
    tied = model.lm_head is None
    head = model.embed_tokens.weight if tied else model.lm_head.weight
    head_name = "model.embed_tokens.weight" if tied else "lm_head.weight"
    model.head_q = _block_embedding(head, source.get(head_name))
    heads_stored = isinstance(source.get(head_name), Int8Groups)
    if tied:
        model.embed_tokens = model.head_q
    else:
        model.embed_tokens = _block_embedding(model.embed_tokens.weight, source.get("model.embed_tokens.weight"))
        model.lm_head = None
        heads_stored = heads_stored and isinstance(source.get("model.embed_tokens.weight"), Int8Groups)
    # Every matrix (and the embedding/head) came from the file: float copies were never needed
    # (the runner's fast start relies on this, and reloads the float weights when it is not so).
    model.all_stored = from_file == total and heads_stored


def _block_embedding(w: torch.Tensor, stored: Any) -> nn.Module:
    """Q8_0 table of an embedding/LM head: the checkpoint's own Q8_0 blocks when it has them."""
    n, k = w.shape
    if not native_blocks.fits(n, k):
        q, s = quantize_rows(w)
        return QuantEmbedding(q, s, w.dtype)
    table = native_blocks.q8_0_from_groups(stored) if isinstance(stored, Int8Groups) \
        else native_blocks.q8_0_from_float(w)
    return BlockEmbedding(table, native_blocks.Q8_0, k, w.dtype)


def _torch_linear(parent: nn.Module, name: str, child: nn.Linear, method: str, source: dict[str, Any],
                  prefix: str, keep_float: bool, max_rows: int) -> bool:
    """Swap one linear for PyTorch's int kernels; True when it took the checkpoint's own blocks."""
    w, b = child.weight, child.bias
    keep = w if keep_float else None
    if method == "int8":
        setattr(parent, name, Int8Linear(*quantize_rows(w), b, keep, max_rows))
        return False
    if not int4_supported(*w.shape):
        log.info("%s.%s: shape %s does not fit the int4 kernel; left unquantized", prefix, name, tuple(w.shape))
        return False
    groups = _stored_int4(source, f"model.{prefix}", name)  # loader names carry "model."
    setattr(parent, name, Int4Linear(groups or quantize_int4(w), b, keep, max_rows))
    return groups is not None


def _quantize_torch(model: nn.Module, method: str, source: dict[str, Any], keep_float: bool, max_rows: int) -> None:
    from_file = 0
    for prefix, parent, name, child in _linears(model):
        from_file += _torch_linear(parent, name, child, method, source, prefix, keep_float, max_rows)
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
