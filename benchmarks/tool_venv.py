"""A peer tool (lm-eval, guidellm) in its own virtual environment under a cache directory.

Shared by `lm_eval_client.py` and `guidellm_peer.py`. The tool never enters lockgate's
own environment (their pins would fight ours). torch is installed first with an exact
pin, so pip takes the CPU wheel that lies on this machine's disk: a looser spec (the
tools' bare `torch` requirement) would pull a multi-GB CUDA build. Every command is
printed before it runs, so a user can run them by hand.

    ~/.cache/lockgate/tools/<name>/            (or $LOCKGATE_TOOLS_DIR/<name>)
        bin/...                                the venv
        lockgate-tool.json                     what was installed, when, how long it took
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

TORCH = "torch==2.13.0"  # the CPU wheel on disk here; lockgate's own pin


def tools_dir() -> Path:
    base = os.environ.get("LOCKGATE_TOOLS_DIR")
    if base:
        return Path(base).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "lockgate" / "tools"


def _run(cmd: list[str]) -> None:
    print("+ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True)


def dir_size_mb(path: Path) -> float:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            p = Path(root) / f
            if not p.is_symlink():
                total += p.stat().st_size
    return total / 1e6


def ensure_tool(name: str, packages: list[str], probe: str, venv: Path | None = None, *,
                torch_first: bool = True) -> Path:
    """The venv holding `packages` (installed if its marker is missing or names other packages);
    `probe` is the console script that must exist in it. Returns the venv's bin/ directory.

    `torch_first`: install the pinned torch before the tool (a tool that requires torch). Without
    it torch is not installed, and the pin still holds as a constraint (`-c`): should any
    dependency want torch after all, it gets the CPU wheel, never a CUDA build."""
    venv = venv or tools_dir() / name
    marker = venv / "lockgate-tool.json"
    want = [TORCH, *packages] if torch_first else packages
    if marker.is_file() and (venv / "bin" / probe).exists():
        info = json.loads(marker.read_text())
        if info.get("packages") == want:
            print(f"{name}: using {venv} (installed {info['installed_at']}, {info['install_seconds']} s, "
                  f"{info['size_mb']} MB)", flush=True)
            return venv / "bin"
    if venv.exists():
        if not marker.is_file() and any(venv.iterdir()):
            raise RuntimeError(f"{venv} exists and was not made by this script: give an empty or new directory")
        shutil.rmtree(venv)  # ours, from an older or interrupted install
    how = "torch first, pinned to the CPU wheel" if torch_first else f"no torch; {TORCH} as a constraint"
    print(f"{name}: installing into {venv} (the commands below; {how})", flush=True)
    t0 = time.monotonic()
    _run([sys.executable, "-m", "venv", str(venv)])
    marker.write_text(json.dumps({"packages": None, "installing": want}) + "\n")  # ours, should this stop half-way
    constraints = venv / "lockgate-constraints.txt"
    constraints.write_text(TORCH + "\n")
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check", "-c", str(constraints)]
    if torch_first:
        _run([*pip, TORCH])
    _run([*pip, *packages])
    if not (venv / "bin" / probe).exists():
        raise RuntimeError(f"{name}: {probe} missing from {venv / 'bin'} after the install")
    seconds = round(time.monotonic() - t0, 1)
    info = {"packages": want, "installed_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "install_seconds": seconds,
            "size_mb": round(dir_size_mb(venv))}
    marker.write_text(json.dumps(info, indent=2) + "\n")
    print(f"{name}: installed in {seconds} s, {info['size_mb']} MB", flush=True)
    return venv / "bin"
