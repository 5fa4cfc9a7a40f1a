"""Linear layers and the embedding/LM head on GGUF blocks, multiplied by the native kernels.

`BlockLinear` serves the steps `NativeDecoder` does not take (long prompts) one matmul
per call; the others run the whole model in `NativeDecoder` on the same tables. Nothing keeps a float copy unless `float_weight` is given (then steps with more
than `max_rows` rows use a float GEMM on it: for CPUs with AMX).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lockgate.engine.native import blocks
from lockgate.engine.native.build import load
from lockgate.engine.quant.linear import REFINE  # candidates per row recomputed exactly in float32


def _f32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()


def gemm(x: torch.Tensor, table: torch.Tensor, wtype: int, n: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [T, K] (any float dtype) . W^T -> float32 [T, N]."""
    xf = _f32(x)
    t, k = xf.shape
    y = torch.empty(t, n, dtype=torch.float32)
    if t:
        load().lg_gemm(xf.data_ptr(), t, k, table.data_ptr(), wtype, n,
                       None if bias is None else bias.data_ptr(), y.data_ptr())
    return y


class BlockLinear(nn.Module):
    def __init__(self, table: torch.Tensor, wtype: int, in_features: int, out_features: int,
                 bias: torch.Tensor | None = None, float_weight: torch.Tensor | None = None,
                 max_rows: int = 0) -> None:
        super().__init__()
        self.in_features, self.out_features, self.wtype = in_features, out_features, wtype
        self.register_buffer("table", table.contiguous())
        self.bias = None if bias is None else nn.Parameter(_f32(bias.detach().clone()), requires_grad=False)
        self.float_weight = None if float_weight is None else nn.Parameter(float_weight.detach(), requires_grad=False)
        self.max_rows = max_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.float_weight is not None and x.shape[0] > self.max_rows:
            return F.linear(x, self.float_weight, None if self.bias is None else self.bias.to(x.dtype))
        lead = x.shape[:-1]
        y = gemm(x.reshape(-1, self.in_features), self.table, self.wtype, self.out_features, self.bias)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def dequantized(self) -> torch.Tensor:
        return blocks.dequantize(self.table, self.wtype, self.in_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, {blocks.NAMES[self.wtype]}, "
                f"float_copy={self.float_weight is not None}")


class BlockEmbedding(nn.Module):
    """Token embedding (and, when tied, the LM head) as a Q8_0 table.

    Logits: the native kernel ranks the vocabulary on a 4-bit (Q4_1) copy of the table
    (`rank=True`: 59% of the Q8_0 bytes, read once per decode step; activations quantized to
    int8, as llama.cpp does), then the `REFINE` best per row are recomputed in float32 from
    the Q8_0 rows, so the sampled token's logit is the exact product with the stored weights."""

    def __init__(self, table: torch.Tensor, wtype: int, hidden: int, dtype: torch.dtype, rank: bool = True) -> None:
        super().__init__()
        self.register_buffer("table", table.contiguous())
        self.wtype, self.hidden, self.dtype = wtype, hidden, dtype
        self.vocab = table.shape[0]
        rank_table = blocks.q4_1_from_float(self.dequantized()) if rank and wtype != blocks.Q4_1 else None
        self.register_buffer("rank_table", rank_table)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self._rows(ids).to(self.dtype).reshape(*ids.shape, self.hidden)

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The table's rows for `ids`, dequantized to float32 [N, hidden]."""
        flat = ids.reshape(-1).to(torch.int64).contiguous()
        out = torch.empty(flat.numel(), self.hidden, dtype=torch.float32)
        if flat.numel():
            if int(flat.min()) < 0 or int(flat.max()) >= self.vocab:
                raise IndexError(f"token id out of range [0, {self.vocab})")
            load().lg_rows(self.table.data_ptr(), self.wtype, self.hidden, flat.data_ptr(), flat.numel(),
                           out.data_ptr())
        return out

    def token_logits(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Exact float32 logit of token ids[i] for hidden row i ([N]): what `logits` gives the
        candidates it refines, for any token (prompt logprobs score tokens outside them)."""
        return (self._rows(ids) * _f32(hidden)).sum(dim=-1)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        h = _f32(hidden)
        out = torch.empty(h.shape[0], self.vocab, dtype=torch.float32)
        rank, rank_type = self.ranking()
        if h.shape[0] and load().lg_logits(rank.data_ptr(), rank_type, self.table.data_ptr(), self.wtype,
                                           self.hidden, self.vocab, h.data_ptr(), h.shape[0], REFINE,
                                           out.data_ptr()):
            raise MemoryError("native logits could not allocate their scratch memory")
        return out

    def ranking(self) -> tuple[torch.Tensor, int]:
        """The table (and its block type) the logits are ranked on."""
        return (self.table, self.wtype) if self.rank_table is None else (self.rank_table, blocks.Q4_1)

    def dequantized(self) -> torch.Tensor:
        """The whole table in float32, through the kernels' own row decoder (exact: a float16 scale
        times an integer code; ~20x numpy's, which was 0.6 s of the default model's start-up)."""
        return self._rows(torch.arange(self.vocab))
