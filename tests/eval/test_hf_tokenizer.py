"""`lockgate export-tokenizer`: the served tokenizer as a Hugging Face directory that
transformers loads and that tokenizes exactly as lockgate does (ids, special tokens, BOS,
decoding, chat template), and that lockgate reads back to the same tokenizer."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lockgate.cli import app
from lockgate.engine.loader import load_checkpoint
from lockgate.engine.loader.gguf_tokenizer import tokenizer_from_gguf
from lockgate.engine.tokenizer import Tokenizer
from lockgate.eval.hf_tokenizer import FILES, export_tokenizer, write_hf_tokenizer

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world",
    "The year 2024 had 366 days; 3.14159 and 1,000,000.",
    "  leading  spaces\n\n\ttabs and\r\nwindows lines  ",
    "héllo wörld — 日本語のテキスト 🤖🚀 ünïcödé",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text with <|endoftext|> inside and <file_sep> too",
    "def f(x):\n    return x ** 2  # comment\n",
    "",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}],
]


def _ids(encoded: object) -> list[int]:
    # transformers 5 returns a BatchEncoding from apply_chat_template(tokenize=True); 4.x a list
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def _same(lg: Tokenizer, hf: object) -> None:
    for text in TEXTS:
        plain = lg.encode(text, add_special_tokens=False)
        assert hf(text, add_special_tokens=False).input_ids == plain, text
        assert hf(text).input_ids == lg.encode(text), text
        for skip in (True, False):
            assert hf.decode(plain, skip_special_tokens=skip) == lg.decode(plain, skip_special_tokens=skip), text


@pytest.fixture(scope="module")
def smollm(tmp_path_factory: pytest.TempPathFactory) -> tuple[Tokenizer, object, Path]:
    out = export_tokenizer("default", tmp_path_factory.mktemp("tok") / "smollm2")
    return load_checkpoint(None).tokenizer, transformers.AutoTokenizer.from_pretrained(str(out)), out


def test_default_model_round_trip(smollm: tuple[Tokenizer, object, Path]) -> None:
    lg, hf, out = smollm
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    _same(lg, hf)
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id, hf.unk_token_id) == (
        lg.bos_token_id, lg.eos_token_id, lg.pad_token_id, lg.unk_token_id)
    assert hf.model_max_length == 8192 and len(hf) == lg.vocab_size
    assert hf.convert_tokens_to_ids("<|im_start|>") == 1 and 1 in hf.all_special_ids
    for conv in CONVERSATIONS:
        text = lg.apply_chat_template(conv, add_generation_prompt=True)
        assert hf.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) == text
        assert _ids(hf.apply_chat_template(conv, tokenize=True, add_generation_prompt=True)) == lg.encode(
            text, add_special_tokens=False)
    # lockgate reads the directory back to the same tokenizer
    back = Tokenizer.from_hf_dir(out)
    assert (back.bos_token_id, back.eos_token_ids, back.add_bos) == (lg.bos_token_id, lg.eos_token_ids, lg.add_bos)
    assert back.chat_templates == lg.chat_templates
    assert all(back.encode(t) == lg.encode(t) for t in TEXTS)


def test_bos_adding_sentencepiece_tokenizer_and_named_templates(tmp_path: Path) -> None:
    """A SentencePiece GGUF vocabulary (BOS added by default), with a `tool_use` template."""
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "llo", "hello", "▁hello",
              "▁w", "or", "▁wor", "ld", "▁world"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    scores = [0.0] * (3 + 256) + [-float(i) for i in range(len(pieces))]
    scores[tokens.index("▁hello")] = scores[tokens.index("▁world")] = 10.0
    lg = tokenizer_from_gguf({
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(pieces), "tokenizer.ggml.scores": scores,
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.chat_template": "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
                                   "{{ eos_token }}{% endfor %}",
        "tokenizer.chat_template.tool_use": "{{ bos_token }}tools: {{ tools | length }}",
    })
    assert lg.add_bos
    out = write_hf_tokenizer(lg, tmp_path / "spm", model_max_length=512)
    assert (out / "additional_chat_templates" / "tool_use.jinja").is_file()
    hf = transformers.AutoTokenizer.from_pretrained(str(out))
    expected = [1, tokens.index("▁hello"), tokens.index("▁world")]
    assert hf("hello world").input_ids == lg.encode("hello world") == expected
    for text in ["hello world", "hé! world", "</s> hello", ""]:
        assert hf(text).input_ids == lg.encode(text), text
        assert hf(text, add_special_tokens=False).input_ids == lg.encode(text, add_special_tokens=False), text
        ids = lg.encode(text)
        assert hf.decode(ids, skip_special_tokens=True) == lg.decode(ids), text
    conv = [{"role": "user", "content": "hello"}]
    assert hf.apply_chat_template(conv, tokenize=False) == lg.apply_chat_template(conv) == "<s>[user] hello</s>"
    back = Tokenizer.from_hf_dir(out)
    assert back.chat_templates == lg.chat_templates and back.add_bos
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is True and config["model_max_length"] == 512


def test_cli_writes_the_directory_and_refuses_a_file(tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(app, ["export-tokenizer", str(tmp_path / "out")])
    assert r.exit_code == 0, r.output
    assert "tokenizer.json" in r.output and (tmp_path / "out" / "chat_template.jinja").is_file()
    (tmp_path / "file").write_text("x")
    r = runner.invoke(app, ["export-tokenizer", str(tmp_path / "file")])
    assert r.exit_code == 2 and "not a directory" in r.output
    r = runner.invoke(app, ["export-tokenizer", "--model", str(tmp_path / "missing.gguf"), str(tmp_path / "o2")])
    assert r.exit_code == 2 and "does not exist" in r.output
