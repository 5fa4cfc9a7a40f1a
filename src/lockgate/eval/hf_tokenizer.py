"""The served model's tokenizer as a Hugging Face tokenizer directory: `lockgate export-tokenizer`.

Client tools that count or split tokens themselves (lm-evaluation-harness's
`local-completions`, guidellm's synthetic prompts) load a tokenizer with
`transformers.AutoTokenizer.from_pretrained(DIR)`. A GGUF has none on disk: lockgate
rebuilds it from the file's metadata (`engine/loader/gguf_tokenizer.py`). This writes
that same tokenizer out, so the tool and the server split text identically:

- `tokenizer.json`: lockgate's `tokenizers` backend as it is (vocabulary, merges,
  pre-tokenizer, added and special tokens), with a post-processor that adds BOS exactly
  when lockgate's `Tokenizer.encode(text, add_special_tokens=True)` does;
- `tokenizer_config.json`: the fast tokenizer class, BOS/EOS/PAD/UNK, `add_bos_token`,
  no clean-up of spaces on decode (lockgate decodes without it), the context length;
- `special_tokens_map.json`, `chat_template.jinja` (+ `additional_chat_templates/` for
  named ones such as `tool_use`) and `generation_config.json` (every EOS id, so
  `Tokenizer.from_hf_dir(DIR)` reads the directory back to the same tokenizer).

One difference stays: lockgate never doubles a BOS that the text already starts with;
transformers adds one anyway (`add_bos_token` models only, and only for text that
spells the BOS token out).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tokenizers import processors

from lockgate.engine.tokenizer import Tokenizer

FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
         "generation_config.json")
_TEMPLATE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def write_hf_tokenizer(tok: Tokenizer, out_dir: str | Path, *, model_max_length: int | None = None,
                       name: str | None = None) -> Path:
    """Write `tok` as a Hugging Face tokenizer directory (created if missing; only the files
    above are written, over any older copies). Returns the directory."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)

    backend = tok.backend.__class__.from_str(tok.backend.to_str())  # a copy: the served one stays untouched
    backend.no_padding()
    backend.no_truncation()
    bos = tok.bos_token if tok.add_bos else None
    if bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tok.bos_token_id)])
    else:
        backend.post_processor = None
    backend.save(str(out / "tokenizer.json"))

    def text(token_id: int | None) -> str | None:
        return None if token_id is None else tok.backend.id_to_token(token_id)

    specials = {key: t for key, t in (("bos_token", text(tok.bos_token_id)), ("eos_token", text(tok.eos_token_id)),
                                      ("pad_token", text(tok.pad_token_id)), ("unk_token", text(tok.unk_token_id)))
                if t}
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": tok.add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(model_max_length) if model_max_length else 1_000_000_000_000_000_019_884_624_838_656,
        "added_tokens_decoder": {
            str(i): {"content": t.content, "special": t.special, "normalized": t.normalized, "lstrip": t.lstrip,
                     "rstrip": t.rstrip, "single_word": t.single_word}
            for i, t in sorted(backend.get_added_tokens_decoder().items())},
    }
    if name:
        config["name_or_path"] = name
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", specials)
    gen = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_ids}
    _write_json(out / "generation_config.json", {k: v for k, v in gen.items() if v is not None and v != []})

    extra_dir = out / "additional_chat_templates"
    for old in [out / "chat_template.jinja", out / "chat_template.json"] + sorted(extra_dir.glob("*.jinja")):
        old.unlink(missing_ok=True)
    default = tok.chat_template
    if default is not None:
        (out / "chat_template.jinja").write_text(default, encoding="utf-8")
        named = {k: v for k, v in tok.chat_templates.items() if k != "default" and v != default}
        for key, source in named.items():
            if not _TEMPLATE_NAME.match(key):
                raise ValueError(f"chat template name {key!r} cannot be a file name")
            extra_dir.mkdir(exist_ok=True)
            (extra_dir / f"{key}.jinja").write_text(source, encoding="utf-8")
    return out


def export_tokenizer(model: str | None, out_dir: str | Path) -> Path:
    """The tokenizer lockgate serves `model` with (None or "default": the embedded model; a GGUF
    file; a Hugging Face directory) as a Hugging Face tokenizer directory. No weights are read."""
    from lockgate.engine.loader import default_model_path, load_checkpoint

    path = None if model in (None, "", "default") else model
    ckpt = load_checkpoint(path)
    source = Path(path).expanduser() if path is not None else default_model_path()
    return write_hf_tokenizer(ckpt.tokenizer, out_dir, model_max_length=ckpt.config.max_position_embeddings,
                              name=source.stem)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
