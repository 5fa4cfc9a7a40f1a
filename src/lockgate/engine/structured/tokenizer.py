"""The llguidance tokenizer of an engine core, from the core's own tokenizer."""
from __future__ import annotations

from llguidance import LLTokenizer

from lockgate.engine.tokenizer import Tokenizer


def build_ll_tokenizer(tokenizer: Tokenizer, vocab_size: int, eos_token_ids: list[int]) -> LLTokenizer:
    """From the Hugging Face `tokenizers` JSON of `tokenizer` (GGUF tokenizers are rebuilt into one by
    the loader). `vocab_size`: the model's logits width (its bitmasks cover every logit; a tokenizer
    with more ids than that widens it, and the sampler cuts the mask to the logits). `eos_token_ids`:
    what ends a request (model and generation config), the tokens a complete grammar allows.
    About 0.3 s for a 49k vocabulary: built once per core, on the compile worker."""
    if not eos_token_ids:
        raise ValueError("structured outputs need the model's EOS token id, and this model has none")
    n_vocab = max(vocab_size, tokenizer.vocab_size)
    return LLTokenizer(tokenizer.backend.to_str(), n_vocab=n_vocab, eos_token=list(eos_token_ids))
