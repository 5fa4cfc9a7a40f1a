"""The Hugging Face tensor names and shapes a `ModelConfig` implies (the loaders' common contract)."""
from __future__ import annotations

from lockgate.engine.config import ModelConfig


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, d, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "self_attn.q_proj.weight"] = (q, h)
        shapes[p + "self_attn.k_proj.weight"] = (kv, h)
        shapes[p + "self_attn.v_proj.weight"] = (kv, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        if cfg.attention_bias:
            shapes[p + "self_attn.q_proj.bias"] = (q,)
            shapes[p + "self_attn.k_proj.bias"] = (kv,)
            shapes[p + "self_attn.v_proj.bias"] = (kv,)
        if cfg.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (d,)
            shapes[p + "self_attn.k_norm.weight"] = (d,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (inter, h)
        shapes[p + "mlp.up_proj.weight"] = (inter, h)
        shapes[p + "mlp.down_proj.weight"] = (h, inter)
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def check_tensors(found: dict[str, tuple[int, ...]], cfg: ModelConfig, source: str) -> None:
    """Fail at load time (not half-way through copying) when names or shapes disagree with the config."""
    expected = expected_shapes(cfg)
    missing = sorted(set(expected) - set(found))
    if missing:
        raise ValueError(f"{source}: checkpoint is missing {len(missing)} tensors the config needs, e.g. {missing[:3]}")
    bad = [f"{n}: {found[n]} != {expected[n]}" for n in expected if tuple(found[n]) != expected[n]]
    if bad:
        raise ValueError(f"{source}: tensor shapes disagree with the config: {'; '.join(bad[:3])}")
