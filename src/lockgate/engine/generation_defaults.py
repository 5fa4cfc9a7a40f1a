"""Sampling defaults from the model: what a request that leaves a sampling field out gets.

As vLLM's `--generation-config`: `auto` (the default) takes temperature, top_p, top_k, min_p,
repetition_penalty and `max_new_tokens` (as max_tokens) from the checkpoint's
generation_config.json, or from a GGUF's `general.sampling.*` metadata; `vllm` ignores them
(temperature 1.0, top_p 1.0, ..., as before); a directory (or a generation_config.json file) reads
that file instead. The embedded default model gets the settings its model card recommends.

The loaders put the checkpoint's values in `ModelConfig.sampling_defaults`; `resolve` applies the
option. The API process fills requests with them (server/params.py), the offline `LLM` too
(`LLM.get_default_sampling_params`). Values are checked as SamplingParams checks a request's, so a
bad file fails at start-up naming the file and the field, never a client's request.
"""
from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

FILE_NAME = "generation_config.json"
MAX_FILE_BYTES = 1 << 20  # a generation config is a few hundred bytes; anything huge is not one

# generation_config.json key -> SamplingParams field (vLLM reads the same keys).
HF_KEYS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
           "repetition_penalty": "repetition_penalty", "max_new_tokens": "max_tokens"}
# GGUF metadata (gguf.Keys.General.SAMPLING_*) -> SamplingParams field.
GGUF_KEYS = {"general.sampling.temp": "temperature", "general.sampling.top_p": "top_p",
             "general.sampling.top_k": "top_k", "general.sampling.min_p": "min_p",
             "general.sampling.penalty_repeat": "repetition_penalty"}
INT_FIELDS = frozenset({"top_k", "max_tokens"})

# SmolLM2-135M-Instruct (the embedded default model): its GGUF carries no sampling metadata and its
# Hugging Face generation_config.json only token ids, but its model card's usage example generates
# with `temperature=0.2, top_p=0.9, do_sample=True`; at temperature 1.0 the 135M model rambles.
EMBEDDED = {"temperature": 0.2, "top_p": 0.9}
EMBEDDED_SOURCE = "the SmolLM2-135M-Instruct model card (the embedded default model)"


@dataclass(frozen=True, slots=True)
class GenerationDefaults:
    """The sampling fields a request gets when it leaves them out, and where they came from."""

    values: Mapping[str, float | int] = field(default_factory=dict)
    source: str = "none"

    def get(self, name: str, default: Any = None) -> Any:
        return self.values.get(name, default)

    def describe(self) -> str:
        """For the start-up log: `temperature=0.2, top_p=0.9 (from ...)`."""
        if not self.values:
            return f"none ({self.source})"
        shown = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.values.items())
        return f"{shown} (from {self.source})"


NONE = GenerationDefaults({}, "none")


def check_option(option: object) -> str:
    """`auto`, `vllm` or a path (checked for a readable file by `resolve`); ValueError otherwise."""
    if not isinstance(option, str) or not option.strip() or len(option) > 4096 or "\x00" in option:
        raise ValueError(f"generation_config must be 'auto', 'vllm' or a directory holding {FILE_NAME}, "
                         f"got {str(option)[:64]!r}")
    return option


def checked(values: Mapping[str, Any], where: str) -> dict[str, float | int]:
    """Known fields only, each valid as a request's value would be; ValueError naming `where` and the key."""
    from lockgate.engine.sampling_params import SamplingParams  # no torch: cheap

    out: dict[str, float | int] = {}
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{where}: {name} must be a number, got {value!r}")
        if name in INT_FIELDS:
            if value != int(value):
                raise ValueError(f"{where}: {name} must be an integer, got {value!r}")
            value = int(value)
        out[name] = value if name in INT_FIELDS else float(value)
    try:
        SamplingParams(**out)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    return out


def from_hf_file(path: Path) -> dict[str, float | int]:
    """The sampling fields of a generation_config.json ({} when there is no such file)."""
    if not path.is_file():
        return {}
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ValueError(f"{path}: larger than {MAX_FILE_BYTES} bytes; not a generation config")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a JSON object")
    return checked({HF_KEYS[k]: v for k, v in data.items() if k in HF_KEYS and v is not None}, str(path))


def from_gguf_metadata(fields: Mapping[str, Any], where: str) -> dict[str, float | int]:
    """A GGUF's `general.sampling.*` values (plain values, as gguf_header reads them)."""
    return checked({name: fields[key] for key, name in GGUF_KEYS.items() if fields.get(key) is not None}, where)


@cache
def _from_path(option: str) -> dict[str, float | int]:
    p = Path(option).expanduser()
    target = p / FILE_NAME if p.is_dir() else p
    if not target.is_file():
        raise ValueError(f"generation_config {option!r}: no {FILE_NAME} there (expected 'auto', 'vllm', "
                         f"or a directory holding {FILE_NAME})")
    return from_hf_file(target)


def resolve(option: str, checkpoint: Mapping[str, float | int] | None,
            source: str = "the model's generation config") -> GenerationDefaults:
    """What requests get under `option`: the checkpoint's values (`source` says where they were read),
    none (`vllm`), or those of the file at a path (read once per process)."""
    if option == "vllm":
        return GenerationDefaults({}, "--generation-config vllm")
    if option == "auto":
        return GenerationDefaults(dict(checkpoint or {}), source if checkpoint else f"none in {source}")
    return GenerationDefaults(_from_path(option), option)


def checkpoint_source(model: str | None) -> str:
    """Where `auto` reads a model's defaults, for the log."""
    from lockgate.engine.loader.default_model import ModelNotFoundError, default_model_path

    p = Path(model).expanduser() if model is not None else None
    try:
        if p is None or p.resolve() == default_model_path().resolve():
            return EMBEDDED_SOURCE
    except ModelNotFoundError:
        pass
    if p.is_dir() and not (p / "config.json").is_file():
        return f"{model}'s GGUF metadata"
    return f"{model}/{FILE_NAME}" if p.is_dir() else f"{model}'s metadata"
