"""Tokenizer: SmolLM2's GGUF tokenizer against transformers, chat templates, BOS handling, SentencePiece."""
from __future__ import annotations

from pathlib import Path

import gguf
import pytest
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

from lockgate.engine.loader.gguf_tokenizer import gpt2_byte_chars, tokenizer_from_gguf
from lockgate.engine.tokenizer import Tokenizer

TEXTS = [
    "Hello world",
    "12345",
    "The year 2024 had 366 days; π ≈ 3.14159.",
    "naïve café déjà vu — “quotes” ‘single’",
    "日本語のテキストと中文混合",
    "emoji 🤖🚀👍🏽 and flags 🇫🇷",
    "multiple   spaces\tand\ttabs   ",
    "line one\nline two\n\n\nline five\r\n",
    "  leading and trailing  ",
    "def f(x):\n    return x ** 2  # comment\n",
    "don't won't I'm you'll they've we'd SHE'S",
    "<|im_start|>user\nhi<|im_end|>\n",
    "",
]


@pytest.fixture(scope="module")
def tok(smollm_path: Path) -> Tokenizer:
    return tokenizer_from_gguf(gguf.GGUFReader(smollm_path))


def test_smollm_special_ids(tok: Tokenizer) -> None:
    assert tok.vocab_size == 49152
    assert tok.bos_token_id == 1 and tok.bos_token == "<|im_start|>"
    assert tok.eos_token_id == 2 and tok.eos_token_ids == [2] and tok.eos_token == "<|im_end|>"
    assert tok.add_bos is False
    assert tok.encode("<|im_start|>") == [1]
    assert tok.encode("<|im_end|>") == [2]
    assert tok.encode("<|endoftext|>") == [0]
    assert all(tok.is_special(i) for i in range(17)) and not tok.is_special(17)


@pytest.mark.parametrize("text", TEXTS)
def test_smollm_round_trip(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_smollm_digits_split_individually(tok: Tokenizer) -> None:
    assert tok.convert_ids_to_tokens(tok.encode("12345")) == ["1", "2", "3", "4", "5"]
    # SmolLM2's pre-tokenizer: Digits(individual_digits=True) then GPT-2's ByteLevel split.
    pieces = [p for p, _ in tok.backend.pre_tokenizer.pre_tokenize_str("in 2024, it's")]
    assert pieces == ["in", "Ġ", "2", "0", "2", "4", ",", "Ġit", "'s"]


def test_smollm_decode_skips_specials(tok: Tokenizer) -> None:
    ids = tok.encode("<|im_start|>assistant\nHi there<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == "assistant\nHi there"
    assert tok.decode([1, 10**6, 2]) == ""  # ids past the vocabulary are dropped, not a crash
    assert tok.convert_ids_to_tokens([1, 10**6]) == ["<|im_start|>", ""]


def test_smollm_matches_transformers(tok: Tokenizer, smollm_path: Path) -> None:
    """transformers rebuilds the same tokenizer from the same file: ids must agree."""
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name)
    for text in TEXTS + [t * 3 for t in TEXTS]:
        assert tok.encode(text) == ref(text)["input_ids"], text
    assert len(ref) == tok.vocab_size


SMOLLM_CHAT = (
    "<|im_start|>system\nYou are terse.<|im_end|>\n"
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def test_smollm_chat_template(tok: Tokenizer) -> None:
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}]
    assert tok.apply_chat_template(messages) == SMOLLM_CHAT
    no_prompt = tok.apply_chat_template(messages, add_generation_prompt=False)
    assert no_prompt == SMOLLM_CHAT.removesuffix("<|im_start|>assistant\n")
    # No system message: the template inserts SmolLM's default one.
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                    "<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.encode(SMOLLM_CHAT, add_special_tokens=False)
    assert ids.count(1) == 3 and ids.count(2) == 2


# ---------------------------------------------------------------- synthetic tokenizers
def byte_backend(extra_special: list[str]) -> Backend:
    vocab = {c: i for i, c in enumerate(gpt2_byte_chars())}
    for t in extra_special:
        vocab[t] = len(vocab)
    backend = Backend(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in extra_special])
    return backend


def make_tok(template: object = None, add_bos: bool = True) -> Tokenizer:
    backend = byte_backend(["<s>", "</s>", "<eot>"])
    return Tokenizer(backend, bos_token_id=256, eos_token_ids=[257, 258, 257], add_bos=add_bos, chat_template=template)


def test_bos_added_once() -> None:
    t = make_tok()
    assert t.encode("ab") == [256, ord("a"), ord("b")]
    assert t.encode("<s>ab") == [256, ord("a"), ord("b")]  # text already starting with BOS: not doubled
    assert t.encode("ab", add_special_tokens=False) == [ord("a"), ord("b")]
    assert t.eos_token_ids == [257, 258] and t.eos_token_id == 257
    assert make_tok(add_bos=False).encode("ab") == [ord("a"), ord("b")]


def test_chat_template_helpers_and_errors() -> None:
    template = (
        "{{ bos_token }}{% for m in messages %}"
        "{% if m['role'] not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + m['role']) }}{% endif %}"
        "[{{ m['role'] }}]{{ m['content'] }}{{ eos_token }}\n"
        "{% endfor %}{% if tools %}{{ tools | tojson }}{% endif %}{% if add_generation_prompt %}[assistant]{% endif %}"
        "{% if enable_thinking is defined and not enable_thinking %}/no_think{% endif %}"
    )
    t = make_tok(template)
    out = t.apply_chat_template([{"role": "user", "content": "héllo"}], tools=[{"name": "f", "d": "é<>"}],
                                enable_thinking=False)
    assert out == '<s>[user]héllo</s>\n[{"name": "f", "d": "é<>"}][assistant]/no_think'
    with pytest.raises(ValueError, match="bad role system"):
        t.apply_chat_template([{"role": "system", "content": "x"}])
    with pytest.raises(ValueError, match="model has no chat template"):
        make_tok(None).apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="chat template"):
        make_tok("{% for %}").apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(ValueError, match="chat template"):  # the sandbox refuses attribute escapes
        make_tok("{{ messages.__class__.__mro__[1].__subclasses__() }}").apply_chat_template([])
    with pytest.raises(ValueError, match="chat template"):
        make_tok("{{ messages[5]['content'] + 1 }}").apply_chat_template([{"role": "user", "content": "x"}])


def test_trim_and_lstrip_blocks_like_transformers() -> None:
    template = "{% for m in messages %}\n    {{ m['content'] }}\n{% endfor %}"
    msgs = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert make_tok(template).apply_chat_template(msgs) == "    a\n    b\n"


def test_named_templates_pick_tool_use() -> None:
    t = make_tok({"default": "plain", "tool_use": "tools:{{ tools | length }}"})
    assert t.chat_template == "plain"
    assert t.apply_chat_template([]) == "plain"
    assert t.apply_chat_template([], tools=[{"a": 1}, {"b": 2}]) == "tools:2"


def test_sentencepiece_gguf_metadata() -> None:
    """A tiny llama.cpp SentencePiece vocabulary (tokenizer.ggml.model == "llama")."""
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "llo", "hello", "▁hello",
              "▁w", "or", "▁wor", "ld", "▁world"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(pieces))]
    scores[tokens.index("▁hello")] = scores[tokens.index("▁world")] = 10.0
    fields = {
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.scores": scores, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }
    t = tokenizer_from_gguf(fields)
    assert t.add_bos and t.bos_token_id == 1 and t.eos_token_ids == [2]
    ids = t.encode("hello world")
    assert t.convert_ids_to_tokens(ids) == ["<s>", "▁hello", "▁world"]
    assert t.decode(ids) == "hello world"
    ids = t.encode("hé!")  # é and ! are not pieces: byte fallback
    assert "<0xC3>" in t.convert_ids_to_tokens(ids)
    assert t.decode(ids) == "hé!"
    assert t.encode("</s>", add_special_tokens=False) == [2]


def test_split_regexes_match_transformers() -> None:
    pytest.importorskip("transformers")
    from transformers.integrations.gguf.gguf_tokenizer_mapping import _LLAMA3_SPLIT
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from lockgate.engine.loader.gguf_tokenizer import LLAMA3_SPLIT, QWEN2_SPLIT, byte_level_pre_tokenizer

    assert LLAMA3_SPLIT == _LLAMA3_SPLIT and QWEN2_SPLIT == PRETOKENIZE_REGEX
    llama3, _, ignore = byte_level_pre_tokenizer("llama-bpe")
    assert ignore and [p for p, _ in llama3.pre_tokenize_str("x 12345")] == ["x", "Ġ", "123", "45"]
    qwen2, norm, ignore = byte_level_pre_tokenizer("qwen2")
    assert norm is not None and not ignore
    assert [p for p, _ in qwen2.pre_tokenize_str("x 123")] == ["x", "Ġ", "1", "2", "3"]
