"""Predicted throughput of the native block matmuls on CPUs this machine is not: llvm-mca.

The machines lent so far are AVX2-only (AMD Zen 3), so the VNNI and AMX-INT8 kernels have never
run on hardware here. This compiles the kernels' own source for each target CPU (`-march=...`,
with `-DLG_MCA`, which marks their inner loop bodies: csrc/cpu_decode.c's MCA_BEGIN/MCA_END) and
lets llvm-mca's scheduling models count the cycles of each body at steady state:

- `q4_1_pair`: one Q4_1 block pair against four activation rows (8 block-rows), the AVX2 or VNNI
  kernel (dot_row with R = 4: what every step of 4+ rows runs);
- `amx_tiles` + 8 x `amx_scale`: one block for 16 weight rows x 16 activation rows (256 block-rows):
  the tile loads, the dot product and the store of the int32 sums, then their scales.

Cycles per block-row turn into a predicted output rate for the benchmark's 64-stream workload
(64-token prompts, 64 output tokens): each output token brings one prompt token and one output
token through the layers' blocks and one token through the ranking head's (7.5 M block-rows on the
default model), at a given clock and core count, with the measured non-matmul time per token of
this machine (attention, norms, sampling) added when given. A model, not a measurement: it assumes
the loop bodies run from L1 at their scheduled rate (memory stalls, frequency drops under AVX-512
or AMX and OpenMP overheads are not in it). Check it against this machine: its AVX2 figure for
znver3 next to the measured ns per block-row (`benchmarks/cpu_engine.py` prints the kernel bound).

    .venv/bin/python benchmarks/kernel_model.py [--ghz 2.45] [--cores 2] [--other-ms 0]

Needs gcc and llvm-mca (Debian's llvm package).
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from lockgate.engine.native import build  # noqa: E402

BLOCK_ROWS_PER_TOKEN = 7.5e6  # default model: 2 x 3.3 M layer blocks + 0.9 M ranking-head blocks
# (build flavour, -march, llvm-mca -mcpu): the AVX2 build where VNNI exists is the forced fallback.
TARGETS = [
    ("AVX2", "znver3", "znver3"),
    ("AVX2", "icelake-server", "icelake-server"),
    ("AVX512-VNNI (256-bit)", "icelake-server", "icelake-server"),
    ("AVX2", "sapphirerapids", "sapphirerapids"),
    ("AVX512-VNNI (256-bit)", "sapphirerapids", "sapphirerapids"),
    ("AMX-INT8", "sapphirerapids", "sapphirerapids"),
]


def regions(asm: str) -> dict[str, list[str]]:
    """Each marked body's instructions, by name and occurrence (inlining copies a body)."""
    out: dict[str, list[str]] = {}
    name, body, seen = None, [], {}
    for line in asm.splitlines():
        m = re.search(r"LLVM-MCA-(BEGIN|END) (\w+)", line)
        if m and m.group(1) == "BEGIN":
            name, body = m.group(2), []
        elif m and name is not None:
            seen[name] = seen.get(name, 0) + 1
            out[f"{name}#{seen[name]}"] = body
            name = None
        elif name is not None:
            s = line.strip()
            if s and not s.startswith(("#", ".")):
                body.append(s)
    return out


def cycles(body: list[str], mcpu: str) -> float:
    """llvm-mca's steady-state cycles per iteration of one body."""
    with tempfile.NamedTemporaryFile("w", suffix=".s", delete=False) as f:
        f.write("\n".join(body) + "\n")
    r = subprocess.run(["llvm-mca", f"-mcpu={mcpu}", "-iterations=500", f.name], capture_output=True, text=True)
    Path(f.name).unlink()
    if r.returncode:
        raise RuntimeError(r.stderr[:500])
    total = float(re.search(r"Total Cycles:\s+(\d+)", r.stdout).group(1))
    return total / 500


def count(body: list[str], op: str) -> int:
    return sum(1 for s in body if s.split()[0] == op)


def cycles_per_block_row(flavour: str, march: str, mcpu: str) -> float:
    extra = {"AVX2": ["-mno-avx512vnni", "-mno-avxvnni", *build.NO_AMX], "AVX512-VNNI (256-bit)": build.NO_AMX,
             "AMX-INT8": []}[flavour]
    flags = [f for f in build.FLAGS if f not in ("-march=native", "-shared", "-fPIC")]
    asm = subprocess.run(["gcc", *flags, f"-march={march}", *extra, "-DLG_MCA", "-S", "-o", "-", str(build.SOURCE)],
                         capture_output=True, text=True, check=True).stdout
    found = regions(asm)
    if flavour == "AMX-INT8":
        tiles = next(b for k, b in found.items() if k.startswith("amx_tiles"))
        # The Q4_1 scale body: the one with the offset term's FMAs (the most FMAs).
        scale = max((b for k, b in found.items() if k.startswith("amx_scale")), key=lambda b: count(b, "vfmadd231ps")
                    + count(b, "vfmadd132ps") + count(b, "vfmadd213ps"))
        return (cycles(tiles, mcpu) + 8 * cycles(scale, mcpu)) / 256
    dot = "vpdpbusd" if "VNNI" in flavour else "vpmaddubsw"
    # The 4-row body (dot_row with R = 4): the most dot-product instructions (8).
    body = max((b for k, b in found.items() if k.startswith("q4_1_pair")), key=lambda b: count(b, dot))
    if count(body, dot) != 8:
        raise RuntimeError(f"no 4-row Q4_1 body with {dot} for {march}")
    return cycles(body, mcpu) / 8


def measured_here(reps: int = 5) -> float:
    """This machine's ns per block-row (all cores) of the native build at 64 rows, over the default
    model's layer shapes (QKV, O, gate/up, down), best of `reps`."""
    import time

    import torch

    from lockgate.engine.native import blocks

    lib = build.load()
    torch.manual_seed(0)
    total_s, total_rows = 0.0, 0
    for k, n in ((576, 960), (576, 576), (576, 3072), (1536, 576)):
        table = blocks.q4_1_from_float(torch.randn(n, k) * 0.05)
        x, y = torch.randn(64, k), torch.empty(64, n)
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            for _ in range(10):
                lib.lg_gemm(x.data_ptr(), 64, k, table.data_ptr(), blocks.Q4_1, n, None, y.data_ptr())
            best = min(best, (time.perf_counter() - t) / 10)
        total_s += best
        total_rows += 64 * n * k // 32
    return total_s / total_rows * 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ghz", type=float, default=2.45, help="clock to turn cycles into time (this VM: 2.45)")
    ap.add_argument("--cores", type=int, default=2)
    ap.add_argument("--other-ms", type=float, default=0.0,
                    help="measured time per output token outside the matmuls, added to each prediction")
    args = ap.parse_args()
    for tool in ("gcc", "llvm-mca"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found (llvm-mca: Debian's llvm package)")
    lib = build.load()
    here_model = cycles_per_block_row("AVX2", "native", "native") / args.ghz / args.cores
    here = measured_here() if lib is not None else float("nan")
    slow = here / here_model  # what the model misses on this machine (memory, clock, threads)
    print(f"Q4_1 block matmuls, 4+ activation rows; {args.cores} cores at {args.ghz} GHz; "
          f"{BLOCK_ROWS_PER_TOKEN / 1e6:.1f} M block-rows per output token at 64 streams")
    print(f"this machine ({build.isa_name(lib) if lib else 'no native kernels'}): measured {here:.3f} ns per "
          f"block-row at 64 rows, modelled {here_model:.3f}: the model is {slow:.2f}x optimistic here; "
          f"'calibrated' columns scale by that")
    print("| kernels | built for | scheduled as | cycles per block-row | ns per block-row (all cores) "
          "| calibrated ns | predicted 64-stream tok/s, matmuls only (calibrated) |")
    print("|---|---|---|---|---|---|---|")
    for flavour, march, mcpu in TARGETS:
        c = cycles_per_block_row(flavour, march, mcpu)
        ns = c / args.ghz / args.cores
        rate = 1e3 / (BLOCK_ROWS_PER_TOKEN * ns * 1e-6 + args.other_ms)
        cal = 1e3 / (BLOCK_ROWS_PER_TOKEN * ns * slow * 1e-6 + args.other_ms)
        print(f"| {flavour} | -march={march} | {mcpu} | {c:.2f} | {ns:.3f} | {ns * slow:.3f} | {rate:.0f} ({cal:.0f}) |")


if __name__ == "__main__":
    main()
