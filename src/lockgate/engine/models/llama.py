"""The Llama family in one module: Llama 2/3/3.1, Mistral, Qwen2 (qkv bias), Qwen3 (q/k norm), SmolLM.

Works on a flattened batch: `input_ids` and `positions` are `[T]` for every token
of every sequence in the step; attention reads and writes the paged KV cache.
q/k/v and gate/up projections are fused into one matmul each.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from lockgate.engine.attention.torch_paged import AttentionMetadata, paged_attention
from lockgate.engine.config import ModelConfig
from lockgate.engine.models.rope import RotaryEmbedding, apply_rope, rotate


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype  # normalise in fp32, as HF does, then scale in the model dtype
        if dtype == torch.float32:  # the same arithmetic in one fused kernel
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.h, self.kvh, self.d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_size, self.kv_size = self.h * self.d, self.kvh * self.d
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.scale = self.d ** -0.5

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                kv: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        qkv = self.qkv_proj(x)
        v = qkv[:, self.q_size + self.kv_size:].view(t, self.kvh, self.d)
        if self.q_norm is None:  # q and k sit side by side: rotate both in one go
            qk = rotate(qkv[:, : self.q_size + self.kv_size].view(t, self.h + self.kvh, self.d), *rope)
            q, k = qk[:, : self.h], qk[:, self.h:]
        else:
            q, k = qkv[:, : self.q_size].view(t, self.h, self.d), qkv[:, self.q_size: self.q_size + self.kv_size]
            q, k = apply_rope(self.q_norm(q), self.k_norm(k.view(t, self.kvh, self.d)), *rope)
        o = paged_attention(q, k, v, kv[0], kv[1], meta, self.scale)
        return self.o_proj(o.reshape(t, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.inter = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * self.inter, bias=False)
        self.down_proj = nn.Linear(self.inter, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.inter, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                kv: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, kv, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope = RotaryEmbedding(cfg, max_positions)
        self.head_q: nn.Module | None = None  # int8 LM head (quant/quantize.py)
        self.all_stored = False  # quantized with every matrix taken from the file's own blocks

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]], meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        rope = self.rope.tables(positions, x.dtype)
        for layer, kv in zip(self.layers, kv_caches):
            x = layer(x, rope, kv, meta)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.head_q is not None:
            return self.head_q.logits(hidden)
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, w).float()

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], skipped: frozenset[str] = frozenset()) -> None:
        """Copy HF-named tensors in, fusing q/k/v and gate/up. Every parameter must be set, or be
        among `skipped` (HF names the caller replaces with stored blocks: left unset here)."""
        params = dict(self.named_parameters())
        fused = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                 "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
        loaded: set[str] = set()
        for name in skipped:
            parts = name.removeprefix("model.").split(".")
            if len(parts) >= 2 and parts[-2] in fused:
                proj, shard = fused[parts[-2]]
                loaded.add(".".join(parts[:-2] + [proj, parts[-1]]) + f"#{shard}")
            else:
                loaded.add(".".join(parts))
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: the embedding is the head
            if "rotary_emb" in name:
                continue
            parts = name.split(".")
            target, shard = name, None
            if len(parts) >= 2 and parts[-2] in fused:
                proj, shard = fused[parts[-2]]
                target = ".".join(parts[:-2] + [proj, parts[-1]])
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in the model")
            p = params[target]
            if shard is None:
                if p.shape != tensor.shape:
                    raise ValueError(f"{name}: shape {tuple(tensor.shape)} != expected {tuple(p.shape)}")
                p.copy_(tensor)
                loaded.add(target)
                continue
            dst = self._shard(p, parts[-2], shard)
            if dst.shape != tensor.shape:
                raise ValueError(f"{name}: shape {tuple(tensor.shape)} != expected {tuple(dst.shape)}")
            dst.copy_(tensor)
            loaded.add(f"{target}#{shard}")
        expected = set()
        for pname in params:
            if ".qkv_proj." in pname:
                expected |= {f"{pname}#{i}" for i in range(3)}
            elif ".gate_up_proj." in pname:
                expected |= {f"{pname}#{i}" for i in range(2)}
            else:
                expected.add(pname)
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")

    def _shard(self, p: torch.Tensor, proj: str, shard: int) -> torch.Tensor:
        cfg = self.config
        if proj in ("q_proj", "k_proj", "v_proj"):
            q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
            start, size = [(0, q), (q, kv), (q + kv, kv)][shard]
        else:
            start, size = shard * cfg.intermediate_size, cfg.intermediate_size
        return p.narrow(0, start, size)
