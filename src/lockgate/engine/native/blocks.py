"""GGUF block quantization in the layout the native kernels read: Q4_1 and Q8_0.

Per 32 weights: Q4_1 is a scale d and an offset m (float16) and 16 bytes of 4-bit codes
(w = d * q + m; byte j holds code j low and code j + 16 high); Q8_0 is d (float16) and
32 int8 codes (w = d * q). A GGUF checkpoint's Q4_1/Q4_0 and Q8_0 tensors become
these exactly (Q4_0 is a Q4_1 with m = -8 d); float weights are quantized the way
llama.cpp does (Q4_1: min/max per block; Q8_0: absmax per block).

The same bytes are regrouped for AVX2: a row is groups of up to 8 blocks, each group
its scales first (d[G], then m[G] for Q4_1), then its codes. Q8_0 codes go by block
pair: the first 16 codes of both blocks, then the last 16 of both (so one 32-byte
load matches one load of the activations, quantized in the same order). Tables are
uint8 tensors [N, K / 32 * (20 or 34)]; rows need K a multiple of 64.
"""
from __future__ import annotations

import numpy as np
import torch

from lockgate.engine.quant.gguf_blocks import GROUP, Int4Groups, Int8Groups

Q4_1, Q8_0 = 0, 1  # kernel type ids (LG_Q4_1, LG_Q8_0 in csrc/cpu_decode.c)
NAMES = {Q4_1: "Q4_1", Q8_0: "Q8_0"}
BYTES = {Q4_1: 20, Q8_0: 34}
GROUP_BLOCKS = 8


def fits(out_features: int, in_features: int) -> bool:
    """Shapes the kernels take: whole block pairs per row."""
    return out_features > 0 and in_features % (2 * GROUP) == 0


def _groups(nb: int) -> list[tuple[int, int]]:
    return [(b, min(b + GROUP_BLOCKS, nb)) for b in range(0, nb, GROUP_BLOCKS)]


def _u8(a: np.ndarray, n: int) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.uint8).reshape(n, -1)


def pack_q4_1(d: np.ndarray, m: np.ndarray, codes: np.ndarray) -> torch.Tensor:
    """d, m: [N, nb] (float16-rounded); codes: [N, nb * 32] in 0..15."""
    n, nb = d.shape
    c = codes.reshape(n, nb, GROUP).astype(np.uint8)
    qs = c[..., :16] | (c[..., 16:] << 4)  # [N, nb, 16], GGUF's nibble order
    parts = []
    for g0, g1 in _groups(nb):
        parts += [_u8(d[:, g0:g1].astype(np.float16), n), _u8(m[:, g0:g1].astype(np.float16), n),
                  qs[:, g0:g1].reshape(n, -1)]
    return torch.from_numpy(np.concatenate(parts, axis=1))


def pack_q8_0(d: np.ndarray, codes: np.ndarray) -> torch.Tensor:
    """d: [N, nb]; codes: [N, nb * 32] int8."""
    n, nb = d.shape
    # [N, pairs, block of pair, half, 16] -> [N, pairs, half, block of pair, 16]
    qs = codes.reshape(n, nb // 2, 2, 2, 16).astype(np.int8).transpose(0, 1, 3, 2, 4).reshape(n, nb, GROUP)
    parts = []
    for g0, g1 in _groups(nb):
        parts += [_u8(d[:, g0:g1].astype(np.float16), n), _u8(qs[:, g0:g1], n)]
    return torch.from_numpy(np.concatenate(parts, axis=1))


def q4_1_from_groups(g: Int4Groups) -> torch.Tensor:
    """Int4Groups (w = (code - 8) * scale + zero) as Q4_1 (w = d * code + m), exactly for GGUF blocks."""
    # zero = m + 8 d was formed in float32 from float16 m and d: this recovers m.
    m = g.zero.astype(np.float64) - 8.0 * g.scale.astype(np.float64)
    return pack_q4_1(g.scale, m, g.codes)


def q4_1_from_float(w: torch.Tensor) -> torch.Tensor:
    """Float [N, K] -> Q4_1: min/max per block, codes 0..15."""
    n, k = w.shape
    g = w.detach().float().reshape(n, k // GROUP, GROUP)
    lo, hi = g.amin(-1), g.amax(-1)
    d = ((hi - lo) / 15).half().float()
    m = lo.half().float()
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    codes = ((g - m[..., None]) * inv[..., None]).round().clamp(0, 15).to(torch.uint8)
    return pack_q4_1(d.numpy(), m.numpy(), codes.reshape(n, k).numpy())


def q8_0_from_groups(g: Int8Groups) -> torch.Tensor:
    return pack_q8_0(g.scale, g.codes)


def q8_0_from_float(w: torch.Tensor) -> torch.Tensor:
    """Float [N, K] -> Q8_0: absmax per block mapped to 127."""
    n, k = w.shape
    g = w.detach().float().reshape(n, k // GROUP, GROUP)
    d = (g.abs().amax(-1) / 127).half().float()
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    codes = (g * inv[..., None]).round().clamp(-127, 127).to(torch.int8)
    return pack_q8_0(d.numpy(), codes.reshape(n, k).numpy())


def dequantize(table: torch.Tensor, wtype: int, k: int) -> torch.Tensor:
    """The float32 weights [N, K] a table holds (tests and references)."""
    raw = table.numpy()
    n, nb = raw.shape[0], k // GROUP
    out = np.empty((n, nb, GROUP), dtype=np.float32)
    at = 0
    for g0, g1 in _groups(nb):
        gl = g1 - g0
        d = raw[:, at:at + 2 * gl].copy().view(np.float16).astype(np.float32)
        at += 2 * gl
        if wtype == Q4_1:
            m = raw[:, at:at + 2 * gl].copy().view(np.float16).astype(np.float32)
            at += 2 * gl
            qs = raw[:, at:at + 16 * gl].reshape(n, gl, 16)
            at += 16 * gl
            codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.float32)
            out[:, g0:g1] = codes * d[..., None] + m[..., None]
        else:
            qs = raw[:, at:at + GROUP * gl].copy().view(np.int8).reshape(n, gl // 2, 2, 2, 16)
            at += GROUP * gl
            codes = qs.transpose(0, 1, 3, 2, 4).reshape(n, gl, GROUP).astype(np.float32)
            out[:, g0:g1] = codes * d[..., None]
    return torch.from_numpy(out.reshape(n, k))
