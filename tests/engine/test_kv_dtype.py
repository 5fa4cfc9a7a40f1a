"""The KV cache's element type (`kv_cache_dtype`): float16 and bfloat16 K/V on the fused native
path and the PyTorch path give the greedy tokens of a float32 cache on a tiny model, with
logprobs close; what "auto" picks; the block count a memory size buys; bad values refused."""
from __future__ import annotations

import ctypes
import platform
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lockgate import LLM, SamplingParams
from lockgate.cli import app as cli_app
from lockgate.engine.attention.torch_paged import to_cache
from lockgate.engine.config import EngineConfig
from lockgate.engine.core.fake_runner import FakeRunner
from lockgate.engine.core.runner import resolve_kv_dtype
from lockgate.engine.loader import load_checkpoint
from lockgate.engine.native import build
from lockgate.engine.native.decoder import KV_TYPES
from lockgate.lifecycle.spec import VersionSpec, engine_options, validate
from tests.engine.tiny_models import make_checkpoint

native = pytest.mark.skipif(build.load() is None, reason="no C compiler for the native kernels")

# 70 tokens: 5 KV blocks of 16, so attention crosses blocks; the short ones decode as a batch.
PROMPTS = [[5, 17, 99, 3, 42, 7], [200, 1, 2, 3], list(range(30, 100))]
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=3)
# How far logprobs may move against a float32 cache. Rounding K/V moves each attention score by
# about |q||k| times the type's relative rounding (float16 2^-11, bfloat16 2^-8) and the output
# by as much of |v|. On the PyTorch path (float activations) that is all: measured on this model
# median 1.1e-4 / max 4.3e-4 (float16), 8.4e-4 / 4.0e-3 (bfloat16), 8x apart as the rounding is;
# the bounds are about ten times the maxima. On the native path the int8 activations turn any
# perturbation into whole rounding steps of the values it moves across one (the effect
# tests/engine/test_native.py allows between the two paths, up to 0.05): measured median
# 4.7e-3 / max 3.9e-2 (float16), 6.2e-3 / 1.6e-2 at p90 (bfloat16). A misread cache row, scale or
# type moves logprobs by 0.1-1 and changes tokens where nothing was close.
TOL = {"torch": {"float16": 5e-3, "bfloat16": 3e-2}, "native": {"float16": 0.1, "bfloat16": 0.1}}
TIE = {"torch": 5e-3, "native": 0.05}  # a top-2 gap this small is a tie at that path's noise
MEMORY_GB = 2**-7  # 8 MiB: 1,024 blocks of the tiny model in float32


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("qwen2")  # qkv bias: K rows with an offset, as real models have
    make_checkpoint(path, "qwen2")
    return str(path)


def _llm(ckpt: str, **options: object) -> LLM:
    return LLM(ckpt, kv_cache_memory_gb=MEMORY_GB, block_size=16, **options)


def _run(llm: LLM, prompts: list[list[int]] = PROMPTS) -> tuple[list[list[int]], list[dict]]:
    outs = llm.generate(prompts, GREEDY)
    return [o.outputs[0].token_ids for o in outs], [o.outputs[0].logprobs for o in outs]


def assert_same_greedy(ours: tuple[list, list], ref: tuple[list, list], path: str, kv: str) -> None:
    """The tokens of `ref` (a float32 cache), except past a near-tie of ref's (either token is a
    correct greedy pick there, and the continuations may then differ), and the logprobs of every
    position up to there within the path's tolerance."""
    diffs, positions = [], 0
    for toks, ref_toks, lps, ref_lps in zip(ours[0], ref[0], ours[1], ref[1]):
        assert len(toks) == len(ref_toks)
        for i, (a, b) in enumerate(zip(toks, ref_toks)):
            if a != b:
                top = sorted((lp.logprob for lp in ref_lps[i].values()), reverse=True)
                assert top[0] - top[1] < TIE[path], f"token {i}: {a} != {b} (gap {top[0] - top[1]:.2e})"
                break
            positions += 1
            diffs += [abs(lps[i][t].logprob - ref_lps[i][t].logprob) for t in lps[i].keys() & ref_lps[i].keys()]
    assert positions >= sum(map(len, ref[0])) // 2, "a tie too early: too few positions compared"
    assert max(diffs) < TOL[path][kv], sorted(diffs)[-5:]


# ---- choosing the type ---------------------------------------------------------------------

def test_auto_is_16_bit_unless_float32_is_asked_for():
    assert resolve_kv_dtype("auto", "auto", torch.float32) == torch.float16  # a float32 model on CPU
    assert resolve_kv_dtype("auto", "auto", torch.bfloat16) == torch.bfloat16  # the model's own 16 bits
    assert resolve_kv_dtype("auto", "float16", torch.float16) == torch.float16
    assert resolve_kv_dtype("auto", "float32", torch.float32) == torch.float32  # float32 end to end
    for name, dtype in (("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        assert resolve_kv_dtype(name, "auto", torch.bfloat16) == dtype


@pytest.mark.parametrize("bad", ["fp8", "int8", "", "FLOAT16", "fp8_e4m3"])
def test_bad_values_are_refused_naming_the_field_and_the_choices(bad):
    message = f"kv_cache_dtype must be one of auto, float32, bfloat16, float16; got {bad!r}"
    with pytest.raises(ValueError) as e:
        EngineConfig(kv_cache_dtype=bad)
    assert str(e.value) == message
    with pytest.raises(ValueError) as e:
        LLM(kv_cache_dtype=bad)  # refused before anything loads
    assert str(e.value) == message


def test_serve_exits_2_with_the_message_before_loading(tmp_path: Path):
    r = CliRunner().invoke(cli_app, ["serve", "--port", "0", "--data-dir", str(tmp_path / "data"),
                                     "--kv-cache-dtype", "fp8"])
    assert r.exit_code == 2, r.output
    assert "kv_cache_dtype must be one of auto, float32, bfloat16, float16; got 'fp8'" in r.output
    assert not (tmp_path / "data").exists()  # refused before the store was opened


def test_a_model_version_may_set_it():
    base = EngineConfig(load_format="fake")
    spec = VersionSpec(name="smol", engine=engine_options({"kv_cache_dtype": "bfloat16"}))
    assert validate(spec, base).kv_cache_dtype == "bfloat16"
    for bad in ("fp8", "x" * 10**6, 16):
        with pytest.raises(ValueError, match="kv_cache_dtype") as e:
            engine_options({"kv_cache_dtype": bad})
        assert len(str(e.value)) < 600  # never the client's 1 MB echoed back


def test_16_bit_doubles_the_blocks_of_the_same_memory(ckpt: str):
    loaded = load_checkpoint(ckpt)
    fake = {kv: FakeRunner(EngineConfig(load_format="fake", kv_cache_memory_gb=MEMORY_GB, kv_cache_dtype=kv),
                           loaded, 1024).num_blocks for kv in ("auto", "float32", "float16", "bfloat16")}
    assert fake["auto"] == fake["float16"] == fake["bfloat16"] == 2 * fake["float32"] == 2048
    explicit = EngineConfig(load_format="fake", kv_cache_memory_gb=MEMORY_GB, dtype="float32")
    assert FakeRunner(explicit, loaded, 1024).num_blocks == fake["float32"]
    # The real runner sizes its pool the same way, and allocates it in the type.
    for kv in ("float32", "float16"):
        runner = _llm(ckpt, dtype="float32", kv_cache_dtype=kv).engine.core.runner
        assert runner.num_blocks == fake[kv]
        assert all(t.dtype == getattr(torch, kv) for pair in runner.kv_caches for t in pair)


def test_auto_resolves_to_16_bit_on_cpu(ckpt: str):
    runner = _llm(ckpt).engine.core.runner  # dtype auto: float32 here, bfloat16 with AVX512-BF16
    assert runner.kv_dtype in (torch.float16, torch.bfloat16)
    assert runner.kv_caches[0][0].dtype == runner.kv_dtype


# ---- the PyTorch path ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def torch_f32(ckpt: str) -> tuple[list[list[int]], list]:
    return _run(_llm(ckpt, dtype="float32", kv_cache_dtype="float32"))


@pytest.mark.parametrize("kv", ["float16", "bfloat16"])
def test_pytorch_path_16_bit_gives_float32_tokens(ckpt: str, torch_f32, kv: str):
    llm = _llm(ckpt, dtype="float32", kv_cache_dtype=kv)
    assert llm.engine.core.runner.native is None and llm.engine.core.runner.kv_dtype == getattr(torch, kv)
    assert_same_greedy(_run(llm), torch_f32, "torch", kv)


def test_float16_saturates_instead_of_overflowing():
    x = torch.tensor([1e6, -1e6, 65504.0, 65519.0, 65520.0, float("inf"), 1.0])
    y = to_cache(x, torch.float16)
    assert y.tolist() == [65504.0, -65504.0, 65504.0, 65504.0, 65504.0, 65504.0, 1.0]
    assert to_cache(x, torch.float32) is x


# ---- the native path ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def native_f32(ckpt: str) -> tuple[list[list[int]], list]:
    llm = _llm(ckpt, dtype="float32", quantization="int4", quantization_kernels="native", kv_cache_dtype="float32")
    assert llm.engine.core.runner.native is not None
    return _run(llm)


@native
@pytest.mark.parametrize("kv", ["float16", "bfloat16"])
def test_native_path_16_bit_gives_float32_tokens(ckpt: str, native_f32, kv: str):
    llm = _llm(ckpt, dtype="float32", quantization="int4", quantization_kernels="native", kv_cache_dtype=kv)
    runner = llm.engine.core.runner
    assert runner.native is not None, "a 16-bit cache must keep the fused path"
    calls = []
    real = runner.native_step
    runner.native_step = lambda batch: calls.append(batch.total_tokens) or real(batch)
    fused = _run(llm)
    assert 80 in calls and 3 in calls  # the prefill and the batched decodes went through lg_decode
    assert_same_greedy(fused, native_f32, "native", kv)
    # The PyTorch path reads the same 16-bit cache the same way: the fused path's tokens, logprobs
    # within the two paths' usual difference (tests/engine/test_native.py).
    runner.native = None
    assert_same_greedy(_run(llm), fused, "native", kv)


@native
def test_preemption_and_prefix_reuse_with_a_16_bit_cache(ckpt: str):
    """Recomputed (preempted) and cached (prefix) K/V in float16 give the tokens of a roomy pool."""
    rng = np.random.default_rng(0)
    shared = rng.integers(0, 256, 40).tolist()
    prompts = [shared + rng.integers(0, 256, n).tolist() for n in (3, 17, 33)]
    prompts += [rng.integers(0, 256, n).tolist() for n in (1, 5, 16, 29, 70)]
    common = dict(dtype="float32", quantization="int4", kv_cache_dtype="float16")
    roomy, _ = _run(_llm(ckpt, **common), prompts)
    tight = LLM(ckpt, num_kv_blocks=14, block_size=8, **common)  # 112 slots for 8 requests of up to 86 tokens
    for _ in range(2):  # the second pass reads the shared prefix back from the cache
        tokens, _ = _run(tight, prompts)
        assert tokens == roomy
    stats = tight.engine.stats()
    assert stats.num_preemptions > 0 and stats.prefix_cache_hits > 0
    assert stats.num_free_blocks == stats.num_total_blocks


# ---- the C conversions, AVX2 and portable ---------------------------------------------------

@pytest.fixture(scope="module")
def portable(tmp_path_factory) -> ctypes.CDLL:
    """The kernels built without -march=native: the scalar code a CPU without AVX2/F16C runs."""
    cc = build._compiler()
    out = tmp_path_factory.mktemp("portable") / "lockgate_portable.so"
    flags = [f for f in build.FLAGS if not f.startswith("-march")] + ["-O1"]
    if platform.machine() in ("x86_64", "AMD64"):  # a compiler whose default target has AVX2 too
        flags += ["-mno-avx2", "-mno-f16c", "-mno-fma"]
    subprocess.run([cc, *flags, str(build.SOURCE), "-o", str(out), "-lm"], check=True, timeout=300)
    lib = ctypes.CDLL(str(out))
    build._declare(lib)
    assert not lib.lg_has_avx2() and lib.lg_abi() == build.ABI
    return lib


def _special_values() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([1e-9, 3e-8, 1e-6, 6e-5, 1e-3, 1.0, 100.0, 3e4, 7e4, 1e6])
    x = torch.randn(len(scales), 101, generator=g) * scales[:, None]  # 101: a scalar tail after 8-wide steps
    edges = [0.0, -0.0, 2**-25, 2**-25 * 1.0001, 2**-24, 2**-14, 2**-14 * 0.99, 65504.0, 65519.99, 65520.0,
             -65520.0, float("inf"), float("-inf"), float("nan"), 3.4e38, 1.0 + 2**-11, 1.0 + 3 * 2**-11]
    return torch.cat([x.reshape(-1), torch.tensor(edges)]).contiguous()


@native
@pytest.mark.parametrize("kv", ["float16", "bfloat16"])
@pytest.mark.parametrize("which", ["avx2", "portable"])
def test_c_rounds_as_pytorch_does(kv: str, which: str, portable: ctypes.CDLL):
    lib = build.load() if which == "avx2" else portable
    x = _special_values()
    dtype = getattr(torch, kv)
    out = torch.empty(x.shape, dtype=dtype)
    assert lib.lg_kv_write(out.data_ptr(), KV_TYPES[dtype], x.data_ptr(), x.numel()) == 0
    ref = to_cache(x, dtype)
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(out), nan)
    assert torch.equal(out[~nan].view(torch.int16), ref[~nan].view(torch.int16))  # bit for bit
    assert lib.lg_kv_write(out.data_ptr(), 3, x.data_ptr(), 1) == -3  # an unknown type is refused


@native
def test_portable_kernels_read_16_bit_caches_too(ckpt: str, portable: ctypes.CDLL, native_f32):
    """The scalar attention (no AVX2) over a float16 cache: the tokens of the AVX2 build."""
    llm = _llm(ckpt, dtype="float32", quantization="int4", quantization_kernels="native", kv_cache_dtype="float16")
    llm.engine.core.runner.native.lib = portable
    assert_same_greedy(_run(llm), native_f32, "native", "float16")
