"""The tokenizer the engine and server use: a `tokenizers.Tokenizer` plus what
transformers keeps beside it (BOS/EOS ids, whether to add BOS, the chat template).

Chat prompts: the rendered template already contains every special token the
model wants (BOS included where the template writes it), so encode it with
`add_special_tokens=False`, as transformers' `apply_chat_template(tokenize=True)`
does. `encode` never doubles a BOS the text already starts with anyway.

Long texts are encoded and decoded through the backend's batch calls, which
release the GIL (the single calls hold it for the whole call: a 4 MB prompt held
every other thread for 2.5 s), so several threads tokenize in parallel. `max_token_chars`
bounds how much text one token can stand for, so a server can refuse a prompt
that cannot fit its context before paying for tokenizing it.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

ChatTemplate = str | Mapping[str, str]
# Up to this many characters (or ids) the single calls, which keep the GIL: a release and
# re-acquire per call would cost more than the call (the detokenizer decodes every step).
_SMALL = 2048


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
        if len(text) <= _SMALL:
            ids = self.backend.encode(text, add_special_tokens=False).ids
        else:
            ids = self.backend.encode_batch([text], add_special_tokens=False)[0].ids
        if add_special_tokens and self.add_bos and (not ids or ids[0] != self.bos_token_id):
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = list(ids)
        if len(ids) <= _SMALL:
            return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return self.backend.decode_batch([ids], skip_special_tokens=skip_special_tokens)[0]

    @cached_property
    def _char_bound(self) -> tuple[int, str] | None:
        """(most input characters one token stands for, characters that vanish), or None.

        A vocabulary entry's stored form is never shorter than the text it covers: byte-level
        BPE stores one character per byte, SentencePiece (Metaspace) one per character, byte
        fallback `<0xNN>` six for one byte, added tokens their literal content. That fails where
        text can vanish or fuse into one token: a normalizer or pre-tokenizer that drops or
        collapses characters, or a model that fuses unknown text into one unk (WordPiece,
        WordLevel, Unigram or BPE without byte fallback): then None (no character bound; the
        prompt is refused by its token count). NFC/NFKC compose at most 4 code points into one.
        A byte-level vocabulary missing some ASCII control bytes (SmolLM2 lacks 0x13) drops
        those characters: they are not counted (`countable_chars`)."""
        factor = _shrink_factor(self.backend.normalizer)
        vanishing = _vanishing_chars(self.backend) if factor is not None else None
        if factor is None or vanishing is None:
            return None
        longest = max(map(len, self.backend.get_vocab(with_added_tokens=True)), default=1)
        return max(1, longest) * factor, vanishing

    @property
    def max_token_chars(self) -> int | None:
        """The most input characters one token can stand for; None when no sound bound exists."""
        bound = self._char_bound
        return None if bound is None else bound[0]

    def countable_chars(self, text: str) -> int:
        """Characters of `text` that cannot vanish in tokenizing (tens of ms for 4 MB: call it
        only for a text already longer than the bound)."""
        bound = self._char_bound
        vanishing = bound[1] if bound is not None else ""
        return len(text) - sum(text.count(c) for c in vanishing)

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
    @property
    def supports_tools(self) -> bool:
        """Whether the chat template renders `tools` (a `tool_use` template, or one that reads the
        `tools` variable); a template that does not would silently drop them."""
        if "tool_use" in self.chat_templates:
            return True
        source = self.chat_template
        return source is not None and _reads_tools(source)

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


# Normalizers that never make text shorter (character counts kept or grown).
_NON_SHRINKING = frozenset({"NFD", "NFKD", "Lowercase", "Prepend", "ByteLevel"})
_COMPOSING = frozenset({"NFC", "NFKC"})
# Canonical composition folds a base and its marks into one code point (Greek: omega, two
# accents and iota subscript); 4 input characters per normalized one covers every composition.
_COMPOSE_FACTOR = 4
# Pre-tokenizers that split text without dropping any of it (Split unless it removes matches).
_KEEPING_PRE = frozenset({"ByteLevel", "Metaspace", "Digits", "Punctuation", "UnicodeScripts", "Split"})


def _spec(component: Any) -> dict[str, Any] | None:
    try:
        spec = json.loads(component.__getstate__())
    except (AttributeError, TypeError, ValueError):
        return None
    return spec if isinstance(spec, dict) else None


def _parts(spec: dict[str, Any], key: str) -> list[dict[str, Any]]:
    return list(spec.get(key, [])) if spec.get("type") == "Sequence" else [spec]


def _replace_keeps_length(part: dict[str, Any]) -> bool:
    """A `Replace` normalizer of a literal string by one at least as long (SentencePiece's
    " " -> "\u2581"): no text vanishes. A regex pattern may match anything: not known to keep."""
    pattern = part.get("pattern")
    literal = pattern.get("String") if isinstance(pattern, dict) else None
    content = part.get("content")
    return isinstance(literal, str) and isinstance(content, str) and 0 < len(literal) <= len(content)


def _shrink_factor(normalizer: Any) -> int | None:
    """How many input characters one normalized character may come from (None: unbounded)."""
    if normalizer is None:
        return 1
    spec = _spec(normalizer)
    if spec is None:
        return None
    factor = 1
    for part in _parts(spec, "normalizers"):
        kind = part.get("type")
        if kind == "Replace" and _replace_keeps_length(part):
            continue
        if kind in _COMPOSING:
            factor = _COMPOSE_FACTOR
        elif kind not in _NON_SHRINKING:
            return None  # strip, collapse, drop: any length may vanish
    return factor


def _vanishing_chars(backend: tokenizers.Tokenizer) -> str | None:
    """The characters tokenizing drops ("" for none), or None when text can vanish or fuse
    into one token without bound."""
    if any(t.lstrip or t.rstrip for t in backend.get_added_tokens_decoder().values()):
        return None  # such a token swallows all the whitespace beside it
    if backend.pre_tokenizer is not None:
        spec = _spec(backend.pre_tokenizer)
        if spec is None:
            return None
        for part in _parts(spec, "pretokenizers"):
            if part.get("type") not in _KEEPING_PRE or str(part.get("behavior", "")).lower() == "removed":
                return None
    model = _spec(backend.model)
    if model is None:
        return None
    if model.get("byte_fallback"):  # unknown characters become <0xNN> byte tokens, when all 256 exist
        vocab = backend.get_vocab(with_added_tokens=False)
        if all(f"<0x{b:02X}>" in vocab for b in range(256)):
            return ""
    if model.get("type") != "BPE":
        return None  # WordPiece, WordLevel, Unigram: unknown text fuses into one unk
    if model.get("unk_token") is None:  # unknown characters are dropped
        return _byte_level_missing(backend)
    return None if model.get("fuse_unk") else ""


def _byte_chars() -> dict[int, str]:
    """Byte-level BPE's alphabet: printable Latin-1 bytes stand for themselves, the others
    take the code points from 256 on, in byte order."""
    kept = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    out = {b: chr(b) for b in kept}
    for n, b in enumerate(b for b in range(256) if b not in out):
        out[b] = chr(256 + n)
    return out


# Bytes no UTF-8 text contains: a vocabulary may lack them at no cost.
_NEVER_UTF8 = frozenset({0xC0, 0xC1, *range(0xF5, 0x100)})


def _byte_level_missing(backend: tokenizers.Tokenizer) -> str | None:
    """Byte-level BPE: the ASCII characters whose byte the vocabulary lacks (dropped whole);
    None when it is not byte-level, or lacks a continuation byte (then a longer character could
    vanish whole; one that keeps its continuation bytes keeps a stored character per input one)."""
    spec = _spec(backend.pre_tokenizer) if backend.pre_tokenizer is not None else None
    if spec is None or not any(p.get("type") == "ByteLevel" for p in _parts(spec, "pretokenizers")):
        return None
    vocab = backend.get_vocab(with_added_tokens=False)
    missing = [b for b, c in _byte_chars().items() if c not in vocab and b not in _NEVER_UTF8]
    if any(0x80 <= b <= 0xBF for b in missing):
        return None
    return "".join(chr(b) for b in missing if b < 0x80)


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
def _reads_tools(source: str) -> bool:
    env = ImmutableSandboxedEnvironment(extensions=[jinja2.ext.loopcontrols])
    try:
        return "tools" in jinja2.meta.find_undeclared_variables(env.parse(source))
    except jinja2.TemplateError:
        return False


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
