"""16-bit activation codes for the native block matmuls (`quantization_activations="int16"`)."""
from __future__ import annotations

import pytest
import torch

from lockgate import LLM, SamplingParams
from lockgate.engine.config import EngineConfig
from lockgate.engine.native import blocks, build
from tests.engine.test_native import block_linear_case
from tests.engine.tiny_models import make_checkpoint

pytestmark = pytest.mark.skipif(build.load() is None, reason="no C compiler for the native kernels")


@pytest.fixture(autouse=True)
def _restore() -> None:
    yield
    build.set_activation_bits(8)


@pytest.mark.parametrize("wtype", [blocks.Q4_1, blocks.Q8_0])
@pytest.mark.parametrize("rows", [1, 3, 5, 130])
def test_int16_codes_cut_the_rounding_error_and_keep_rows_independent(wtype, rows):
    """Against the stored weights in float: int8 codes are within 2% of the largest output,
    int16 codes within 0.05%, for every row tiling; a row's result never depends on its step."""
    lin, x, ref = block_linear_case(wtype, rows)
    build.set_activation_bits(8)
    err8 = (lin(x) - ref).abs().max()
    build.set_activation_bits(16)
    y16 = lin(x)
    err16 = (y16 - ref).abs().max()
    assert err16 < 5e-4 * ref.abs().max() and err16 < err8 / 20
    assert torch.equal(lin(x[-1:]), y16[-1:])


def test_the_engine_option_reaches_the_kernels_and_bad_values_are_refused(tmp_path):
    make_checkpoint(tmp_path, "llama3.1")
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    outs = {}
    for acts in ("int8", "int16"):
        llm = LLM(str(tmp_path), quantization="int4", quantization_activations=acts, kv_cache_dtype="float32")
        outs[acts] = llm.generate(["hello world"], sp)[0].outputs[0]
        assert build.load().lg_activation_bits() == (16 if acts == "int16" else 8)  # set by the step
        assert f"{acts} activations" in llm.engine.core.runner.describe(None)
    assert len(outs["int8"].token_ids) == len(outs["int16"].token_ids) == 8
    with pytest.raises(ValueError, match="quantization_activations must be 'int8' or 'int16', got 'int4'"):
        EngineConfig(quantization_activations="int4")
