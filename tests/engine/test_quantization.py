"""Weight-only int4/int8: block decoding, the kernels' arithmetic, per-step path choice, engines."""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as Q

from lockgate import LLM, SamplingParams
from lockgate.engine.config import EngineConfig
from lockgate.engine.core.runner import build_model
from lockgate.engine.loader import load_checkpoint
from lockgate.engine.native.build import load as load_native
from lockgate.engine.quant import gguf_blocks
from lockgate.engine.quant.quantize import (
    BlockLinear,
    Int4Linear,
    Int8Linear,
    QuantEmbedding,
    quantize_int4,
    quantize_model,
    quantize_rows,
    weight_bytes,
)
from tests.engine.test_loader_gguf import DIMS, tiny_tensors, write_gguf
from tests.engine.tiny_models import make_checkpoint

CPU = torch.device("cpu")


def close(got: torch.Tensor, ref: torch.Tensor, tol: float) -> bool:
    return bool(((got.float() - ref.float()).abs().max() / ref.float().abs().max()) < tol)


def test_quantize_rows_error_is_within_half_a_step():
    w = torch.randn(64, 96) * torch.linspace(0.01, 3.0, 64)[:, None]  # rows of very different scale
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    err = (q.float() * s[:, None] - w).abs()
    assert torch.all(err <= s[:, None] / 2 + 1e-6)


def test_quantize_int4_error_is_within_half_a_step_per_group():
    w = torch.randn(32, 128) * torch.linspace(0.01, 3.0, 128)  # groups of very different scale
    g = quantize_int4(w)
    assert g.codes.dtype == np.uint8 and g.codes.max() <= 15 and g.scale.shape == (32, 4)
    err = np.abs(g.dequantize() - w.numpy())
    assert np.all(err <= np.repeat(g.scale, 32, axis=1) / 2 + 1e-5)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
def test_gguf_blocks_decode_exactly_as_gguf_dequantizes(qtype):
    w = np.random.default_rng(0).standard_normal((16, 96)).astype(np.float32) + 0.3
    raw = gguf.quants.quantize(w, qtype)
    groups = gguf_blocks.decode(qtype.name, raw, (16, 96))
    ref = gguf.quants.dequantize(raw, qtype).reshape(16, 96)
    assert type(groups).__name__ == ("Int8Groups" if qtype == Q.Q8_0 else "Int4Groups")
    np.testing.assert_allclose(groups.dequantize(), ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="no direct decoder"):
        gguf_blocks.decode("Q5_K", raw, (16, 96))


@pytest.mark.parametrize("rows", [1, 3, 8, 40])
def test_int4_and_int8_kernels_multiply_by_their_weights(rows):
    torch.manual_seed(0)
    w, b = torch.randn(64, 128) * 0.1 + 0.02, torch.randn(64)
    x = torch.randn(rows, 128)
    g = quantize_int4(w)
    i4 = Int4Linear(g, bias=b)
    ref4 = F.linear(x, torch.from_numpy(g.dequantize()), b)
    y4 = i4(x)
    assert y4.shape == (rows, 64) and y4.dtype == x.dtype
    assert close(y4, ref4, 0.02)  # bfloat16 activations and scales, nothing coarser
    assert close(i4.dequantized(), torch.from_numpy(g.dequantize()), 0.01)
    i8 = Int8Linear(*quantize_rows(w), bias=b)
    y8 = i8(x)
    assert close(y8, F.linear(x, i8.dequantized(), b), 0.02)
    assert close(y8, F.linear(x, w, b), 0.03)


def test_float_copy_serves_steps_above_max_rows_only():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    lin = Int4Linear(quantize_int4(w), float_weight=w, max_rows=4)
    small, big = torch.randn(4, 64), torch.randn(5, 64)
    assert torch.equal(lin(big), F.linear(big, w))  # the float GEMM ran
    assert not torch.equal(lin(small), F.linear(small, w))  # the int4 kernel ran
    assert close(lin(small), F.linear(small, w), 0.2)
    no_copy = Int4Linear(quantize_int4(w))
    assert not torch.equal(no_copy(big), F.linear(big, w))  # without a copy every size is int4


@pytest.mark.parametrize("vocab", [300, 320])  # 320 rows: ranked by the int4 kernel first
def test_quant_embedding_rows_and_exact_top_logits(vocab):
    torch.manual_seed(0)
    table = torch.randn(vocab, 64)
    emb = QuantEmbedding(*quantize_rows(table), torch.float32)
    deq = emb.qweight.float() * emb.row_scale
    ids = torch.tensor([0, 7, 299, 7])
    assert torch.equal(emb(ids), deq[ids])
    hidden = torch.randn(3, 64) * 4
    logits = emb.logits(hidden)
    ref = hidden @ deq.t()
    assert logits.dtype == torch.float32 and logits.shape == (3, vocab)
    assert (emb.rank4 is not None) == (vocab == 320)
    assert torch.equal(logits.argmax(-1), ref.argmax(-1))
    top = ref.topk(8, dim=-1).indices
    # The leading logits are recomputed in float32: far finer than bfloat16's 1/16 at this size.
    assert (logits.gather(1, top) - ref.gather(1, top)).abs().max() < 1e-3


@pytest.mark.parametrize("kernels", ["torch", "native"])
def test_int4_takes_gguf_blocks_as_stored(tmp_path: Path, kernels: str):
    """A Q4_1/Q4_0 llama GGUF: the int4 layers hold the file's own codes (q/k un-permuted, fused),
    so they multiply by the weights the float loader dequantizes: exactly for the native Q4_1
    tables (scales as stored, float16), within bfloat16 rounding of the scales for PyTorch's."""
    if kernels == "native" and load_native() is None:
        pytest.skip("no C compiler for the native kernels")
    tensors = tiny_tensors(DIMS, [Q.Q4_1, Q.Q4_0], False, False, True, np.random.default_rng(0))
    ck = load_checkpoint(write_gguf(tmp_path / "m.gguf", "llama", DIMS, tensors))
    model = build_model(ck, 64, CPU, torch.float32)
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = []
    stored = ck.quantized

    def spy():
        calls.append(1)
        return stored()

    assert quantize_model(model, "int4", CPU, stored=spy, kernels=kernels) == kernels
    assert calls
    for name in ("layers.0.self_attn.qkv_proj", "layers.1.mlp.gate_up_proj", "layers.1.mlp.down_proj"):
        mod = model.get_submodule(name)
        # down_proj's 96 inputs are an odd number of blocks: PyTorch's kernel takes it then.
        native = kernels == "native" and "down" not in name
        assert isinstance(mod, BlockLinear if native else Int4Linear)
        w = ref[f"{name}.weight"]
        tol = 1e-6 if native else 0.02
        assert (mod.dequantized() - w).abs().max() <= tol * w.abs().max()
        assert mod.float_weight is None


def test_unsupported_int4_shapes_stay_float():
    model = torch.nn.Module()
    model.proj = torch.nn.Linear(40, 24)  # 24 rows: not a multiple of 16
    model.embed_tokens = torch.nn.Embedding(10, 40)
    model.lm_head = None
    quantize_model(model, "int4", CPU)
    assert isinstance(model.proj, torch.nn.Linear)
    assert isinstance(model.embed_tokens, QuantEmbedding)


@pytest.mark.parametrize("method", ["int4", "int8"])
def test_quantized_engine_tracks_float32_and_memory_falls(tmp_path, method):
    make_checkpoint(tmp_path, "qwen2")  # qkv bias exercises the biased path
    prompts = [[5, 17, 99, 3, 42, 7], [200, 1, 2, 3]]
    p = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=5)
    full_llm = LLM(str(tmp_path), dtype="float32")
    full = full_llm.generate(prompts, p)
    quant_llm = LLM(str(tmp_path), dtype="float32", quantization=method)
    quant = quant_llm.generate(prompts, p)
    for a, b in zip(full, quant):
        # First token from identical prompts: the sampled token's logprob is close.
        la = a.outputs[0].logprobs[0][a.outputs[0].token_ids[0]].logprob
        lb = b.outputs[0].logprobs[0][a.outputs[0].token_ids[0]].logprob
        assert abs(la - lb) < (0.3 if method == "int4" else 0.05)  # 4-bit of random weights: coarser
    s = quant_llm.engine.stats()
    assert s.num_free_blocks == s.num_total_blocks
    full_bytes = weight_bytes(full_llm.engine.core.runner.model)
    quant_bytes = weight_bytes(quant_llm.engine.core.runner.model)
    # No float copy kept (int4: 4-bit layers plus the 8-bit embedding and its 4-bit ranking copy).
    assert quant_bytes < full_bytes * (0.25 if method == "int4" else 0.3)


def test_batch_size_switching_gives_the_same_tokens(tmp_path):
    """One request alone, then among 40 others (prefill rows > any small-batch cut-off):
    greedy tokens of the shared prompt agree, whichever kernel each step used."""
    make_checkpoint(tmp_path, "llama3.1")
    llm = LLM(str(tmp_path), dtype="float32", quantization="int4")
    p = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    alone = llm.generate([[9, 8, 7, 6]], p)[0].outputs[0].token_ids
    crowd = llm.generate([[9, 8, 7, 6]] + [[i + 10, i + 11, 3] for i in range(40)], p)
    assert crowd[0].outputs[0].token_ids == alone


def test_unknown_quantization_is_refused():
    with pytest.raises(ValueError, match="quantization must be one of auto, none, int4, int8; got 'nf4'"):
        EngineConfig(quantization="nf4")
    with pytest.raises(ValueError, match="quantization must be one of"):
        quantize_model(torch.nn.Module(), "fp8", CPU)


def test_engine_float_copy_option_switches_by_rows(tmp_path):
    make_checkpoint(tmp_path, "mistral")
    llm = LLM(str(tmp_path), dtype="float32", quantization="int8", quantization_float_above=2)
    model = llm.engine.core.runner.model
    lin = model.layers[0].mlp.down_proj
    assert lin.float_weight is not None and lin.max_rows == 2
    x = torch.randn(3, lin.in_features)
    assert torch.equal(lin(x), F.linear(x, lin.float_weight))
    assert not torch.equal(lin(x[:2]), F.linear(x[:2], lin.float_weight))
    lean = LLM(str(tmp_path), dtype="float32", quantization="int8")
    assert weight_bytes(lean.engine.core.runner.model) < weight_bytes(model)
    p = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    assert len(llm.generate([[1, 2, 3]], p)[0].outputs[0].token_ids) == 6
    with pytest.raises(ValueError, match="quantization_float_above"):
        EngineConfig(quantization="int8", quantization_float_above=-1)
