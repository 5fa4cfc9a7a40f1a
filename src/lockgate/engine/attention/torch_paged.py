"""Paged attention in plain PyTorch: the CPU backend and the reference for GPU kernels.

The KV cache of one layer is a flat slot array `[num_blocks * block_size, kv_heads,
head_dim]`; slot `block_id * block_size + offset` holds one token. The runner
orders a step's tokens decodes-first, so the first `num_decodes` tokens are one
query each, batched through gathered whole blocks and two batched matmuls (on
CPU several times faster than a slot-wise gather plus masked SDPA; a lone decode
is one SDPA call). Prefills without a cached prefix are batched by similar length into one
padded SDPA call per group; chunks that continue a cached prefix go one by one.

The cache may hold a narrower type than the model computes in (kv_cache_dtype, e.g. float16
K/V for a float32 model): new K/V are rounded on write (float16 saturated at its largest
finite value, never infinity), and what attention reads from the cache is converted back to
the query's dtype after the gather. A prefill without a cached prefix attends to its own
fresh K/V, as vLLM's does; everything later reads the rounded values.
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
    blocks: torch.Tensor | None  # block table covering ctx_len; None when the chunk is the whole context


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] where each new token's K/V goes
    num_decodes: int = 0
    block_size: int = 16
    decode_blocks: torch.Tensor | None = None  # [D, max_blocks] block tables (padded with block 0)
    decode_mask: torch.Tensor | None = None  # [D, 1, 1, max_blocks * block_size] True where attended
    decode_max_len: int = 0  # the longest decode context (tokens)
    decode_lens: list[int] = field(default_factory=list)  # each decode row's context (tokens)
    # Batch-invariant steps: each decode row attends alone (one SDPA call over its own context),
    # exactly as a lone decode does, whatever else is in the step.
    row_invariant: bool = False
    prefills: list[PrefillSeq] = field(default_factory=list)
    # Fresh prefills batched by similar length (group_prefills); when set, it covers every
    # prefill without a cached prefix, and the per-sequence loop handles only the rest.
    prefill_groups: list[PrefillGroup] = field(default_factory=list)


def to_cache(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`x` in the cache's element type; float16 saturates at +-65504 instead of overflowing to inf
    (the native kernels clamp the same way)."""
    if x.dtype == dtype:
        return x
    y = x.to(dtype)
    if dtype == torch.float16:
        y.clamp_(-65504.0, 65504.0)
    return y


def _read(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    k_cache.index_copy_(0, slot_mapping, to_cache(k, k_cache.dtype))
    v_cache.index_copy_(0, slot_mapping, to_cache(v, v_cache.dtype))


def gather_blocks(cache: torch.Tensor, blocks: torch.Tensor, block_size: int) -> torch.Tensor:
    """Whole blocks by id: [B, nb] -> [B, nb * block_size, KVH, d] (block-sized memcpys)."""
    b, nb = blocks.shape
    paged = cache.view(-1, block_size, cache.shape[1], cache.shape[2])
    return paged.index_select(0, blocks.reshape(-1)).view(b, nb * block_size, cache.shape[1], cache.shape[2])


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
          scale: float) -> torch.Tensor:
    """One sequence's attention, [heads, len, d]. A leading batch dim matters: given 3-D
    inputs PyTorch's CPU SDPA takes a path 2-4x slower (measured at 64-512 tokens)."""
    o = F.scaled_dot_product_attention(q[None], k[None], v[None], is_causal=mask is None,
                                       attn_mask=None if mask is None else mask[None, None],
                                       scale=scale, enable_gqa=True)
    return o[0]


def _lone_decode(qd: torch.Tensor, kk: torch.Tensor, vv: torch.Tensor, n: int, scale: float) -> torch.Tensor:
    """One decode row over its context cut to length: [1, KVH, G, d] -> [1, H, d]."""
    return F.scaled_dot_product_attention(qd, _read(kk[:, :n], qd.dtype).transpose(1, 2),
                                          _read(vv[:, :n], qd.dtype).transpose(1, 2), scale=scale).view(1, -1, qd.shape[-1])


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q: [T, H, d]; k, v: [T, KVH, d] for the new tokens. Returns [T, H, d]."""
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    d = meta.num_decodes
    dec = None
    if d:
        kvh, hd = k_cache.shape[1], k_cache.shape[2]
        kk = gather_blocks(k_cache, meta.decode_blocks, meta.block_size)  # [D, L, KVH, d]
        vv = gather_blocks(v_cache, meta.decode_blocks, meta.block_size)
        qd = q[:d].reshape(d, kvh, -1, hd)  # query heads grouped by their KV head
        if meta.row_invariant:
            dec = torch.cat([_lone_decode(qd[i:i + 1], kk[i:i + 1], vv[i:i + 1], meta.decode_lens[i], scale)
                             for i in range(d)])
        elif d == 1:
            # One sequence: its context, cut to length, needs no mask; the G query heads of a KV
            # head act as G query rows of one fused SDPA call (about half the time of the
            # matmul/mask/softmax/matmul sequence below at one stream).
            dec = _lone_decode(qd, kk, vv, meta.decode_max_len, scale)
        else:
            kk, vv = _read(kk, q.dtype), _read(vv, q.dtype)
            scores = torch.matmul(qd, kk.permute(0, 2, 3, 1)).float() * scale  # [D, KVH, G, L]
            scores.masked_fill_(~meta.decode_mask, float("-inf"))
            probs = torch.softmax(scores, dim=-1).to(q.dtype)
            dec = torch.matmul(probs, vv.transpose(1, 2)).view(d, -1, hd)
        if not meta.prefills:
            return dec
    out = torch.empty_like(q)
    if dec is not None:
        out[:d] = dec
    for g in meta.prefill_groups:
        _prefill_group(q, k, v, g, scale, out)
    for p in meta.prefills:
        if p.blocks is None and meta.prefill_groups:
            continue  # computed in its group
        qs = q[p.q_start:p.q_start + p.q_len].transpose(0, 1)  # [H, q, d]
        if p.blocks is None:  # no cached prefix: attend to this chunk's own K/V, causally
            ks = k[p.q_start:p.q_start + p.q_len].transpose(0, 1)
            vs = v[p.q_start:p.q_start + p.q_len].transpose(0, 1)
            o = _sdpa(qs, ks, vs, None, scale)
        else:
            ks = _read(gather_blocks(k_cache, p.blocks[None], meta.block_size)[0, : p.ctx_len], q.dtype)
            vs = _read(gather_blocks(v_cache, p.blocks[None], meta.block_size)[0, : p.ctx_len], q.dtype)
            ks, vs = ks.transpose(0, 1), vs.transpose(0, 1)
            # Query i sits at position ctx_len - q_len + i and sees keys up to it.
            qpos = torch.arange(p.ctx_len - p.q_len, p.ctx_len, device=q.device)
            mask = torch.arange(p.ctx_len, device=q.device)[None, :] <= qpos[:, None]
            o = _sdpa(qs, ks, vs, mask, scale)
        out[p.q_start:p.q_start + p.q_len] = o.transpose(0, 1)
    return out


@dataclass(slots=True)
class PrefillGroup:
    """Whole-prompt prefills of similar length, run as one padded, batched SDPA call."""

    gather: torch.Tensor  # [B * L] flattened rows of q/k/v (padding repeats a sequence's first row)
    valid: torch.Tensor  # [B * L] bool: a real token, not padding
    rows: torch.Tensor  # [n_valid] where the valid outputs go in the flattened batch
    batch: int
    length: int  # L, the longest prompt of the group
    mask: torch.Tensor | None  # [B, 1, L, L] causal & key-is-real; None when all lengths are equal


def group_prefills(prefills: list[PrefillSeq], device: torch.device, min_ratio: float = 0.75) -> list[PrefillGroup]:
    """Batch the prefills that have no cached prefix: sorted by length, a group takes sequences
    at least `min_ratio` as long as its longest (bounded padding). Singletons are left alone."""
    fresh = sorted((p for p in prefills if p.blocks is None), key=lambda p: -p.q_len)
    groups: list[list[PrefillSeq]] = []
    for p in fresh:
        if groups and p.q_len >= min_ratio * groups[-1][0].q_len:
            groups[-1].append(p)
        else:
            groups.append([p])
    if all(len(g) == 1 for g in groups):
        return []
    out = []
    for g in groups:
        length = g[0].q_len
        pos = torch.arange(length)
        gather = torch.cat([p.q_start + pos.clamp(max=p.q_len - 1) for p in g])
        lens = torch.tensor([p.q_len for p in g])
        valid = (pos[None, :] < lens[:, None]).reshape(-1)
        mask = None
        if any(p.q_len != length for p in g):
            causal = pos[None, :] <= pos[:, None]  # [L(q), L(k)]
            mask = (causal[None] & (pos[None, None, :] < lens[:, None, None]))[:, None]
        out.append(PrefillGroup(gather.to(device), valid.to(device), gather[valid].to(device), len(g), length,
                                None if mask is None else mask.to(device)))
    return out


def _prefill_group(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: PrefillGroup, scale: float,
                   out: torch.Tensor) -> None:
    def batched(x: torch.Tensor) -> torch.Tensor:  # [B*L, heads, d] -> [B, heads, L, d]
        return x.index_select(0, g.gather).view(g.batch, g.length, x.shape[1], x.shape[2]).transpose(1, 2)

    o = F.scaled_dot_product_attention(batched(q), batched(k), batched(v), attn_mask=g.mask,
                                       is_causal=g.mask is None, scale=scale, enable_gqa=True)
    o = o.transpose(1, 2).reshape(g.batch * g.length, q.shape[1], q.shape[2])
    out.index_copy_(0, g.rows, o[g.valid])
