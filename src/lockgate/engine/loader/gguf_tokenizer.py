"""Rebuild a Hugging Face `tokenizers.Tokenizer` from a GGUF file's `tokenizer.ggml.*` metadata.

The vocabulary and merges are in the file; the pre-tokenizer is not, only its llama.cpp
name (`tokenizer.ggml.pre`). Token ids drift from the original tokenizer's unless the
split matches, so each known name maps to the pre-tokenizer of the original tokenizer.json.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as Backend

from lockgate.engine.loader.gguf_meta import meta
from lockgate.engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# llama.cpp token types.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Names llama.cpp gives each pre-tokenizer family (see its llama-vocab.cpp).
LLAMA3_PRE = {"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3", "pixtral"}
QWEN2_PRE = {"qwen2", "deepseek-r1-qwen", "megrez"}
# StarCoder-style: every digit alone, then the GPT-2 split. SmolLM2's tokenizer.json is
# Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False, use_regex=True)].
DIGITS_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
GPT2_PRE = {"gpt-2", "gpt2", "default", ""}


def gpt2_byte_chars() -> list[str]:
    """GPT-2's printable stand-in for each byte 0..255 (byte-level vocabularies are spelled in these)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def byte_level_pre_tokenizer(pre: str) -> tuple[pre_tokenizers.PreTokenizer, normalizers.Normalizer | None, bool]:
    """(pre-tokenizer, normalizer, ignore_merges) of the original tokenizer.json for llama.cpp's `pre`."""
    if pre in DIGITS_PRE:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]), None, False
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if pre in LLAMA3_PRE:
        split = pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated")
        # Llama 3's BPE model has ignore_merges: a pre-token that is a whole vocab entry is taken as is.
        ignore = pre in {"llama3", "llama-v3", "llama-bpe"}
        return pre_tokenizers.Sequence([split, byte_level]), None, ignore
    if pre in QWEN2_PRE:  # Qwen2's tokenizer.json also NFC-normalizes
        split = pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated")
        return pre_tokenizers.Sequence([split, byte_level]), normalizers.NFC(), False
    if pre not in GPT2_PRE:
        log.warning("unknown GGUF pre-tokenizer %r: using GPT-2's split; token ids may differ from the original", pre)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), None, False


def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)  # duplicates (rare padding entries) keep their first id
    return vocab


def _build_bpe(fields: Mapping[str, Any], tokens: list[str], types: list[int]) -> Backend:
    merges = [tuple(m.split(" ", 1)) for m in meta(fields, "tokenizer.ggml.merges", [])]
    pre, norm, ignore_merges = byte_level_pre_tokenizer(str(meta(fields, "tokenizer.ggml.pre", "default")))
    backend = Backend(models.BPE(vocab=_vocab(tokens), merges=merges, ignore_merges=ignore_merges))
    backend.pre_tokenizer = pre
    if norm is not None:
        backend.normalizer = norm
    backend.decoder = decoders.ByteLevel()
    alphabet = set(gpt2_byte_chars())
    # A control token spelled outside the byte alphabet is a llama.cpp mislabel (a raw "\n\n", say):
    # matching it in user text would be wrong, so it stays an ordinary vocabulary entry.
    _add_added_tokens(backend, tokens, types, lambda t: set(t) <= alphabet)
    return backend


def _spm_merges(vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece BPE keeps scores, not merges: a token's merges are its splits into two
    vocabulary pieces, ranked by the merged token's score (higher merges first)."""
    ranked: list[tuple[float, int, int, str, str]] = []
    for tok, i in vocab.items():
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[i], vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def _build_spm(fields: Mapping[str, Any], tokens: list[str], types: list[int]) -> Backend:
    scores = [float(s) for s in meta(fields, "tokenizer.ggml.scores", [0.0] * len(tokens))]
    vocab = _vocab(tokens)
    normal = {t: i for t, i in vocab.items() if types[i] in (NORMAL, USER_DEFINED)}
    unk_id = meta(fields, "tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    backend = Backend(models.BPE(vocab=vocab, merges=_spm_merges(normal, scores), unk_token=unk,
                                 fuse_unk=True, byte_fallback=True))
    prefix = bool(meta(fields, "tokenizer.ggml.add_space_prefix", True))
    steps = [normalizers.Prepend("▁")] if prefix else []
    backend.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(dec + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    _add_added_tokens(backend, tokens, types, lambda t: True)
    return backend


def _add_added_tokens(backend: Backend, tokens: list[str], types: list[int], ok: Any) -> None:
    # Control tokens (<|im_start|>, <s>) must encode as one id and count as special;
    # user-defined ones (<think>) are matched whole too but decode as text.
    pairs = list(zip(tokens, types, strict=True))
    control = [AddedToken(t, special=True, normalized=False) for t, k in pairs if k == CONTROL and ok(t)]
    user = [AddedToken(t, special=False, normalized=False) for t, k in pairs if k == USER_DEFINED and ok(t)]
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)


def _chat_templates(fields: Mapping[str, Any]) -> dict[str, str] | None:
    templates: dict[str, str] = {}
    default = meta(fields, "tokenizer.chat_template")
    if isinstance(default, str):
        templates["default"] = default
    prefix = "tokenizer.chat_template."  # llama.cpp's key for named templates (e.g. tool_use)
    for key in fields:
        if key.startswith(prefix) and isinstance(value := meta(fields, key), str):
            templates[key[len(prefix):]] = value
    return templates or None


def tokenizer_from_gguf(fields: Mapping[str, Any] | Any) -> Tokenizer:
    """From a plain metadata dict (`gguf_header.read_gguf_header(path).metadata`), a `gguf.GGUFReader`
    or its `.fields` mapping (llama.cpp key names)."""
    fields = getattr(fields, "fields", fields)
    kind = meta(fields, "tokenizer.ggml.model")
    tokens = meta(fields, "tokenizer.ggml.tokens")
    if not tokens:
        raise ValueError("GGUF file has no tokenizer (tokenizer.ggml.tokens missing)")
    types = [int(t) for t in meta(fields, "tokenizer.ggml.token_type", [NORMAL] * len(tokens))]
    if kind == "gpt2":
        backend = _build_bpe(fields, tokens, types)
    elif kind == "llama":
        backend = _build_spm(fields, tokens, types)
    else:
        raise ValueError(
            f"unsupported GGUF tokenizer model {kind!r}; supported: gpt2 (byte-level BPE), llama (SentencePiece)"
        )
    eos = [meta(fields, f"tokenizer.ggml.{k}") for k in ("eos_token_id", "eot_token_id", "eom_token_id")]
    return Tokenizer(
        backend,
        bos_token_id=meta(fields, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=[e for e in eos if e is not None],
        # llama.cpp's defaults when the flag is absent: BOS for SentencePiece, none for BPE.
        add_bos=bool(meta(fields, "tokenizer.ggml.add_bos_token", kind == "llama")),
        chat_template=_chat_templates(fields),
        pad_token_id=meta(fields, "tokenizer.ggml.padding_token_id"),
        unk_token_id=meta(fields, "tokenizer.ggml.unknown_token_id"),
    )
