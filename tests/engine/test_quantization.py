"""Weight-only int8: close to the unquantized model, int8 path for small batches only."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lockgate import LLM, SamplingParams
from lockgate.engine.config import EngineConfig
from lockgate.engine.quantization import INT8_MAX_ROWS, Int8Linear, quantize_rows
from tests.engine.tiny_models import make_checkpoint


def test_quantize_rows_error_is_within_half_a_step():
    w = torch.randn(64, 96) * torch.linspace(0.01, 3.0, 64)[:, None]  # rows of very different scale
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    err = (q.float() * s[:, None] - w).abs()
    assert torch.all(err <= s[:, None] / 2 + 1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_small_batches_quantized_large_batches_exact(dtype):
    torch.manual_seed(0)
    lin = torch.nn.Linear(96, 64, bias=True).to(dtype)
    q = Int8Linear(lin)
    small = torch.randn(INT8_MAX_ROWS, 96, dtype=dtype)
    ref = F.linear(small, lin.weight, lin.bias).float()
    got = q(small).float()
    assert not torch.equal(got, ref)  # the int8 kernel ran, not the original weight
    assert F.cosine_similarity(got.flatten(), ref.flatten(), dim=0) > 0.999
    big = torch.randn(INT8_MAX_ROWS + 1, 96, dtype=dtype)
    assert torch.equal(q(big), F.linear(big, lin.weight, lin.bias))


def test_int8_engine_tracks_the_unquantized_one(tmp_path):
    make_checkpoint(tmp_path, "qwen2")  # qkv bias exercises the biased int8 path
    prompts = [[5, 17, 99, 3, 42, 7], [200, 1, 2, 3]]
    p = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=5)
    full = LLM(str(tmp_path), dtype="float32").generate(prompts, p)
    quant_llm = LLM(str(tmp_path), dtype="float32", quantization="int8")
    quant = quant_llm.generate(prompts, p)
    for a, b in zip(full, quant):
        # First token from identical prompts: the sampled token's logprob is close.
        la = a.outputs[0].logprobs[0][a.outputs[0].token_ids[0]].logprob
        lb = b.outputs[0].logprobs[0][b.outputs[0].token_ids[0]].logprob
        assert abs(la - lb) < 0.05
    s = quant_llm.engine.stats()
    assert s.num_free_blocks == s.num_total_blocks


def test_int8_default_model_still_answers():
    llm = LLM(quantization="int8")
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0.0, max_tokens=24))
    assert "Paris" in out[0].outputs[0].text


def test_unknown_quantization_is_refused():
    with pytest.raises(ValueError, match="quantization must be None or 'int8'"):
        EngineConfig(quantization="int4")
