"""Dummy checkpoints: a real architecture's config with random weights (GPU throughput
benchmarks do not depend on the values, and nothing has to be downloaded).

Tokenizer: the real one when a tokenizer.json sits next to the config (or the GGUF's),
else `byte_fallback_tokenizer`: ids 0-255 are the bytes, 256 is `<|endoftext|>` (EOS),
the rest up to `vocab_size` are filler tokens `<|dummy_N|>` that text never encodes to.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

from lockgate.engine.config import ModelConfig
from lockgate.engine.loader.gguf_tokenizer import gpt2_byte_chars, tokenizer_from_gguf
from lockgate.engine.loader.hf import read_config
from lockgate.engine.loader.layout import expected_shapes
from lockgate.engine.loader.progress import track
from lockgate.engine.tokenizer import Tokenizer

if TYPE_CHECKING:
    import torch

DUMMY_STD = 0.02
FALLBACK_EOS = "<|endoftext|>"
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_fallback_tokenizer(vocab_size: int) -> Tokenizer:
    if vocab_size < 257:
        raise ValueError(f"the byte-level fallback tokenizer needs vocab_size >= 257 (got {vocab_size}); "
                         "put a tokenizer.json next to the config")
    vocab = {c: i for i, c in enumerate(gpt2_byte_chars())}
    vocab[FALLBACK_EOS] = 256
    vocab.update({f"<|dummy_{i}|>": i for i in range(257, vocab_size)})
    backend = Backend(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(FALLBACK_EOS, special=True, normalized=False)])
    return Tokenizer(backend, bos_token_id=None, eos_token_ids=[256], add_bos=False,
                     chat_template=FALLBACK_CHAT_TEMPLATE)


def random_weights(config: ModelConfig, seed: int = 0) -> Any:
    shapes = expected_shapes(config)

    def weights() -> Iterator[tuple[str, torch.Tensor]]:
        import torch  # lazy: only where tensors are made

        gen = torch.Generator().manual_seed(seed)  # same values on every call
        for name, shape in track(list(shapes.items()), len(shapes), "generating random weights"):
            if name.endswith("norm.weight"):
                yield name, torch.ones(shape)
            else:
                yield name, torch.empty(shape).normal_(0.0, DUMMY_STD, generator=gen)

    return weights


def load_dummy(path: Path) -> tuple[ModelConfig, Tokenizer, Any]:
    """`path`: a config .json, an HF directory, or a .gguf (only its metadata is used)."""
    if path.suffix == ".gguf":
        from lockgate.engine.loader.gguf import config_from_gguf
        from lockgate.engine.loader.gguf_header import read_gguf_header

        header = read_gguf_header(path)  # metadata and tensor shapes only: no data is read
        tokenizer = tokenizer_from_gguf(header.metadata)
        config = config_from_gguf(header.metadata, {t.name: t for t in header.tensors}, tokenizer)
        return config, tokenizer, random_weights(config)
    config = ModelConfig.from_hf(read_config(path))
    tok_dir = path if path.is_dir() else path.parent
    if (tok_dir / "tokenizer.json").is_file():
        tokenizer = Tokenizer.from_hf_dir(tok_dir)
        config.eos_token_ids = list(dict.fromkeys([*config.eos_token_ids, *tokenizer.eos_token_ids]))
    else:
        tokenizer = byte_fallback_tokenizer(config.vocab_size)
        config.bos_token_id, config.eos_token_ids = None, list(tokenizer.eos_token_ids)
    if config.bos_token_id is None:
        config.bos_token_id = tokenizer.bos_token_id
    return config, tokenizer, random_weights(config)
