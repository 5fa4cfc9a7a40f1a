"""The tokenizer the engine and server use: a `tokenizers.Tokenizer` plus what
transformers keeps beside it (BOS/EOS ids, whether to add BOS, the chat template).

Chat prompts: the rendered template already contains every special token the
model wants (BOS included where the template writes it), so encode it with
`add_special_tokens=False`, as transformers' `apply_chat_template(tokenize=True)`
does. `encode` never doubles a BOS the text already starts with anyway.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

ChatTemplate = str | Mapping[str, str]


class Tokenizer:
    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: Sequence[int],
        add_bos: bool,
        chat_template: ChatTemplate | None,
        pad_token_id: int | None = None,
        unk_token_id: int | None = None,
    ) -> None:
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids: list[int] = list(dict.fromkeys(int(e) for e in eos_token_ids))
        self.add_bos = bool(add_bos and bos_token_id is not None)
        self.pad_token_id = pad_token_id
        self.unk_token_id = unk_token_id
        # Named templates (transformers' list form); "default" is the one used without tools.
        if chat_template is None:
            self.chat_templates: dict[str, str] = {}
        elif isinstance(chat_template, str):
            self.chat_templates = {"default": chat_template}
        else:
            self.chat_templates = dict(chat_template)
        added = backend.get_added_tokens_decoder()
        self._special_ids = {i for i, tok in added.items() if tok.special}
        named = (bos_token_id, pad_token_id, unk_token_id, *self.eos_token_ids)
        self._special_ids |= {i for i in named if i is not None}
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)

    # ---- ids and text -------------------------------------------------------
    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def bos_token(self) -> str | None:
        return self._token(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return self._token(self.eos_token_id)

    @property
    def chat_template(self) -> str | None:
        return self.chat_templates.get("default") or next(iter(self.chat_templates.values()), None)

    def _token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # The backend's post-processor is bypassed: BOS handling is ours (`add_bos`), so
        # GGUF and HF tokenizers behave the same.
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos and (not ids or ids[0] != self.bos_token_id):
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        # Ids past the tokenizer's vocabulary (padded embeddings, random weights) map to "".
        return [self.backend.id_to_token(i) or "" for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def is_special(self, token_id: int) -> bool:
        # eos_token_ids may be extended after construction (config/generation_config union).
        return token_id in self._special_ids or token_id in self.eos_token_ids

    def __len__(self) -> int:
        return self.vocab_size

    # ---- chat ---------------------------------------------------------------
    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render `messages` the way transformers does (same Jinja settings and helpers)."""
        if not self.chat_templates:
            raise ValueError("model has no chat template")
        name = "tool_use" if tools and "tool_use" in self.chat_templates else "default"
        source = self.chat_templates.get(name) or self.chat_template
        assert source is not None
        variables = {
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            "pad_token": self._token(self.pad_token_id) or "",
            "unk_token": self._token(self.unk_token_id) or "",
            **kwargs,
            "messages": messages,
            "tools": tools,
            "add_generation_prompt": add_generation_prompt,
        }
        template = _compile(source)
        try:
            return template.render(**variables)
        except jinja2.TemplateError as e:  # includes raise_exception() and sandbox violations
            raise ValueError(f"chat template error: {e}") from e
        except (TypeError, KeyError, AttributeError, IndexError, ValueError) as e:
            raise ValueError(f"chat template error: {type(e).__name__}: {e}") from e

    # ---- construction -------------------------------------------------------
    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """tokenizer.json + tokenizer_config.json (+ config/generation_config for EOS ids)."""
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise ValueError(f"{path} has no tokenizer.json (only fast tokenizers are supported)")
        backend = tokenizers.Tokenizer.from_file(str(tok_file))
        tcfg = _read_json(path / "tokenizer_config.json")
        cfg = _read_json(path / "config.json")
        gen = _read_json(path / "generation_config.json")

        def tid(key: str) -> int | None:
            text = _token_text(tcfg.get(key))
            return backend.token_to_id(text) if text else None

        bos = tid("bos_token")
        if bos is None and isinstance(cfg.get("bos_token_id"), int):
            bos = cfg["bos_token_id"]
        eos: list[int] = []
        for src in (tid("eos_token"), cfg.get("eos_token_id"), gen.get("eos_token_id")):
            eos += src if isinstance(src, list) else ([src] if isinstance(src, int) else [])
        add_bos = tcfg.get("add_bos_token")
        if not isinstance(add_bos, bool):
            add_bos = _post_processor_adds(backend, bos)
        return cls(
            backend,
            bos_token_id=bos,
            eos_token_ids=eos,
            add_bos=add_bos,
            chat_template=_hf_chat_template(path, tcfg),
            pad_token_id=tid("pad_token"),
            unk_token_id=tid("unk_token"),
        )

    @classmethod
    def from_gguf_metadata(cls, fields: Any) -> Tokenizer:
        """From a `gguf.GGUFReader` or its `.fields` mapping (llama.cpp key names)."""
        from lockgate.engine.loader.gguf_tokenizer import tokenizer_from_gguf

        return tokenizer_from_gguf(getattr(fields, "fields", fields))


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from e
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    # tokenizer_config writes special tokens as a string or a serialized AddedToken dict.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def _post_processor_adds(backend: tokenizers.Tokenizer, bos: int | None) -> bool:
    if bos is None:
        return False
    with_special = backend.encode("a", add_special_tokens=True).ids[:1]
    return with_special == [bos] and backend.encode("a", add_special_tokens=False).ids[:1] != [bos]


def _hf_chat_template(path: Path, tcfg: dict[str, Any]) -> dict[str, str] | None:
    """transformers' places, newest first: chat_template.jinja (+ additional_chat_templates/),
    chat_template.json, then tokenizer_config.json's `chat_template` (string or named list)."""
    templates: dict[str, str] = {}
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        templates["default"] = jinja_file.read_text(encoding="utf-8")
        extra = path / "additional_chat_templates"
        if extra.is_dir():
            for f in sorted(extra.glob("*.jinja")):
                templates[f.stem] = f.read_text(encoding="utf-8")
        return templates
    value = _read_json(path / "chat_template.json").get("chat_template") or tcfg.get("chat_template")
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        templates = {t["name"]: t["template"] for t in value if isinstance(t, dict) and "name" in t and "template" in t}
    return templates or None


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Like transformers: no ASCII escaping and no HTML-safe escaping (jinja's default tojson does that).
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ValueError(f"chat template does not compile: {e}") from e
