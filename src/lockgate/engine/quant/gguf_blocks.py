"""GGUF quantized blocks, decoded into codes and per-group scales without a float copy.

Layouts (ggml, 32 weights per block, little endian):

    Q4_0  18 bytes: d (f16), 16 bytes of nibbles        w = d * (q - 8)
    Q4_1  20 bytes: d (f16), m (f16), 16 bytes nibbles  w = d * q + m
    Q8_0  34 bytes: d (f16), 32 int8                    w = d * q

Nibble byte j holds weight j (low 4 bits) and weight j + 16 (high 4 bits). Both
4-bit types come out in one form, `w = (code - 8) * scale + zero` with code in
0..15 (the form PyTorch's int4 kernels take): Q4_0 has zero = 0, Q4_1 has
scale = d and zero = m + 8 d.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

GROUP = 32
FOUR_BIT = ("Q4_0", "Q4_1")
EIGHT_BIT = ("Q8_0",)
_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


@dataclass(slots=True)
class Int4Groups:
    """w[n, k] = (codes[n, k] - 8) * scale[n, k // 32] + zero[n, k // 32]."""

    codes: np.ndarray  # [N, K] uint8 in 0..15
    scale: np.ndarray  # [N, K / 32] float32
    zero: np.ndarray  # [N, K / 32] float32

    def dequantize(self) -> np.ndarray:
        n, k = self.codes.shape
        g = self.codes.reshape(n, k // GROUP, GROUP).astype(np.float32) - 8.0
        return (g * self.scale[..., None] + self.zero[..., None]).reshape(n, k)

    def take_rows(self, rows: np.ndarray) -> Int4Groups:
        return Int4Groups(self.codes[rows], self.scale[rows], self.zero[rows])


@dataclass(slots=True)
class Int8Groups:
    """w[n, k] = codes[n, k] * scale[n, k // 32]."""

    codes: np.ndarray  # [N, K] int8
    scale: np.ndarray  # [N, K / 32] float32

    def dequantize(self) -> np.ndarray:
        n, k = self.codes.shape
        return (self.codes.reshape(n, k // GROUP, GROUP).astype(np.float32) * self.scale[..., None]).reshape(n, k)

    def take_rows(self, rows: np.ndarray) -> Int8Groups:
        return Int8Groups(self.codes[rows], self.scale[rows])


def decodable(type_name: str) -> bool:
    return type_name in _BLOCK_BYTES


def _fields(type_name: str, data: np.ndarray, shape: tuple[int, int]
            ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """A tensor's blocks as fields: d [N, K/32] float32, Q4_1's m (else None) and the codes
    [N, K/32, 32] in weight order (uint8 nibbles 0..15, or Q8_0's int8)."""
    if type_name not in _BLOCK_BYTES:
        raise ValueError(f"no direct decoder for GGUF type {type_name}; supported: {', '.join(_BLOCK_BYTES)}")
    n, k = shape
    if k % GROUP:
        raise ValueError(f"{type_name} tensor of shape {shape}: rows must be whole 32-weight blocks")
    blocks = np.ascontiguousarray(data, dtype=np.uint8).reshape(n, k // GROUP, _BLOCK_BYTES[type_name])
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if type_name == "Q8_0":
        return d, None, blocks[..., 2:].copy().view(np.int8)
    off = 4 if type_name == "Q4_1" else 2
    nib = blocks[..., off:]
    codes = np.concatenate([nib & 0x0F, nib >> 4], axis=-1)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if type_name == "Q4_1" else None
    return d, m, codes


def decode(type_name: str, data: np.ndarray, shape: tuple[int, int]) -> Int4Groups | Int8Groups:
    """`data`: the tensor's raw bytes (any shape, uint8); `shape`: (out, in) in torch order."""
    d, m, codes = _fields(type_name, data, shape)
    flat = codes.reshape(shape)
    if type_name == "Q8_0":
        return Int8Groups(flat, d)
    if m is not None:
        return Int4Groups(flat, d, m + 8.0 * d)
    return Int4Groups(flat, d, np.zeros_like(d))


def dequantize(type_name: str, data: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """float32 [out, in] of a Q4_0/Q4_1/Q8_0 tensor, bit for bit ggml's (and the gguf package's)
    arithmetic (Q4_0 d * (q - 8), Q4_1 d * q + m, Q8_0 q * d), over the whole tensor at once:
    ~10x the gguf package's block-by-block numpy (2.6 s of a float load of the default model)."""
    d, m, q = _fields(type_name, data, shape)
    d = d[..., None]
    if type_name == "Q8_0":
        w = q.astype(np.float32) * d
    elif m is None:
        w = d * (q.astype(np.int8) - np.int8(8)).astype(np.float32)
    else:
        w = d * q.astype(np.float32) + m[..., None]
    return w.reshape(shape)


def unpermute_rows(rows: int, n_head: int) -> np.ndarray:
    """Row order that undoes llama.cpp's q/k permutation (as loader.gguf.unpermute_rows)."""
    half = rows // n_head // 2
    return np.arange(rows).reshape(n_head, half, 2).transpose(0, 2, 1).reshape(rows)
