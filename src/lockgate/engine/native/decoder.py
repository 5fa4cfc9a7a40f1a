"""Steps of a block-quantized Llama-family model in one native call.

The runner hands a step here as rows of tokens, each with its position, KV slot and its
sequence's block table (decodes, and prefill chunks whose attention is small enough:
runner.NATIVE_MAX_ATTENTION). `lg_decode` (csrc/cpu_decode.c) then runs the embedding
lookup, every layer (norms, fused QKV, q/k norm, RoPE, the KV write of every row, paged
attention of each row up to its own position, so causal within a chunk, O, gate/up,
SiLU, down, residuals) and the final norm over the same tables, caches and RoPE tables
the PyTorch model uses, so either path can take any step.
"""
from __future__ import annotations

import ctypes
import logging

import numpy as np
import torch

from lockgate.engine.native.build import load
from lockgate.engine.native.linear import BlockEmbedding, BlockLinear

log = logging.getLogger(__name__)

_P = ctypes.c_void_p


class _Layer(ctypes.Structure):
    _fields_ = [(n, _P) for n in ("attn_norm", "ffn_norm", "q_norm", "k_norm", "qkv_bias",
                                  "qkv", "o", "gate_up", "down", "k_cache", "v_cache")]


class _Model(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int) for n in ("n_layers", "hidden", "n_heads", "n_kv_heads", "head_dim",
                                            "inter", "block_size", "wtype", "embed_type", "vocab", "max_pos",
                                            "kv_type")] + [
        ("eps", ctypes.c_float), ("scale", ctypes.c_float), ("cos", _P), ("sin_signed", _P),
        ("embed", _P), ("final_norm", _P), ("layers", ctypes.POINTER(_Layer))]


# The KV cache element types lg_decode reads and writes (LG_KV_* in csrc/cpu_decode.c).
KV_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def why_not(model: torch.nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> str | None:
    """None when `model` can decode natively, else the reason it cannot."""
    if load() is None:
        return "native kernels unavailable"
    if not isinstance(model.embed_tokens, BlockEmbedding):
        return "embedding is not a block table"
    types = set()
    for layer in model.layers:
        att, mlp = layer.self_attn, layer.mlp
        mods = (att.qkv_proj, att.o_proj, mlp.gate_up_proj, mlp.down_proj)
        if not all(isinstance(m, BlockLinear) for m in mods):
            return "a projection is not block-quantized"
        if any(m.float_weight is not None for m in mods):
            return "float copies kept (quantization_float_above)"
        if any(m.bias is not None for m in mods[1:]):
            return "bias on o/gate/up/down"
        types |= {m.wtype for m in mods}
        # Norms and the qkv bias of a 16-bit model are read through float32 copies (NativeDecoder).
    if len(types) != 1:
        return "mixed block types"
    if any(k.dtype not in KV_TYPES or not k.is_contiguous() for kv in kv_caches for k in kv):
        return "KV cache is not float32, float16 or bfloat16"
    if len({k.dtype for kv in kv_caches for k in kv}) > 1:
        return "KV cache tensors of mixed types"
    return None


class NativeDecoder:
    def __init__(self, model: torch.nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
                 block_size: int) -> None:
        cfg = model.config
        self.lib = load()
        self.hidden = cfg.hidden_size
        self._keep = [model, kv_caches]  # every pointer below points into these
        self.cos = model.rope.cos.float().contiguous()
        self.sin = model.rope.sin_signed.float().contiguous()
        layers = (_Layer * len(model.layers))()
        for i, (layer, (kc, vc)) in enumerate(zip(model.layers, kv_caches)):
            att, mlp = layer.self_attn, layer.mlp
            layers[i] = _Layer(
                self._f32(layer.input_layernorm.weight), self._f32(layer.post_attention_layernorm.weight),
                self._f32(att.q_norm.weight if att.q_norm is not None else None),
                self._f32(att.k_norm.weight if att.k_norm is not None else None),
                self._f32(att.qkv_proj.bias), _ptr(att.qkv_proj.table), _ptr(att.o_proj.table),
                _ptr(mlp.gate_up_proj.table), _ptr(mlp.down_proj.table), _ptr(kc), _ptr(vc))
        self._layers = layers
        emb = model.embed_tokens
        self.model = _Model(cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
                            cfg.num_key_value_heads, cfg.head_dim, cfg.intermediate_size, block_size,
                            model.layers[0].self_attn.qkv_proj.wtype, emb.wtype, emb.vocab, self.cos.shape[0],
                            KV_TYPES[kv_caches[0][0].dtype], cfg.rms_norm_eps,
                            cfg.head_dim ** -0.5, _ptr(self.cos), _ptr(self.sin), _ptr(emb.table),
                            self._f32(model.norm.weight), layers)

    def _f32(self, t: torch.Tensor | None) -> int | None:
        """A pointer to `t` as float32 (what lg_decode reads): `t` itself when it is float32, else a
        copy kept here (a 16-bit model's norms and qkv bias: a few KiB, never updated after load)."""
        if t is None or t.dtype == torch.float32:
            return _ptr(t)
        copy = t.detach().float().contiguous()
        self._keep.append(copy)
        return _ptr(copy)

    @classmethod
    def build(cls, model: torch.nn.Module, kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
              block_size: int) -> NativeDecoder | None:
        reason = why_not(model, kv_caches)
        if reason is not None:
            log.info("steps run the PyTorch model: %s", reason)
            return None
        return cls(model, kv_caches, block_size)

    def __call__(self, ids: np.ndarray, positions: np.ndarray, slots: np.ndarray, tables: np.ndarray,
                 ctx_lens: np.ndarray) -> torch.Tensor:
        """ids, positions, slots, ctx_lens: [M] int64; tables: [M, max_blocks] int64 block ids.
        Returns the final-normed hidden states [M, hidden] (float32)."""
        m = len(ids)
        out = torch.empty(m, self.hidden, dtype=torch.float32)
        arrs = [np.ascontiguousarray(a, dtype=np.int64) for a in (ids, positions, slots, tables, ctx_lens)]
        rc = self.lib.lg_decode(ctypes.byref(self.model), m, *(a.ctypes.data for a in arrs[:4]),
                                arrs[3].shape[1], arrs[4].ctypes.data, out.data_ptr())
        if rc == -2:
            raise ValueError("native decode: token id, position or context length out of range")
        if rc == -3:
            raise ValueError("native decode: unknown KV cache type")
        if rc != 0:
            raise MemoryError("native decode step could not allocate its scratch memory")
        return out
