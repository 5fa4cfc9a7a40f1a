"""Weight-only quantized layers for CPU: group-wise int4 and per-channel int8.

Both run PyTorch's own CPU kernels (`_weight_int4pack_mm_for_cpu`,
`_weight_int8pack_mm`) on the quantized weights alone: no float copy is kept
unless `keep_float` asks for one (then steps with more than `max_rows` rows run a
float GEMM on it, for CPUs where that is faster at large batches, e.g. AMX).
Activations go into the kernels as bfloat16: their float32 paths are several
times slower on AVX2 CPUs; the output comes back in the model's dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lockgate.engine.quant.gguf_blocks import GROUP, Int4Groups

KERNEL_DTYPE = torch.bfloat16


def int4_supported(out_features: int, in_features: int) -> bool:
    """Shapes the int4 CPU kernel packs: rows in 16s, inputs in whole 32-weight groups."""
    return out_features % 16 == 0 and in_features % GROUP == 0


def quantize_int4(w: torch.Tensor) -> Int4Groups:
    """Asymmetric 4-bit per 32-weight group (as GGUF Q4_1): min/max mapped to codes 0 and 15."""
    n, k = w.shape
    g = w.detach().float().reshape(n, k // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-10)
    codes = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8)
    return Int4Groups(codes.reshape(n, k).numpy(), scale.numpy(), (lo + 8 * scale).numpy())


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: w ~= q * scale[:, None] (scale in float32)."""
    wf = w.detach().float()
    scale = wf.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = (wf / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    return q, scale


class QuantLinear(nn.Module):
    """Common part: bias, the optional float copy and the per-step path choice."""

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None,
                 float_weight: torch.Tensor | None, max_rows: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.float_weight = None if float_weight is None else nn.Parameter(float_weight.detach(), requires_grad=False)
        self.max_rows = max_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.float_weight is not None and x.shape[0] > self.max_rows:
            return F.linear(x, self.float_weight, self.bias)
        y = self.qmm(x.to(KERNEL_DTYPE)).to(x.dtype)
        return y if self.bias is None else y + self.bias

    def qmm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantized(self) -> torch.Tensor:
        """The weight the kernel multiplies by, in float32 (tests and references)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, float_copy={self.float_weight is not None}"


class Int4Linear(QuantLinear):
    def __init__(self, groups: Int4Groups, bias: torch.Tensor | None = None,
                 float_weight: torch.Tensor | None = None, max_rows: int = 0) -> None:
        n, k = groups.codes.shape
        super().__init__(k, n, bias, float_weight, max_rows)
        codes = torch.from_numpy(groups.codes).to(torch.int32)
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1))
        sz = torch.stack([torch.from_numpy(groups.scale).t(), torch.from_numpy(groups.zero).t()], dim=-1)
        self.register_buffer("scales_zeros", sz.to(KERNEL_DTYPE).contiguous())  # [K/32, N, 2]

    def qmm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, GROUP, self.scales_zeros)

    def dequantized(self) -> torch.Tensor:
        eye = torch.eye(self.in_features, dtype=KERNEL_DTYPE)
        return self.qmm(eye).float().t().contiguous()  # the kernel applied to the identity


class Int8Linear(QuantLinear):
    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                 float_weight: torch.Tensor | None = None, max_rows: int = 0) -> None:
        n, k = q.shape
        super().__init__(k, n, bias, float_weight, max_rows)
        self.register_buffer("qweight", q.contiguous())
        self.register_buffer("scales", scale.to(KERNEL_DTYPE))

    def qmm(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scales)

    def dequantized(self) -> torch.Tensor:
        return self.qweight.float() * self.scales.float()[:, None]


class QuantEmbedding(nn.Module):
    """Token embedding (and, when tied, the LM head) stored as per-row int8.

    Logits: a fast pass ranks the vocabulary (the int4 kernel on a 4-bit copy of the
    table where its shape allows: on AVX2 it reads 60% of the int8 bytes in 60% of the
    time; else the int8 kernel), then the `REFINE` best per row are recomputed exactly in
    float32 from the int8 rows. The kernels' bfloat16 output alone is too coarse (logits
    of ~15 are 1/16 apart: enough to tie the best two tokens)."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, fast_rank: bool = True) -> None:
        super().__init__()
        self.register_buffer("qweight", q.contiguous())
        self.register_buffer("row_scale", scale.to(dtype)[:, None].contiguous())
        self.register_buffer("scales", scale.to(KERNEL_DTYPE))
        self.dtype = dtype
        self.rank4 = None
        if fast_rank and int4_supported(*q.shape):
            self.rank4 = Int4Linear(quantize_int4(q.float() * scale.float()[:, None]))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.qweight).to(self.dtype) * F.embedding(ids, self.row_scale)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        hk = hidden.to(KERNEL_DTYPE)
        if self.rank4 is not None:
            out = self.rank4.qmm(hk).float()
        else:
            out = torch.ops.aten._weight_int8pack_mm(hk, self.qweight, self.scales).float()
        k = min(REFINE, out.shape[1])
        top = out.topk(k, dim=1, sorted=False).indices  # [B, k]
        rows = F.embedding(top, self.qweight).float()  # [B, k, H]
        exact = torch.bmm(rows, hidden.float()[:, :, None])[..., 0] * F.embedding(top, self.row_scale)[..., 0].float()
        return out.scatter_(1, top, exact)

    def token_logits(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Exact float32 logit of token ids[i] for hidden row i ([N]), as `logits` computes its
        refined candidates (prompt logprobs score tokens outside them)."""
        rows = F.embedding(ids, self.qweight).float()
        return (rows * hidden.float()).sum(dim=-1) * F.embedding(ids, self.row_scale)[:, 0].float()


# Candidates per row whose logits the head recomputes exactly (see QuantEmbedding.logits).
REFINE = 64
