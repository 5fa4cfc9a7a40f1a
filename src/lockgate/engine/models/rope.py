"""Rotary position embedding tables (plain and Llama-3.1 scaled), as HF computes them."""
from __future__ import annotations

import math

import torch

from lockgate.engine.config import ModelConfig


def inv_frequencies(cfg: ModelConfig) -> torch.Tensor:
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    sc = cfg.rope_scaling
    if sc is None or sc.rope_type != "llama3":
        return inv
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    low_wavelen = sc.original_max_position_embeddings / sc.low_freq_factor
    high_wavelen = sc.original_max_position_embeddings / sc.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / sc.factor, inv)
    smooth = (sc.original_max_position_embeddings / wavelen - sc.low_freq_factor) / (
        sc.high_freq_factor - sc.low_freq_factor)
    blended = (1 - smooth) * scaled / sc.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(torch.nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_frequencies(cfg))
        emb = torch.cat((freqs, freqs), dim=-1)
        half = emb.shape[-1] // 2
        sin = emb.sin()
        sin[:, :half].neg_()  # rotate_half's sign folded into the table (exact: a negation)
        self.register_buffer("cos", emb.cos(), persistent=False)  # [max_pos, d] float32
        self.register_buffer("sin_signed", sin, persistent=False)

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin for the step's positions: [T, 1, d], gathered once and shared by every layer."""
        return self.cos[positions].to(dtype).unsqueeze(1), self.sin_signed[positions].to(dtype).unsqueeze(1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """HF's `x * cos + rotate_half(x) * sin` in three kernels: rotate_half(x) * sin equals the
    halves swapped times the signed table (`-x2 * s == x2 * -s` exactly). x: [T, heads, d]."""
    t, n, d = x.shape
    swapped = x.reshape(t, n, 2, d // 2).flip(2).view(t, n, d)
    return x * cos + swapped * sin_signed


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, H, d], k: [T, KVH, d] rotated in HF's rotate_half layout."""
    return rotate(q, cos, sin_signed), rotate(k, cos, sin_signed)
