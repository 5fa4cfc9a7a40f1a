"""Hugging Face checkpoint directories: config.json, *.safetensors (single or sharded), tokenizer files."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors import safe_open

from lockgate.engine.config import ModelConfig
from lockgate.engine.generation_defaults import FILE_NAME, from_hf_file
from lockgate.engine.loader.layout import check_tensors
from lockgate.engine.loader.progress import track
from lockgate.engine.tokenizer import Tokenizer

if TYPE_CHECKING:
    import torch

INDEX_FILE = "model.safetensors.index.json"


def read_config(path: Path) -> dict[str, Any]:
    cfg_file = path / "config.json" if path.is_dir() else path
    if not cfg_file.is_file():
        raise ValueError(f"{path} has no config.json; a Hugging Face checkpoint directory needs one")
    try:
        data = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {cfg_file}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{cfg_file} is not a JSON object")
    return data


def safetensors_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        files = [path / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{path}: shards listed in {INDEX_FILE} are missing: {missing[:3]}")
        return files
    files = sorted(path.glob("*.safetensors"))
    # Some repos ship Mistral's consolidated.safetensors next to model.safetensors: same weights twice.
    hf_style = [f for f in files if f.name.startswith("model")]
    return hf_style or files


def _skip(name: str, config: ModelConfig) -> bool:
    # Old checkpoints store RoPE buffers; tied models may still store a copy of the embedding.
    return name.endswith("rotary_emb.inv_freq") or (config.tie_word_embeddings and name == "lm_head.weight")


def load_hf_dir(path: Path) -> tuple[ModelConfig, Tokenizer, Any]:
    config = ModelConfig.from_hf(read_config(path))
    files = safetensors_files(path)
    if not files:
        raise ValueError(f"{path} has no *.safetensors weights (.bin/.pt checkpoints are not supported)")
    tokenizer = Tokenizer.from_hf_dir(path)
    # EOS: union of tokenizer_config, config.json and generation_config.json (Tokenizer.from_hf_dir).
    config.eos_token_ids = list(dict.fromkeys([*config.eos_token_ids, *tokenizer.eos_token_ids]))
    tokenizer.eos_token_ids = list(dict.fromkeys([*tokenizer.eos_token_ids, *config.eos_token_ids]))
    if config.bos_token_id is None:
        config.bos_token_id = tokenizer.bos_token_id
    config.sampling_defaults = from_hf_file(path / FILE_NAME)  # the model's own sampling defaults

    shapes: dict[str, tuple[int, ...]] = {}
    plan: list[tuple[Path, str]] = []
    for f in files:  # headers only: names and shapes without reading data
        # framework="numpy": "pt" imports torch on open, and only weights() needs tensors.
        with safe_open(str(f), framework="numpy") as h:
            for name in h.keys():
                shapes[name] = tuple(h.get_slice(name).get_shape())
                if not _skip(name, config):
                    plan.append((f, name))
    check_tensors(shapes, config, str(path))

    def weights() -> Iterator[tuple[str, torch.Tensor]]:
        # Stored dtype (bf16 usually); the model casts. One shard open at a time.
        handle, opened = None, None
        for f, name in track(plan, len(plan), f"loading {path.name}"):
            if f != opened:
                handle, opened = safe_open(str(f), framework="pt"), f
            yield name, handle.get_tensor(name)

    return config, tokenizer, weights
