"""AMX-INT8 tile matmuls (csrc/amx.h). This machine may have no AMX: the `amx-emulated` build runs
the same code with the tile instructions done in C, so everything but the instructions is tested
here (the tile layouts, the packing, the per-block scales, partial tiles, the switch and its
self-check); a CPU that reports AMX gets the real tiles (test_native_isa.py)."""
from __future__ import annotations

import ctypes
import logging
from pathlib import Path
from typing import Iterator

import pytest
import torch

from lockgate import LLM, SamplingParams
from lockgate.engine.native import blocks, build
from tests.engine.tiny_models import make_checkpoint

pytestmark = pytest.mark.skipif(build.load() is None or not build.load().lg_has_avx2(),
                                reason="the AMX matmuls need the AVX2 kernels")


@pytest.fixture(scope="module")
def emulated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ctypes.CDLL]:
    """The emulated build, loaded as the process's kernels (so models built here use it); the
    native build comes back after the module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOCKGATE_NATIVE_ISA", "amx-emulated")
        mp.setenv("LOCKGATE_NATIVE_CACHE", str(tmp_path_factory.mktemp("amx")))
        build.load.cache_clear()
        lib = build.load()
        yield lib
    build.load.cache_clear()
    assert build.load().lg_amx() != 2


def _gemm(lib: ctypes.CDLL, x: torch.Tensor, table: torch.Tensor, wtype: int, n: int,
          bias: torch.Tensor | None) -> torch.Tensor:
    y = torch.empty(x.shape[0], n)
    assert lib.lg_gemm(x.data_ptr(), x.shape[0], x.shape[1], table.data_ptr(), wtype, n,
                       None if bias is None else bias.data_ptr(), y.data_ptr()) == 0
    return y


def test_the_emulated_build_reports_its_tiles(emulated: ctypes.CDLL) -> None:
    assert emulated.lg_amx() == 2 and emulated.lg_amx_on() == 1  # the self-check passed
    assert build.isa_name(emulated) == "AVX2 + AMX-INT8 (tiles emulated in C: a test build)"


# Rows: one tile exactly, one row past it, a partial third tile; widths: one block pair, a short
# last group (576 = 18 blocks), more blocks than one chunk of stored sums (2,048 = 64 blocks);
# weight rows: one stripe, a partial second stripe.
@pytest.mark.parametrize("wtype", [blocks.Q4_1, blocks.Q8_0])
@pytest.mark.parametrize("m,k,n", [(16, 64, 16), (17, 576, 40), (40, 2048, 24), (64, 576, 96)])
def test_tile_matmuls_give_the_avx2_answers(emulated: ctypes.CDLL, wtype: int, m: int, k: int, n: int) -> None:
    gen = torch.Generator().manual_seed(m * k + n)
    w = torch.randn(n, k, generator=gen) * 0.05
    table = (blocks.q4_1_from_float if wtype == blocks.Q4_1 else blocks.q8_0_from_float)(w)
    x = torch.randn(m, k, generator=gen)
    bias = torch.randn(n, generator=gen)
    emulated.lg_set_amx(0)
    calls = emulated.lg_amx_calls()
    want = _gemm(emulated, x, table, wtype, n, bias)
    assert emulated.lg_amx_calls() == calls  # off: the AVX2 kernels ran
    emulated.lg_set_amx(1)
    got = _gemm(emulated, x, table, wtype, n, bias)
    assert emulated.lg_amx_calls() == calls + 1  # on: the tiles ran
    # The same int32 block sums, scaled and summed in another order: float rounding apart.
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    # And both are the product with the stored weights, to the activations' int8 rounding.
    ref = x @ blocks.dequantize(table, wtype, k).T + bias
    assert (got - ref).abs().max() <= 0.02 * ref.abs().max()


def test_few_rows_stay_on_the_avx2_kernels(emulated: ctypes.CDLL) -> None:
    table = blocks.q4_1_from_float(torch.randn(32, 64) * 0.05)
    calls = emulated.lg_amx_calls()
    _gemm(emulated, torch.randn(15, 64), table, blocks.Q4_1, 32, None)  # under one tile of rows
    assert emulated.lg_amx_calls() == calls


def test_a_model_decodes_the_same_on_the_tiles(emulated: ctypes.CDLL, tmp_path: Path) -> None:
    """Prefill and batched decode steps of 16+ rows through lg_decode on the tiles give the tokens
    and logprobs of the AVX2 kernels on the same model."""
    make_checkpoint(tmp_path, "qwen2")  # with a QKV bias
    llm = LLM(str(tmp_path), dtype="float32", quantization="int4", quantization_kernels="native", block_size=16)
    assert llm.engine.core.runner.native is not None
    prompts = [[(7 * i + j) % 250 + 1 for j in range(3 + i % 4)] for i in range(17)]  # 17 rows a decode step
    p = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=2)
    calls = emulated.lg_amx_calls()
    tiles = llm.generate(prompts, p)
    assert emulated.lg_amx_calls() > calls
    emulated.lg_set_amx(0)
    try:
        plain = llm.generate(prompts, p)
    finally:
        emulated.lg_set_amx(1)
    diffs = []
    for a, b in zip(tiles, plain):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            # The sampled token is in both; a near tie may swap the runner-up.
            diffs += [abs(lp.logprob - lb[tok].logprob) for tok, lp in la.items() if tok in lb]
    diffs.sort()  # as the fused-decode test: float rounding, a rare int8 rounding step apart
    assert diffs[len(diffs) // 2] < 1e-4 and diffs[-1] < 0.05, diffs[-5:]


def test_speculation_keeps_rows_off_the_tiles(emulated: ctypes.CDLL, tmp_path: Path) -> None:
    """A speculating engine needs each row computed alike whatever the step's size (greedy output is
    the same with and without speculation): a step of 16+ rows on the tiles sums in another order
    than a smaller one on AVX2, so its steps stay off the tiles; an engine beside it keeps them."""
    make_checkpoint(tmp_path, "llama3.1")
    spec = LLM(str(tmp_path), dtype="float32", quantization="int4", quantization_kernels="native",
               speculative_config={"method": "ngram", "num_speculative_tokens": 2, "policy": "always"})
    assert "AMX tiles off: speculation" in spec.engine.core.runner.describe(None)
    plain = LLM(str(tmp_path), dtype="float32", quantization="int4", quantization_kernels="native")
    prompts = [[(5 * i + j) % 200 + 1 for j in range(4)] * 2 for i in range(17)]  # repeats: proposals
    p = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    calls = emulated.lg_amx_calls()
    spec.generate(prompts, p)
    assert emulated.lg_amx_calls() == calls
    plain.generate(prompts, p)
    assert emulated.lg_amx_calls() > calls  # the setting follows each engine's steps
    calls = emulated.lg_amx_calls()
    spec.generate(prompts, p)
    assert emulated.lg_amx_calls() == calls


def test_a_disagreeing_tile_path_is_switched_off(emulated: ctypes.CDLL, caplog: pytest.LogCaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The load-time self-check: tiles that give other answers than the AVX2 kernels (an unseen CPU
    or kernel) are not used, and the log and the ISA name say why."""
    real = emulated.lg_gemm

    def wrong(x, m, k, table, wtype, n, bias, y):  # a corrupted tile result
        rc = real(x, m, k, table, wtype, n, bias, y)
        if emulated.lg_amx_on():
            ctypes.c_float.from_address(y).value += 1.0
        return rc

    monkeypatch.setattr(emulated, "lg_gemm", wrong)
    try:
        with caplog.at_level(logging.WARNING):
            assert build.switch_amx_on(emulated) is False
        assert emulated.lg_amx_on() == 0
        assert "AMX-INT8 tiles off (the self-check's Q4_1 matmul differed" in caplog.text
        assert "AMX-INT8 built but off: the self-check's Q4_1 matmul differed" in build.isa_name(emulated)
        monkeypatch.setattr(emulated, "lg_gemm", real)
        monkeypatch.setenv("LOCKGATE_NATIVE_AMX", "0")
        assert build.switch_amx_on(emulated) is False
        assert build.isa_name(emulated).endswith("(AMX-INT8 built but off: LOCKGATE_NATIVE_AMX=0)")
    finally:
        monkeypatch.setattr(emulated, "lg_gemm", real)
        monkeypatch.delenv("LOCKGATE_NATIVE_AMX")
        assert build.switch_amx_on(emulated) is True
    assert build.isa_name(emulated).endswith("(tiles emulated in C: a test build)")


def test_the_real_tile_build_compiles(tmp_path: Path) -> None:
    """No CI machine has AMX: the hardware branch (intrinsics, tile config, the Linux grant) must
    still compile, and contain the tile dot products, for a CPU that has it."""
    import shutil
    import subprocess

    cc, objdump = build._compiler(), shutil.which("objdump")
    if cc is None or objdump is None:
        pytest.skip("no compiler or objdump")
    out = tmp_path / "amx.so"
    flags = [f for f in build.FLAGS if f not in ("-O3", "-march=native")]
    r = subprocess.run([cc, "-O1", "-march=sapphirerapids", *flags, str(build.SOURCE), "-o", str(out), "-lm"],
                       capture_output=True, text=True)
    if "sapphirerapids" in r.stderr and r.returncode:
        pytest.skip(f"this compiler does not know Sapphire Rapids: {r.stderr[:200]}")
    assert r.returncode == 0, r.stderr
    asm = subprocess.run([objdump, "-d", str(out)], capture_output=True, text=True, check=True).stdout
    assert "tdpbusd" in asm and "tdpbssd" in asm and "ldtilecfg" in asm
