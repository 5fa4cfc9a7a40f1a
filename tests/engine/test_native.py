"""Native CPU kernels (engine/native): GGUF block layouts, the block matmuls, the head, the
fused decode step against the PyTorch model on the same tables, and the build's fallbacks."""
from __future__ import annotations

import logging
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from lockgate import LLM, SamplingParams
from lockgate.engine.config import EngineConfig
from lockgate.engine.native import blocks, build
from lockgate.engine.native.linear import BlockEmbedding, BlockLinear
from lockgate.engine.quant import gguf_blocks
from tests.engine.tiny_models import make_checkpoint

pytestmark = pytest.mark.skipif(build.load() is None, reason="no C compiler for the native kernels")


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0])
@pytest.mark.parametrize("k", [64, 576, 1536])  # 2, 18 (a short last group) and 48 blocks per row
def test_gguf_blocks_repack_losslessly(qtype, k):
    """The file's blocks, regrouped for the kernels, hold exactly the weights gguf dequantizes."""
    w = np.random.default_rng(k).standard_normal((24, k)).astype(np.float32) * 0.1 + 0.02
    raw = gguf.quants.quantize(w, qtype)
    ref = gguf.quants.dequantize(raw, qtype).reshape(24, k)
    groups = gguf_blocks.decode(qtype.name, raw, (24, k))
    if qtype == Q.Q8_0:
        table, wtype = blocks.q8_0_from_groups(groups), blocks.Q8_0
    else:
        table, wtype = blocks.q4_1_from_groups(groups), blocks.Q4_1
    assert table.dtype == torch.uint8 and table.shape == (24, k // 32 * blocks.BYTES[wtype])
    np.testing.assert_array_equal(blocks.dequantize(table, wtype, k).numpy(), ref)


@pytest.mark.parametrize("wtype", [blocks.Q4_1, blocks.Q8_0])
def test_float_quantization_error_is_within_half_a_step(wtype):
    w = torch.randn(16, 128) * torch.linspace(0.01, 3.0, 128)  # blocks of very different scale
    table = (blocks.q4_1_from_float if wtype == blocks.Q4_1 else blocks.q8_0_from_float)(w)
    deq = blocks.dequantize(table, wtype, 128)
    g = w.reshape(16, 4, 32)
    step = (g.amax(-1) - g.amin(-1)) / 15 if wtype == blocks.Q4_1 else g.abs().amax(-1) / 127
    err = (deq - w).abs().reshape(16, 4, 32)
    assert torch.all(err <= step[..., None] * 0.5 + 2e-3 * g.abs().amax(-1, keepdim=True))


def block_linear_case(wtype: int, rows: int) -> tuple[BlockLinear, torch.Tensor, torch.Tensor]:
    """A random 200 x 576 BlockLinear (with bias), `rows` random inputs and the float product with
    the weights it stores."""
    torch.manual_seed(rows)
    k, n = 576, 200
    w, b = torch.randn(n, k) * 0.05, torch.randn(n)
    table = (blocks.q4_1_from_float if wtype == blocks.Q4_1 else blocks.q8_0_from_float)(w)
    lin = BlockLinear(table, wtype, k, n, bias=b)
    x = torch.randn(rows, k)
    return lin, x, torch.nn.functional.linear(x, lin.dequantized(), b)


@pytest.mark.parametrize("wtype", [blocks.Q4_1, blocks.Q8_0])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 64, 130])
def test_block_linear_multiplies_by_its_weights(wtype, rows):
    """Activations are quantized to int8 per 32 values (as llama.cpp does): the product with the
    stored weights is within that rounding, for every row count the 4-row tiles and the 64-row
    passes over the weights split into."""
    lin, x, ref = block_linear_case(wtype, rows)
    y = lin(x)
    assert y.shape == (rows, 200) and y.dtype == torch.float32
    assert (y - ref).abs().max() < 0.02 * ref.abs().max()
    # Each row's result does not depend on which rows share its step.
    assert torch.equal(lin(x[-1:]), y[-1:])
    assert lin(x.bfloat16()).dtype == torch.bfloat16  # the output comes back in the input's dtype


@pytest.mark.parametrize("rank", [True, False])
def test_block_embedding_rows_and_exact_top_logits(rank):
    torch.manual_seed(0)
    vocab, hidden = 1000, 64
    table = blocks.q8_0_from_float(torch.randn(vocab, hidden))
    emb = BlockEmbedding(table, blocks.Q8_0, hidden, torch.float32, rank=rank)
    assert (emb.rank_table is not None) == rank
    deq = emb.dequantized()
    ids = torch.tensor([[0, 7], [999, 7]])
    assert torch.equal(emb(ids), deq[ids])
    with pytest.raises(IndexError, match="token id out of range"):
        emb(torch.tensor([vocab]))
    hidden_states = torch.randn(3, hidden) * 4
    logits = emb.logits(hidden_states)
    ref = hidden_states @ deq.t()
    assert logits.shape == (3, vocab) and logits.dtype == torch.float32
    assert torch.equal(logits.argmax(-1), ref.argmax(-1))
    top = ref.topk(10, dim=-1).indices  # the leading logits are exact float32 products
    assert (logits.gather(1, top) - ref.gather(1, top)).abs().max() < 1e-4
    # The rest: as the ranking kernel computed them (4-bit weights with rank, else 8-bit).
    assert (logits - ref).abs().max() < (0.15 if rank else 0.02) * ref.abs().max()


@pytest.mark.parametrize("arch", ["llama3.1", "qwen2", "qwen3"])  # rope scaling, qkv bias, q/k norm
@pytest.mark.parametrize("method", ["int4", "int8"])
def test_fused_decode_matches_the_pytorch_model_on_the_same_tables(tmp_path: Path, arch: str, method: str):
    """Steps through the fused native call (prefills, decodes, batched) give the tokens and
    logprobs of the PyTorch model running the same block tables one matmul at a time."""
    make_checkpoint(tmp_path, arch)
    # 70 tokens: 5 KV blocks; 80 in all, more than one 64-row pass of the native matmuls.
    prompts = [[5, 17, 99, 3, 42, 7], [200, 1, 2, 3], list(range(30, 100))]
    p = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=3)
    llm = LLM(str(tmp_path), dtype="float32", quantization=method, quantization_kernels="native", block_size=16)
    runner = llm.engine.core.runner
    assert runner.kernels == "native" and runner.native is not None
    calls = []
    real = runner.native_step

    def spy(batch):
        out = real(batch)
        calls.append((batch.total_tokens, out is not None))
        return out

    runner.native_step = spy
    fused = llm.generate(prompts, p)
    assert (80, True) in calls  # the three prompts' prefill, in one native call
    assert (3, True) in calls  # batched decode steps too
    # A prompt sharing the first 32 tokens of one above: its prefill starts after the cached prefix.
    shared = [list(range(30, 62)) + [7, 8, 9]]
    fused_shared = llm.generate(shared, p)
    assert calls[-10][0] < 35  # the chunk after the cached blocks, not the whole prompt
    runner.native = None  # the same model, one PyTorch op at a time
    plain = llm.generate(prompts, p)
    plain_shared = llm.generate(shared, p)
    diffs = []
    for a, b in zip(fused + fused_shared, plain + plain_shared):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            diffs += [abs(lp.logprob - lb[tok].logprob) for tok, lp in la.items()]
    # The two paths sum in different orders; most logprobs agree to float rounding (1e-6). A
    # last-bit difference can move one activation across an int8 rounding step, which moves that
    # sequence's later logprobs by up to ~0.02 (its KV differs from there): allowed for a few.
    diffs.sort()
    assert diffs[len(diffs) // 2] < 1e-4 and diffs[-1] < 0.05, diffs[-5:]
    s = llm.engine.stats()
    assert s.num_free_blocks == s.num_total_blocks  # nothing leaked


def test_decoder_refuses_out_of_range_input(tmp_path: Path):
    make_checkpoint(tmp_path, "llama3.1")
    llm = LLM(str(tmp_path), dtype="float32", quantization="int4")
    dec = llm.engine.core.runner.native
    one = np.array([0])
    table = np.zeros((1, 1), dtype=np.int64)
    with pytest.raises(ValueError, match="out of range"):
        dec(np.array([10**9]), one, one, table, np.array([1]))  # token id past the vocabulary
    with pytest.raises(ValueError, match="out of range"):
        dec(np.array([3]), np.array([2**40]), one, table, np.array([2**40 + 1]))  # position past the table
    with pytest.raises(ValueError, match="out of range"):
        dec(np.array([3]), one, one, table, np.array([5]))  # context length != position + 1


def test_torch_kernels_remain_selectable(tmp_path: Path):
    make_checkpoint(tmp_path, "mistral")
    llm = LLM(str(tmp_path), dtype="float32", quantization="int4", quantization_kernels="torch")
    runner = llm.engine.core.runner
    assert runner.kernels == "torch" and runner.native is None
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 5
    with pytest.raises(ValueError, match="quantization_kernels must be 'auto', 'native' or 'torch'"):
        EngineConfig(quantization="int4", quantization_kernels="cuda")


def test_float_copy_keeps_the_pytorch_decode_path(tmp_path: Path):
    make_checkpoint(tmp_path, "mistral")
    llm = LLM(str(tmp_path), dtype="float32", quantization="int8", quantization_float_above=2)
    assert llm.engine.core.runner.native is None  # steps above 2 rows must reach the float copy


def test_a_failed_build_falls_back_with_a_reason(tmp_path: Path, monkeypatch, caplog):
    monkeypatch.setenv("LOCKGATE_NATIVE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    with caplog.at_level(logging.WARNING):
        assert build.load.__wrapped__() is None
    assert "could not be built" in caplog.text
    assert not list(tmp_path.glob("*.so"))  # no half-written library left for the next start
    monkeypatch.setenv("CC", "no-such-compiler-here")
    assert build.load.__wrapped__() is None
    monkeypatch.setenv("LOCKGATE_NATIVE", "0")
    assert build.load.__wrapped__() is None


def test_the_library_builds_once_into_its_cache(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("LOCKGATE_NATIVE_CACHE", str(tmp_path))
    lib = build.load.__wrapped__()
    assert lib is not None and lib.lg_abi() == build.ABI
    built = list(tmp_path.glob("lockgate_cpu_*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    assert build.load.__wrapped__() is not None
    assert built[0].stat().st_mtime_ns == mtime  # found in the cache, not rebuilt
