"""lockgate vs Hugging Face transformers on the default model, CPU, one run.

Same prompts for both (64 prompt tokens, 64 output tokens, greedy, EOS ignored),
at 1 stream and at 16 concurrent prompts. Prints output tokens/s for lockgate
(as loaded, and with `quantization="int8"`), for transformers `generate`, and
for transformers' bare forward pass (a decode loop over its own KV cache with no
`generate` machinery), with the ratios, plus the 1-stream hardware bound.

    .venv/bin/python benchmarks/cpu_engine.py [--batches 1,16] [--dtype auto]

transformers runs on the same dequantized GGUF weights (loaded into its own
LlamaForCausalLM), in float32 (its CPU default); lockgate runs in its default CPU dtype (bfloat16 where
the CPU has AVX512-BF16/AMX) unless --dtype says otherwise. Both use all cores.
"""
from __future__ import annotations

import argparse
import os
import random
import time

import torch

from lockgate import LLM, SamplingParams
from lockgate.engine.loader import load_checkpoint

PROMPT_LEN = 64
OUTPUT_LEN = 64


def make_prompts(n: int, vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    # Distinct random ids (above the special tokens) so the prefix cache cannot help.
    return [[rng.randrange(100, vocab) for _ in range(PROMPT_LEN)] for _ in range(n)]


def bench_lockgate(llm: LLM, prompts: list[list[int]]) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=OUTPUT_LEN, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))  # warm-up
    llm.engine.core.kv.reset_prefix_cache()
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    dt = time.perf_counter() - t
    assert all(len(o.outputs[0].token_ids) == OUTPUT_LEN for o in outs)
    return len(prompts) * OUTPUT_LEN / dt


@torch.inference_mode()
def weight_stream_bound(llm: LLM) -> float:
    """Hardware limit for one stream: tokens/s if a decode step did nothing but run every
    weight matrix once (batch 1, lockgate's dtype) — the memory-bandwidth bound."""
    model = llm.engine.core.runner.model
    dtype = llm.engine.core.runner.dtype
    mats = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    mats.append(model.embed_tokens.weight)  # the (tied) LM head
    xs = [torch.randn(1, w.shape[1], dtype=dtype) for w in mats]

    def step() -> None:
        for w, x in zip(mats, xs):
            torch.nn.functional.linear(x, w)

    for _ in range(3):
        step()
    n, t = 20, time.perf_counter()
    for _ in range(n):
        step()
    return n / (time.perf_counter() - t)


def load_hf(dtype: torch.dtype):
    """transformers' LlamaForCausalLM with the same dequantized GGUF weights (HF names)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    ckpt = load_checkpoint(None)
    c = ckpt.config
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                      num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                      num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
                      max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
                      rope_theta=c.rope_theta, tie_word_embeddings=c.tie_word_embeddings)
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    missing, unexpected = model.load_state_dict(dict(ckpt.weights()), strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    if c.tie_word_embeddings:
        model.tie_weights()
    return model


@torch.inference_mode()
def bench_hf_generate(model, prompts: list[list[int]]) -> float:
    ids = torch.tensor(prompts)
    kw = dict(max_new_tokens=OUTPUT_LEN, min_new_tokens=OUTPUT_LEN, do_sample=False,
              attention_mask=torch.ones_like(ids), pad_token_id=0)
    model.generate(ids[:, :8], **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})  # warm-up
    t = time.perf_counter()
    out = model.generate(ids, **kw)
    dt = time.perf_counter() - t
    assert out.shape[1] - ids.shape[1] == OUTPUT_LEN
    return len(prompts) * OUTPUT_LEN / dt


@torch.inference_mode()
def bench_hf_forward(model, prompts: list[list[int]]) -> float:
    """Prefill then greedy decode with HF's own cache: the model's speed minus generate()."""
    ids = torch.tensor(prompts)
    t = time.perf_counter()
    out = model(ids, use_cache=True)
    past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(OUTPUT_LEN - 1):
        out = model(tok, past_key_values=past, use_cache=True)
        past, tok = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    dt = time.perf_counter() - t
    return len(prompts) * OUTPUT_LEN / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--hf-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="transformers' dtype (float32 is its CPU default)")
    ap.add_argument("--skip-hf", action="store_true", help="measure lockgate only")
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    llm = LLM(None, dtype=args.dtype)
    llm_q = LLM(None, dtype=args.dtype, quantization="int8")
    vocab = llm.engine.model_config.vocab_size
    hf = None if args.skip_hf else load_hf(getattr(torch, args.hf_dtype))
    bound = weight_stream_bound(llm)
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"lockgate dtype {llm.engine.core.runner.dtype}, transformers dtype {args.hf_dtype}")
    print(f"1-stream bound of lockgate's dtype (every weight matrix once per token): {bound:.1f} tok/s")
    print(f"{'streams':>8} {'lockgate':>9} {'+int8':>7} {'hf generate':>12} {'hf forward':>11} "
          f"{'x generate':>11} {'x forward':>10} {'int8 x gen':>11}")
    for b in batches:
        prompts = make_prompts(b, vocab, seed=b)
        ours = bench_lockgate(llm, prompts)
        ours_q = bench_lockgate(llm_q, prompts)
        row = f"{b:>8} {ours:>9.1f} {ours_q:>7.1f}"
        if hf is not None:
            gen = bench_hf_generate(hf, prompts)
            fwd = bench_hf_forward(hf, prompts)
            row += f" {gen:>12.1f} {fwd:>11.1f} {ours / gen:>10.1f}x {ours / fwd:>9.1f}x {ours_q / gen:>10.1f}x"
        print(row)
        if b == 1:
            print(f"{'':>8} lockgate (bf16 weights) at 1 stream = {ours / bound:.0%} of its bound")


if __name__ == "__main__":
    main()
