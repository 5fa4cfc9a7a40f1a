"""Compile and load the native CPU kernels (csrc/cpu_decode.c) once per machine.

The C source is built with the system C compiler for the CPU it runs on
(`-O3 -march=native -fopenmp`) into a cache directory keyed by the source, the
compiler and the CPU, then loaded with ctypes. A build takes a few seconds, once.
No compiler, a failed build or `LOCKGATE_NATIVE=0` leave `load()` returning None:
the quantized paths then run PyTorch's own int4/int8 kernels instead.

The library links the `libgomp.so.1` that PyTorch's CPU wheel already loaded, so
the kernels and PyTorch share one OpenMP thread pool.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "cpu_decode.c"
ABI = 8  # must match LG_ABI in the C source
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11", "-fno-math-errno"]
# LOCKGATE_NATIVE_ISA=avx2: build without the VNNI dot products and the AMX tiles even where the CPU
# has them (the forced fallback, to compare against or to rule them out); "amx-emulated": the AMX
# matmuls with the tile instructions done in C (csrc/amx.h), so a CPU without AMX tests that code;
# unset or "native": what the CPU has.
NO_AMX = ["-mno-amx-tile", "-mno-amx-int8"]
ISA_FLAGS = {"native": [], "avx2": ["-mno-avx512vnni", "-mno-avxvnni", *NO_AMX],
             "amx-emulated": ["-DLG_AMX_EMULATE", *NO_AMX]}
ISA_NAMES = {0: "portable C (no AVX2/F16C/FMA, several times slower)", 1: "AVX2",
             2: "AVX2 + AVX512-VNNI", 3: "AVX2 + AVX-VNNI"}
AMX_NAMES = {1: "AMX-INT8 tiles", 2: "AMX-INT8 (tiles emulated in C: a test build)"}
# Why a build with tiles runs without them (set by _switch_amx_on; shown with the ISA).
amx_off_reason: dict[str, str] = {}


def flags() -> list[str]:
    isa = os.environ.get("LOCKGATE_NATIVE_ISA", "native") or "native"
    if isa not in ISA_FLAGS:
        raise ValueError(f"LOCKGATE_NATIVE_ISA must be one of {', '.join(ISA_FLAGS)}, got {isa!r}")
    return [*FLAGS, *ISA_FLAGS[isa]]


def isa_name(lib: ctypes.CDLL) -> str:
    """What the loaded kernels were built for and run: the start-up log and the benchmarks say it."""
    name = ISA_NAMES.get(lib.lg_isa(), "unknown")
    kind = lib.lg_amx()
    if kind and lib.lg_amx_on():
        return f"{name} + {AMX_NAMES[kind]}"
    if kind:
        return f"{name} (AMX-INT8 built but off: {amx_off_reason.get(str(lib._name), 'switched off')})"
    return name


def cache_dir() -> Path:
    root = os.environ.get("LOCKGATE_NATIVE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "lockgate", "native")
    return Path(root)


def _cpu_key() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        line = next((ln for ln in info.splitlines() if ln.startswith(("flags", "Features"))), "")
        model = next((ln for ln in info.splitlines() if ln.startswith("model name")), "")
        return model + line
    except OSError:
        return platform.processor()


def _compiler() -> str | None:
    cc = os.environ.get("CC") or "cc"
    return shutil.which(cc)


def _sources() -> bytes:
    """Every file the build reads (cpu_decode.c includes the others)."""
    return b"".join(f.read_bytes() for f in sorted(SOURCE.parent.iterdir()) if f.suffix in (".c", ".h"))


def library_path(cc: str) -> Path:
    key = hashlib.sha256(_sources() + cc.encode() + " ".join(flags()).encode()
                         + _cpu_key().encode()).hexdigest()[:16]
    return cache_dir() / f"lockgate_cpu_{key}.so"


def _build(cc: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        subprocess.run([cc, *flags(), str(SOURCE), "-o", tmp, "-lm"], check=True, capture_output=True,
                       text=True, timeout=300)
        os.replace(tmp, out)  # atomic: concurrent builders race harmlessly
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def load() -> ctypes.CDLL | None:
    """The kernels, or None where they cannot be built (the reason is logged once)."""
    if os.environ.get("LOCKGATE_NATIVE", "1") == "0":
        return None
    import torch  # noqa: F401  (loads PyTorch's libgomp first, so the kernels share it)

    cc = _compiler()
    if cc is None:
        log.warning("no C compiler found: native CPU kernels disabled (set CC, or install gcc)")
        return None
    path = library_path(cc)
    try:
        if not path.exists():
            _build(cc, path)
        lib = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", "") or str(e)
        log.warning("native CPU kernels could not be built (%s): using PyTorch's kernels", detail.strip()[:500])
        return None
    if lib.lg_abi() != ABI:
        log.warning("native CPU kernels: ABI %s != %s; using PyTorch's kernels", lib.lg_abi(), ABI)
        return None
    _declare(lib)
    switch_amx_on(lib)
    log.info("native CPU kernels loaded from %s (%s)", path, isa_name(lib))
    return lib


def switch_amx_on(lib: ctypes.CDLL) -> bool:
    """A build with AMX tiles uses them only once Linux grants the tile state and a small matmul on
    the tiles agrees with the AVX2 kernels (a wrong answer from an unseen CPU or kernel must not
    reach a user): otherwise the AVX2 kernels run, and the reason is logged and shown with the ISA.
    LOCKGATE_NATIVE_AMX=0 keeps them off."""
    if not lib.lg_amx():
        return False
    reason = None
    if os.environ.get("LOCKGATE_NATIVE_AMX", "1") == "0":
        reason = "LOCKGATE_NATIVE_AMX=0"
    elif lib.lg_amx_init() != 0:
        reason = "Linux refused the tile state (arch_prctl ARCH_REQ_XCOMP_PERM; a kernel before 5.16?)"
    else:
        reason = amx_disagreement(lib)
    if reason is None:
        lib.lg_set_amx(1)
        return True
    lib.lg_set_amx(0)
    amx_off_reason[str(lib._name)] = reason
    log.warning("native CPU kernels: AMX-INT8 tiles off (%s); the AVX2 kernels run", reason)
    return False


def amx_disagreement(lib: ctypes.CDLL) -> str | None:
    """None when the tile matmuls give the AVX2 kernels' answers (to float rounding: the int32 block
    sums are the same integers, summed in another order) on both block types; else what differed."""
    import torch

    from lockgate.engine.native import blocks

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 576, generator=gen)  # three tiles of activation rows, the last partial
    for wtype, encode in ((blocks.Q4_1, blocks.q4_1_from_float), (blocks.Q8_0, blocks.q8_0_from_float)):
        table = encode(torch.randn(40, 576, generator=gen) * 0.05)
        got = {}
        for on in (0, 1):
            lib.lg_set_amx(on)
            calls = lib.lg_amx_calls()
            y = torch.empty(37, 40)
            if lib.lg_gemm(x.data_ptr(), 37, 576, table.data_ptr(), wtype, 40, None, y.data_ptr()):
                return "the self-check could not allocate memory"
            if on and lib.lg_amx_calls() == calls:
                return "the self-check's matmul did not reach the tiles"
            got[on] = y
        err = float((got[1] - got[0]).abs().max())
        if not err <= 1e-4 * float(got[0].abs().max()):  # NaN fails too
            return f"the self-check's {blocks.NAMES[wtype]} matmul differed from the AVX2 kernels' by {err:.3g}"
    return None


def _declare(lib: ctypes.CDLL) -> None:
    p, i = ctypes.c_void_p, ctypes.c_int
    lib.lg_gemm.argtypes = [p, i, i, p, i, i, p, p]
    lib.lg_gemm.restype = i
    lib.lg_rows.argtypes = [p, i, i, p, i, p]
    lib.lg_rows.restype = None
    lib.lg_logits.argtypes = [p, i, p, i, i, i, p, i, i, p]
    lib.lg_logits.restype = i
    lib.lg_decode.argtypes = [p, i, p, p, p, p, i, p, p]
    lib.lg_decode.restype = i
    lib.lg_kv_write.argtypes = [p, i, p, i]
    lib.lg_kv_write.restype = i
    lib.lg_has_avx2.restype = i
    lib.lg_isa.restype = i
    lib.lg_set_activation_bits.argtypes = [i]
    lib.lg_set_activation_bits.restype = i
    lib.lg_activation_bits.restype = i
    lib.lg_amx.restype = i
    lib.lg_amx_init.restype = i
    lib.lg_amx_on.restype = i
    lib.lg_amx_calls.restype = ctypes.c_long
    lib.lg_set_amx.argtypes = [i]
    lib.lg_set_amx.restype = i


def tiles_usable() -> bool:
    """Whether the loaded kernels have AMX tiles that load() switched on (an engine may still turn
    them off for its steps: set_tiles)."""
    lib = load()
    return lib is not None and bool(lib.lg_amx()) and str(lib._name) not in amx_off_reason


def set_tiles(on: bool) -> None:
    """AMX tiles for the steps that follow, where load() switched them on (a process setting, as the
    activation bits: the runner sets it before each step). Off for engines whose rows must compute
    alike in any batch: a step of 16+ rows on the tiles sums in another order than a smaller one."""
    if tiles_usable() and load().lg_amx_on() != on:
        load().lg_set_amx(1 if on else 0)


def set_activation_bits(bits: int) -> None:
    """The native kernels' activation codes: 8 or 16 bits (`quantization_activations`). A process
    setting (one library): the runner sets it before each step, so offline LLMs may differ."""
    lib = load()
    if lib is not None and lib.lg_activation_bits() != bits and lib.lg_set_activation_bits(bits) != 0:
        raise ValueError(f"activation bits must be 8 or 16, got {bits}")
