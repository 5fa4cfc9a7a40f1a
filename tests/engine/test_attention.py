"""Paged attention: batched prefill groups and fused decode agree with per-sequence SDPA."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lockgate.engine.attention.torch_paged import AttentionMetadata, PrefillSeq, group_prefills, paged_attention

H, KVH, D, BS = 4, 2, 16, 4


def reference(q, k, v, start, n, scale):
    """Causal attention of one sequence's own tokens, heads repeated per KV head."""
    qs, ks, vs = (x[start:start + n].transpose(0, 1) for x in (q, k, v))
    ks, vs = ks.repeat_interleave(H // KVH, 0), vs.repeat_interleave(H // KVH, 0)
    return F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1)


def test_similar_length_prefills_batch_into_groups_and_match_one_by_one():
    torch.manual_seed(0)
    lens = [10, 9, 3, 10, 8]
    t = sum(lens)
    q, k, v = torch.randn(t, H, D), torch.randn(t, KVH, D), torch.randn(t, KVH, D)
    starts = [sum(lens[:i]) for i in range(len(lens))]
    seqs = [PrefillSeq(s, n, n, None) for s, n in zip(starts, lens)]
    groups = group_prefills(seqs, torch.device("cpu"))
    assert sorted(g.batch for g in groups) == [1, 4]  # the 3-token prompt is too short to join
    assert sum(g.mask is not None for g in groups) == 1  # lengths 10, 10, 9, 8 need padding masks
    cache = torch.zeros(64, KVH, D)
    meta = AttentionMetadata(slot_mapping=torch.arange(t), prefills=seqs, block_size=BS, prefill_groups=groups)
    out = paged_attention(q, k, v, cache.clone(), cache.clone(), meta, 0.25)
    for s, n in zip(starts, lens):
        torch.testing.assert_close(out[s:s + n], reference(q, k, v, s, n, 0.25), atol=1e-5, rtol=1e-5)


def test_no_groups_when_every_prefill_stands_alone():
    seqs = [PrefillSeq(0, 20, 20, None), PrefillSeq(20, 5, 5, None), PrefillSeq(25, 7, 30, torch.tensor([0]))]
    assert group_prefills(seqs, torch.device("cpu")) == []


def test_decode_rows_attend_to_their_own_blocks_only():
    torch.manual_seed(1)
    k_cache, v_cache = torch.randn(8 * BS, KVH, D), torch.randn(8 * BS, KVH, D)
    q = torch.randn(2, H, D)
    k_new, v_new = torch.randn(2, KVH, D), torch.randn(2, KVH, D)
    tables = torch.tensor([[3, 5], [6, 0]])  # seq 0: 6 tokens over blocks 3, 5; seq 1: 2 tokens in block 6
    ctx = torch.tensor([6, 2])
    slots = torch.tensor([5 * BS + 1, 6 * BS + 1])
    mask = (torch.arange(2 * BS)[None, :] < ctx[:, None])[:, None, None, :]
    meta = AttentionMetadata(slot_mapping=slots, num_decodes=2, block_size=BS, decode_blocks=tables, decode_mask=mask)
    kc, vc = k_cache.clone(), v_cache.clone()
    out = paged_attention(q, k_new, v_new, kc, vc, meta, 0.25)
    for i in range(2):
        ids = torch.cat([torch.arange(b * BS, (b + 1) * BS) for b in tables[i].tolist()])[: ctx[i]]
        ks, vs = kc[ids].repeat_interleave(H // KVH, 1), vc[ids].repeat_interleave(H // KVH, 1)
        ref = F.scaled_dot_product_attention(q[i][:, None], ks.transpose(0, 1), vs.transpose(0, 1), scale=0.25)
        torch.testing.assert_close(out[i], ref[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kc[slots], k_new)


def test_lone_decode_cuts_its_context_to_length():
    torch.manual_seed(2)
    k_cache, v_cache = torch.randn(4 * BS, KVH, D), torch.randn(4 * BS, KVH, D)
    q, k_new, v_new = torch.randn(1, H, D), torch.randn(1, KVH, D), torch.randn(1, KVH, D)
    tables = torch.tensor([[2, 1]])  # 7 tokens: block 2 full, 3 in block 1 (the rest is stale)
    slots = torch.tensor([1 * BS + 2])
    mask = (torch.arange(2 * BS) < 7)[None, None, None, :]
    meta = AttentionMetadata(slot_mapping=slots, num_decodes=1, block_size=BS, decode_blocks=tables,
                             decode_mask=mask, decode_max_len=7)
    kc, vc = k_cache.clone(), v_cache.clone()
    out = paged_attention(q, k_new, v_new, kc, vc, meta, 0.25)
    ids = torch.cat([torch.arange(2 * BS, 3 * BS), torch.arange(BS, BS + 3)])
    ks, vs = kc[ids].repeat_interleave(H // KVH, 1), vc[ids].repeat_interleave(H // KVH, 1)
    ref = F.scaled_dot_product_attention(q[0][:, None], ks.transpose(0, 1), vs.transpose(0, 1), scale=0.25)
    torch.testing.assert_close(out[0], ref[:, 0], atol=1e-5, rtol=1e-5)
