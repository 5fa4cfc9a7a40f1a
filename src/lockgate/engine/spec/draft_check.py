"""The draft model must speak the target's tokens: the same vocabulary, id for id."""
from __future__ import annotations

from lockgate.engine.tokenizer import Tokenizer


def check_same_tokenizer(target: Tokenizer, draft: Tokenizer, target_name: str, draft_name: str) -> None:
    """ValueError naming both models when a draft's token ids would mean other text in the target."""
    tv = target.backend.get_vocab(with_added_tokens=True)
    dv = draft.backend.get_vocab(with_added_tokens=True)
    if tv == dv:
        return
    differ = len(set(tv.items()) ^ set(dv.items()))
    raise ValueError(
        f"speculative_config: the draft model {draft_name} does not share the target model {target_name}'s "
        f"tokenizer ({len(dv)} against {len(tv)} tokens, {differ} (token, id) pairs differ): a draft must use "
        "the target's tokenizer, id for id")


def describe(path: str | None) -> str:
    return "'default' (the embedded model)" if path is None else repr(path)


def check_draft(config) -> None:
    """An engine config's draft model, before anything loads: its path exists and its tokenizer is
    the target's (only the tokenizers are read). ValueError otherwise."""
    spec = config.speculative_config
    if spec is None or spec.method != "draft_model":
        return
    from pathlib import Path

    from lockgate.engine.loader import load_checkpoint

    if spec.draft_path is not None and not Path(spec.draft_path).expanduser().exists():
        raise ValueError(f"speculative_config.model: the draft model path {spec.draft_path!r} does not exist")
    target = load_checkpoint(config.model).tokenizer
    draft = load_checkpoint(spec.draft_path).tokenizer
    check_same_tokenizer(target, draft, describe(config.model), describe(spec.draft_path))
