"""Perplexity of a text under a loaded `LLM`: one teacher-forced forward pass per window.

The `LLM` API samples; it has no prompt log-probabilities. So this runs the engine's own
model (the precision and kernels it serves with, quantized ones included) on the text
directly, writing its keys and values into free KV-cache slots. That is safe only on an
idle engine without prefix caching (no freed block holds content a later request could
reuse): `offline.py` builds its LLMs that way and calls this between generations.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from lockgate import LLM
from lockgate.engine.attention.torch_paged import AttentionMetadata, PrefillSeq, group_prefills

WINDOW = 512


@torch.inference_mode()
def token_logprobs(llm: LLM, ids: list[int], window: int = WINDOW) -> list[float]:
    """log p(ids[i] | ids[:i]) within consecutive windows (each window's first token is context only)."""
    core = llm.engine.core
    if core.config.enable_prefix_caching:
        raise ValueError("perplexity needs an LLM built with enable_prefix_caching=False")
    if core.has_unfinished_requests():
        raise ValueError("perplexity needs an idle engine")
    runner = core.runner
    model = getattr(runner, "model", None)
    if model is None:
        raise ValueError("perplexity needs a real model (not load_format='fake')")
    window = min(window, core.max_model_len, runner.num_blocks * runner.block_size)
    dev = runner.device
    out: list[float] = []
    for start in range(0, max(len(ids) - 1, 0), window - 1):
        chunk = ids[start:start + window]
        if len(chunk) < 2:
            break
        n = len(chunk)
        prefill = PrefillSeq(0, n, n, None)
        meta = AttentionMetadata(slot_mapping=torch.arange(n, device=dev), block_size=runner.block_size,
                                 prefills=[prefill], prefill_groups=group_prefills([prefill], dev))
        x = torch.tensor(chunk, dtype=torch.long, device=dev)
        hidden = model(x, torch.arange(n, device=dev), runner.kv_caches, meta)
        logp = F.log_softmax(model.compute_logits(hidden[:-1]).float(), dim=-1)
        out.extend(logp.gather(1, x[1:, None])[:, 0].tolist())
    return out
