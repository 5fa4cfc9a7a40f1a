"""The native kernels' instruction set: chosen from what the CPU reports (VNNI dot products and AMX
tiles where it has them), reported, and a forced AVX2 build (LOCKGATE_NATIVE_ISA=avx2) that gives the same
answers bit for bit (VNNI's u8 x s8 sums never saturate here, so they are the AVX2 pair's sums)."""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from lockgate.engine.native import blocks, build

pytestmark = pytest.mark.skipif(build.load() is None, reason="no C compiler for the native kernels")

def _cpu_flags() -> set[str]:
    try:
        line = next(ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(line.split(":", 1)[1].split())


def test_the_kernels_use_what_the_cpu_has() -> None:
    """A CPU with VNNI must get the VNNI build (a silent fallback to AVX2 fails here)."""
    if os.environ.get("LOCKGATE_NATIVE_ISA", "native") != "native":
        pytest.skip("an ISA is forced")
    f = _cpu_flags()
    if {"avx512_vnni", "avx512vl"} <= f:
        want = 2
    elif "avx_vnni" in f:
        want = 3
    elif {"avx2", "fma", "f16c"} <= f:
        want = 1
    else:
        want = 0
    lib = build.load()
    assert lib.lg_isa() == want, build.isa_name(lib)
    # A CPU with AMX-INT8 gets the tiles, switched on (Linux granted them, the self-check passed).
    amx = want > 0 and {"amx_tile", "amx_int8"} <= f
    assert lib.lg_amx() == (1 if amx else 0)
    assert lib.lg_amx_on() == (1 if amx else 0), build.isa_name(lib)
    assert build.isa_name(lib) == build.ISA_NAMES[want] + (" + AMX-INT8 tiles" if amx else "")


def _products(lib: ctypes.CDLL) -> np.ndarray:
    """Both weight types' block matmul of 7 rows, through `lib` (one build of the kernels)."""
    torch.manual_seed(0)
    out = []
    for wtype in (blocks.Q4_1, blocks.Q8_0):
        w = torch.randn(96, 576) * 0.05
        table = (blocks.q4_1_from_float if wtype == blocks.Q4_1 else blocks.q8_0_from_float)(w)
        x = torch.randn(7, 576)
        y = torch.empty(7, 96)
        assert lib.lg_gemm(x.data_ptr(), 7, 576, table.data_ptr(), wtype, 96, None, y.data_ptr()) == 0
        out.append(y.numpy().ravel())
    return np.concatenate(out)


def test_a_forced_avx2_build_gives_the_same_answers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    native = build.load()
    monkeypatch.setenv("LOCKGATE_NATIVE_ISA", "avx2")
    monkeypatch.setenv("LOCKGATE_NATIVE_CACHE", str(tmp_path))
    cc = build._compiler()
    path = build.library_path(cc)
    build._build(cc, path)
    forced = ctypes.CDLL(str(path))
    build._declare(forced)
    assert forced.lg_isa() in (0, 1) and forced.lg_amx() == 0  # never VNNI or AMX when AVX2 is forced
    np.testing.assert_array_equal(_products(native), _products(forced))  # bit for bit, whichever ran


def test_an_unknown_isa_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCKGATE_NATIVE_ISA", "avx1024")
    with pytest.raises(ValueError, match="LOCKGATE_NATIVE_ISA must be one of native, avx2, amx-emulated, got 'avx1024'"):
        build.flags()
