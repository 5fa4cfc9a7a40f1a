"""Weight-only int8 quantization for CPU decode.

A batch-1 decode step is bound by reading every weight once: int8 weights
(per-output-channel scales) halve the bytes of bf16, and PyTorch's int8-weight
GEMV kernel runs several times faster than the bf16 GEMV here. For larger
batches oneDNN's bf16 GEMM is faster than the int8 kernel, so each layer keeps
its original weight too and picks by the number of rows in the step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

QUANTIZATION_METHODS = ("int8",)
# Steps with at most this many token rows take the int8 path (measured crossover on AVX-512 CPUs).
INT8_MAX_ROWS = 4


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: w ~= q * scale[:, None]."""
    wf = w.float()
    scale = wf.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = (wf / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scale.to(w.dtype)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._weight_int8pack_mm(x.contiguous(), q, scale)


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear, max_rows: int = INT8_MAX_ROWS) -> None:
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        q, s = quantize_rows(linear.weight.detach())
        self.register_buffer("qweight", q, persistent=False)
        self.register_buffer("scales", s, persistent=False)
        self.max_rows = max_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.max_rows:
            return F.linear(x, self.weight, self.bias)
        y = int8_linear(x, self.qweight, self.scales)
        return y if self.bias is None else y + self.bias


def quantize_model(model: nn.Module, method: str, device: torch.device) -> None:
    """Swap every linear layer (and the LM head) for its quantized form, in place."""
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATION_METHODS)}; got {method!r}")
    if device.type != "cpu":
        raise ValueError(f"quantization {method!r} is a CPU decode path; device is {device.type}")
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child))
    head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
    model.head_q = quantize_rows(head.detach())  # used by compute_logits for small batches
