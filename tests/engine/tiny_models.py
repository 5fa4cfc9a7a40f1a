"""Tiny random-weight checkpoints of each supported family, built with transformers.

Shapes are scaled down from the real configs, but every architectural switch of
the family is kept (rope scaling, qkv bias, q/k norm, tied embeddings, GQA).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers.pre_tokenizers import ByteLevel

COMMON = dict(vocab_size=258, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
              bos_token_id=256, eos_token_id=257, rms_norm_eps=1e-5)

FAMILIES = {
    # Llama-3.1-8B's switches: llama3 rope scaling, theta 500000, untied head.
    "llama3.1": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_theta=500000.0, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 256})),
    # Qwen2.5: bias on q/k/v, theta 1e6, tied embeddings (the small ones).
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(rope_theta=1000000.0, tie_word_embeddings=True)),
    # Qwen3: q/k RMSNorm, explicit head_dim larger than hidden/heads.
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(rope_theta=1000000.0, head_dim=32,
                                                      tie_word_embeddings=True)),
    # Mistral 7B v0.1-like: theta 1e4, sliding window larger than anything we test.
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(rope_theta=10000.0, sliding_window=4096,
                                                            tie_word_embeddings=False)),
}


def byte_tokenizer() -> Tokenizer:
    """Byte-level BPE without merges: 256 byte tokens + <s> (256) and </s> (257)."""
    alphabet = ByteLevel.alphabet()
    vocab = {ch: b for b, ch in enumerate(sorted(alphabet, key=lambda c: _byte_of(c)))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<s>", "</s>"])
    return tok


def _byte_of(ch: str) -> int:
    # Invert GPT-2's bytes-to-unicode map: printable bytes map to themselves.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(map(chr, cs), bs))[ch]


def make_checkpoint(path: Path, family: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """Save a random `family` model + tokenizer to `path`; returns the HF model (eval mode)."""
    import transformers

    cfg_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_cls)(**COMMON, **extra, initializer_range=0.1)
    model = getattr(transformers, model_cls)(cfg).to(dtype).eval()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    byte_tokenizer().save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False,
        "chat_template": "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant: {% endif %}",
    }))
    return model


@torch.no_grad()
def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy continuation with HF's own KV cache; also the top-1/top-2 logit gap per step."""
    ids = torch.tensor([prompt])
    out = model(ids, use_cache=True)
    past, tokens, gaps = out.past_key_values, [], []
    logits = out.logits[0, -1].float()
    for _ in range(max_new_tokens):
        top2 = logits.topk(2)
        gaps.append(float(top2.values[0] - top2.values[1]))
        tok = int(top2.indices[0])
        tokens.append(tok)
        out = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits[0, -1].float()
    return tokens, gaps
