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
# LOCKGATE_NATIVE_ISA=avx2: build without the VNNI dot products even where the CPU has them (the
# forced fallback, to compare against or to rule them out); unset or "native": what the CPU has.
ISA_FLAGS = {"native": [], "avx2": ["-mno-avx512vnni", "-mno-avxvnni"]}
ISA_NAMES = {0: "portable C (no AVX2/F16C/FMA, several times slower)", 1: "AVX2",
             2: "AVX2 + AVX512-VNNI", 3: "AVX2 + AVX-VNNI"}


def flags() -> list[str]:
    isa = os.environ.get("LOCKGATE_NATIVE_ISA", "native") or "native"
    if isa not in ISA_FLAGS:
        raise ValueError(f"LOCKGATE_NATIVE_ISA must be one of {', '.join(ISA_FLAGS)}, got {isa!r}")
    return [*FLAGS, *ISA_FLAGS[isa]]


def isa_name(lib: ctypes.CDLL) -> str:
    """What the loaded kernels were built for: the start-up log and the benchmarks say it."""
    return ISA_NAMES.get(lib.lg_isa(), "unknown")


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


def library_path(cc: str) -> Path:
    key = hashlib.sha256(SOURCE.read_bytes() + cc.encode() + " ".join(flags()).encode()
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
    log.info("native CPU kernels loaded from %s (%s)", path, isa_name(lib))
    return lib


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


def set_activation_bits(bits: int) -> None:
    """The native kernels' activation codes: 8 or 16 bits (`quantization_activations`). A process
    setting (one library): the runner sets it before each step, so offline LLMs may differ."""
    lib = load()
    if lib is not None and lib.lg_activation_bits() != bits and lib.lg_set_activation_bits(bits) != 0:
        raise ValueError(f"activation bits must be 8 or 16, got {bits}")
