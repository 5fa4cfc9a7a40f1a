"""Paged attention in plain PyTorch: the CPU backend and the reference for GPU kernels.

The KV cache of one layer is a flat slot array `[num_blocks * block_size, kv_heads,
head_dim]`; slot `block_id * block_size + offset` holds one token. The runner
orders a step's tokens decodes-first, so the first `num_decodes` tokens are one
query each, batched through a gathered, masked SDPA; the prefills that follow
are handled one sequence at a time (a handful per step).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class PrefillSeq:
    q_start: int  # first row of this sequence in the flattened batch
    q_len: int
    ctx_len: int  # tokens of context incl. this chunk
    slots: torch.Tensor | None  # [ctx_len] cache slots; None when the chunk is the whole context


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] where each new token's K/V goes
    num_decodes: int = 0
    decode_slots: torch.Tensor | None = None  # [D, Lmax] context slots of each decode (padded)
    decode_mask: torch.Tensor | None = None  # [D, 1, 1, Lmax] True where a key is attended
    prefills: list[PrefillSeq] = field(default_factory=list)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    k_cache.index_copy_(0, slot_mapping, k)
    v_cache.index_copy_(0, slot_mapping, v)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, H, d]; k, v: [T, KVH, d] for the new tokens. Returns [T, H, d]."""
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    out = torch.empty_like(q)
    d = meta.num_decodes
    if d:
        kk = k_cache[meta.decode_slots].transpose(1, 2)  # [D, KVH, L, d]
        vv = v_cache[meta.decode_slots].transpose(1, 2)
        qd = q[:d].unsqueeze(2)  # [D, H, 1, d]
        o = F.scaled_dot_product_attention(qd, kk, vv, attn_mask=meta.decode_mask, scale=scale, enable_gqa=True)
        out[:d] = o.squeeze(2)
    for p in meta.prefills:
        qs = q[p.q_start:p.q_start + p.q_len].transpose(0, 1)  # [H, q, d]
        if p.slots is None:  # no cached prefix: attend to this chunk's own K/V, causally
            ks = k[p.q_start:p.q_start + p.q_len].transpose(0, 1)
            vs = v[p.q_start:p.q_start + p.q_len].transpose(0, 1)
            o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True)
        else:
            ks = k_cache[p.slots].transpose(0, 1)  # [KVH, ctx, d]
            vs = v_cache[p.slots].transpose(0, 1)
            # Query i sits at position ctx_len - q_len + i and sees keys up to it.
            qpos = torch.arange(p.ctx_len - p.q_len, p.ctx_len, device=q.device)
            mask = torch.arange(p.ctx_len, device=q.device)[None, :] <= qpos[:, None]
            o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, scale=scale, enable_gqa=True)
        out[p.q_start:p.q_start + p.q_len] = o.transpose(0, 1)
    return out
