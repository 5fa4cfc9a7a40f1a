"""The stored precision by default, and the fused native path whatever the float dtype.

`quantization="auto"` (the default) runs a GGUF whose projections are Q4_0/Q4_1 on its own
blocks (int4), a Q8_0 one on its blocks (int8, native kernels), anything else in float; `"none"`
is the float path. A quantized model on the
native kernels takes the fused `lg_decode` path with dtype auto, on a CPU with fast bf16 too
(simulated), and with an explicit bfloat16 dtype. Tiny written GGUF files (tests/engine/
test_loader_gguf.py's writer) keep each load well under a second.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from lockgate import LLM, SamplingParams
from lockgate.engine.config import EngineConfig
from lockgate.engine.core import runner as runner_mod
from lockgate.engine.loader import default_model_path, load_checkpoint
from lockgate.engine.loader.gguf import projection_types
from lockgate.engine.loader.gguf_header import read_gguf_header
from lockgate.engine.native import build
from lockgate.engine.quant.precision import resolve_kernels, resolve_quantization, stored_precision
from tests.engine.test_loader_gguf import tiny_tensors, write_gguf

# Shapes the native kernels take whole (inputs in pairs of 32-weight blocks).
DIMS = {"layers": 2, "hidden": 64, "inter": 128, "heads": 4, "kv_heads": 2, "head_dim": 16}
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
needs_native = pytest.mark.skipif(build.load() is None, reason="no C compiler for the native kernels")


def tiny_gguf(path: Path, qtype: Q) -> Path:
    tensors = tiny_tensors(DIMS, [qtype], bias=True, qk_norm=False, tied=True, rng=np.random.default_rng(1))
    tensors["token_embd.weight"] = (tensors["token_embd.weight"][0], Q.Q8_0)
    return write_gguf(path, "qwen2", DIMS, tensors)


def test_the_rule() -> None:
    assert stored_precision(["Q4_1"] * 7) == "int4" and stored_precision(["Q4_0"] * 5 + ["Q6_K"] * 2) == "int4"
    assert stored_precision(["Q8_0"] * 7) == "int8" and stored_precision(["F16"] * 7) is None
    assert stored_precision([]) is None and stored_precision(["Q4_K"] * 7) is None
    assert resolve_quantization("auto", "int4", "cpu") == "int4"
    assert resolve_quantization("auto", "int4", "cuda") is None  # the quantized kernels are CPU-only
    assert resolve_quantization("none", "int4", "cpu") is None
    assert resolve_quantization("auto", "int8", "cpu") == "int8"  # a Q8_0 file on its blocks (passed the gate)
    assert resolve_quantization("auto", "int8", "cpu", native=False) is None  # not re-rounded for PyTorch's kernel
    assert resolve_kernels("int8", "int8", "auto") == "native" and resolve_kernels("int8", "int8", "torch") == "torch"
    assert resolve_kernels("int8", None, "auto") == "auto"  # int8 of a float model: quantize_model picks (torch)
    assert resolve_kernels("int8", "int8", "auto", native=False) == "auto"
    assert resolve_quantization("auto", None, "cpu") is None
    assert resolve_quantization("int8", None, "cpu") == "int8" and resolve_quantization("int4", "int8", "cpu") == "int4"


def test_config_values() -> None:
    assert EngineConfig().quantization == "auto"
    assert EngineConfig(quantization=None).quantization == "auto"  # not set: as vLLM's None, the checkpoint's
    assert EngineConfig(quantization="none").quantization == "none"
    for bad in ("fp8", "INT4", "", 4):
        with pytest.raises(ValueError, match=r"quantization must be one of auto, none, int4, int8; got"):
            EngineConfig(quantization=bad)
    for bad in (0, -1, 2.5, True, "2"):
        with pytest.raises(ValueError, match="num_threads must be an integer >= 1"):
            EngineConfig(num_threads=bad)


def test_stored_precision_of_gguf_files(tmp_path: Path) -> None:
    header = read_gguf_header(default_model_path())
    assert set(projection_types(header.tensors)) == {"Q4_1"} and len(projection_types(header.tensors)) == 210
    assert load_checkpoint(None).stored_precision == "int4"
    for qtype, want in ((Q.Q4_0, "int4"), (Q.Q4_1, "int4"), (Q.Q8_0, "int8"), (Q.F16, None)):
        assert load_checkpoint(tiny_gguf(tmp_path / f"{qtype.name}.gguf", qtype)).stored_precision == want


def fused_steps(llm: LLM) -> list[bool]:
    """Generate once; for each step, whether the fused native call took it."""
    runner = llm.engine.core.runner
    real, taken = runner.native_step, []

    def spy(batch):  # noqa: ANN001
        out = real(batch)
        taken.append(out is not None)
        return out

    runner.native_step = spy
    llm.generate([[5, 6, 7, 8], [9, 10]], GREEDY)
    return taken if runner.native is not None else [False]


@needs_native
def test_auto_runs_a_4bit_file_on_its_blocks_and_none_dequantizes(tmp_path: Path, caplog) -> None:
    path = str(tiny_gguf(tmp_path / "q4.gguf", Q.Q4_0))
    with caplog.at_level("INFO", logger="lockgate.engine.core.runner"):
        llm = LLM(path)
    r = llm.engine.core.runner
    assert (r.quantization, r.kernels, r.dtype) == ("int4", "native", torch.float32)
    assert all(fused_steps(llm)), "a step of the default int4 model left the fused path"
    line = next(m for m in caplog.messages if m.startswith("precision "))
    assert "precision int4 (the stored precision, the checkpoint's own blocks); steps: fused native decode" in line
    assert "kernels: native " in line and f"{r.threads} threads" in line
    caplog.clear()
    with caplog.at_level("INFO", logger="lockgate.engine.core.runner"):
        plain = LLM(path, quantization="none")
    r = plain.engine.core.runner
    assert (r.quantization, r.kernels, r.native) == (None, "float", None)
    assert "precision none (float float32: quantization='none')" in caplog.text
    assert len(plain.generate([5, 6, 7], GREEDY)[0].outputs[0].token_ids) == 6
    q8 = LLM(str(tiny_gguf(tmp_path / "q8.gguf", Q.Q8_0)))
    r = q8.engine.core.runner
    assert (r.quantization, r.kernels) == ("int8", "native") and all(fused_steps(q8))  # its own Q8_0 blocks
    f16 = LLM(str(tiny_gguf(tmp_path / "f16.gguf", Q.F16)))
    assert f16.engine.core.runner.quantization is None  # a float file runs in float


@needs_native
def test_fused_path_whatever_the_float_dtype(tmp_path: Path, monkeypatch, caplog) -> None:
    """On a CPU with AVX512-BF16 (simulated) dtype auto is bfloat16 for float models, but a quantized
    one stays on the fused path; an explicit bfloat16 dtype keeps it there too (float32 copies of the
    norms). What cannot take the fused path (a float copy kept) says so, loudly."""
    monkeypatch.setattr(runner_mod, "cpu_has_fast_bf16", lambda: True)
    path = str(tiny_gguf(tmp_path / "q4.gguf", Q.Q4_1))
    assert LLM(path, quantization="none").engine.core.runner.dtype == torch.bfloat16  # the simulated machine
    auto = LLM(path)
    assert auto.engine.core.runner.dtype == torch.float32 and all(fused_steps(auto))
    bf16 = LLM(path, dtype="bfloat16")
    assert bf16.engine.core.runner.dtype == torch.bfloat16 and all(fused_steps(bf16))
    with caplog.at_level("WARNING", logger="lockgate.engine.core.runner"):
        copy = LLM(path, quantization_float_above=2)
    r = copy.engine.core.runner
    assert r.native is None and "not the fused decode: float copies kept" in r.path
    assert "int4 runs off the fused native decode path (float copies kept" in caplog.text
