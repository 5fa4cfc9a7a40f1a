"""Checkpoint loading: one entry point, `load_checkpoint`, for every kind of model path.

    None               -> the embedded default model (SmolLM2-135M-Instruct Q4_1 GGUF)
    directory          -> Hugging Face checkpoint (config.json, *.safetensors, tokenizer.json)
    *.gguf             -> GGUF file (dequantized, tokenizer rebuilt from metadata)
    *.json / "dummy"   -> the config's architecture with random weights (benchmarks)

`weights()` yields `(hf_name, tensor)` lazily in Hugging Face naming, in the stored
float dtype (or float32 for quantized GGUF tensors); the model casts. It can be called
more than once.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lockgate.engine.config import ModelConfig
from lockgate.engine.generation_defaults import EMBEDDED as EMBEDDED_SAMPLING
from lockgate.engine.loader.default_model import INSTALL_HINT, ModelNotFoundError, default_model_path
from lockgate.engine.tokenizer import Tokenizer

if TYPE_CHECKING:  # torch is imported only when weights() runs: the API process and
    import torch  # fake-engine cores read config and tokenizer alone

__all__ = ["LoadedCheckpoint", "ModelNotFoundError", "default_model_path", "load_checkpoint", "INSTALL_HINT"]

ACCEPTED = (
    "a Hugging Face checkpoint directory (config.json + *.safetensors + tokenizer.json), "
    "a .gguf file, or a config .json (random weights)"
)


@dataclass(slots=True)
class LoadedCheckpoint:
    config: ModelConfig
    tokenizer: Tokenizer
    weights: Callable[[], Iterator[tuple[str, torch.Tensor]]]
    # GGUF only: the quantized tensors as stored (quant.gguf_blocks codes + scales), HF names.
    quantized: Callable[[], Iterator[tuple[str, Any]]] | None = None
    # The precision the projections are stored in ("int4": Q4_0/Q4_1 blocks, "int8": Q8_0, None:
    # float): what `quantization="auto"` runs (engine/quant/precision.py).
    stored_precision: str | None = None
    # GGUF only: HF name -> stored block type ("Q4_1", "Q8_0", ...) of the 2-D tensors the
    # quantized paths take as stored; their float copies need not be made (`weights(skip=...)`).
    stored_types: Callable[[], dict[str, str]] | None = None


def load_checkpoint(path: str | Path | None, load_format: str = "auto") -> LoadedCheckpoint:
    if load_format not in ("auto", "dummy"):
        raise ValueError(f"load_format must be 'auto' or 'dummy', got {load_format!r}")
    p = default_model_path() if path is None else Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"model path {str(path)!r} does not exist; expected {ACCEPTED}")
    if p.is_dir() and not (p / "config.json").is_file():
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:  # a directory holding just a GGUF file
            p = ggufs[0]
    if load_format == "dummy" or (p.is_file() and p.suffix.lower() == ".json"):
        from lockgate.engine.loader.dummy import load_dummy

        return LoadedCheckpoint(*load_dummy(p))
    if p.is_dir():
        from lockgate.engine.loader.hf import load_hf_dir

        return LoadedCheckpoint(*load_hf_dir(p))
    if p.suffix.lower() == ".gguf" or _has_gguf_magic(p):
        from lockgate.engine.loader.gguf import load_gguf

        ckpt = LoadedCheckpoint(*load_gguf(p))
        if path is None or _is_default_model(p):  # its GGUF holds no sampling settings: the card's
            ckpt.config.sampling_defaults = dict(EMBEDDED_SAMPLING)
        return ckpt
    raise ValueError(f"cannot load {str(p)!r}: expected {ACCEPTED}")


def _is_default_model(p: Path) -> bool:
    try:
        return p.resolve() == default_model_path().resolve()
    except ModelNotFoundError:
        return False


def _has_gguf_magic(p: Path) -> bool:
    try:
        with p.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False
