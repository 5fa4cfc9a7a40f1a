"""`SpeculativeConfig`: vLLM's `--speculative-config` (a JSON object), checked field by field.

`{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 2, "prompt_lookup_max": 5}`
or `{"method": "draft_model", "model": PATH, "num_speculative_tokens": 4}`. Errors name the
field, as every engine option's do; unknown fields are refused (a typo must not silently turn
speculation into something else).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from typing import Any

from lockgate.engine.quant.precision import QUANTIZATION_CHOICES

METHODS = ("ngram", "draft_model")
MAX_SPECULATIVE_TOKENS = 16  # verify rows per request and step: past this a CPU step is compute-bound
MAX_LOOKUP = 64  # the longest n-gram looked up (tokens)
MAX_CONFIG_CHARS = 65536


@dataclass(slots=True)
class SpeculativeConfig:
    method: str = "ngram"
    num_speculative_tokens: int = 4  # the most proposals per request and step (k)
    prompt_lookup_min: int = 2  # ngram: the shortest suffix n-gram that may match
    prompt_lookup_max: int = 5  # ngram: the longest one tried first
    model: str | None = None  # draft_model: the draft checkpoint (same tokenizer as the target)
    # draft_model: the draft's precision (the target's choices: auto = as stored) and KV cache blocks
    # (None: as many as the target's, at the draft's own size per block).
    draft_quantization: str = "auto"
    draft_num_kv_blocks: int | None = None
    # Decodes in a step at which speculation turns off for that step. None: from the step cost curve
    # the core measures at start-up and keeps measuring (engine/spec/cost.py), never guessed.
    disable_by_batch_size: int | None = None
    # Per request: an estimated per-token acceptance below this pauses its speculation (a paused
    # request retries after a backoff that doubles while it stays low).
    min_acceptance: float = 0.2
    # "cost": proposal rows only where the measured step cost says they pay (engine/spec/cost.py);
    # "always": every decode carries its proposals (up to k) whatever they cost, still subject to
    # min_acceptance and disable_by_batch_size (tests; machines whose curve misleads the plan).
    policy: str = "cost"

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative_config.method must be one of {', '.join(METHODS)}; got {self.method!r}")
        _int("num_speculative_tokens", self.num_speculative_tokens, 1, MAX_SPECULATIVE_TOKENS)
        _int("prompt_lookup_min", self.prompt_lookup_min, 1, MAX_LOOKUP)
        _int("prompt_lookup_max", self.prompt_lookup_max, 1, MAX_LOOKUP)
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"speculative_config.prompt_lookup_min ({self.prompt_lookup_min}) must be <= "
                             f"prompt_lookup_max ({self.prompt_lookup_max})")
        if self.method == "draft_model":
            if not isinstance(self.model, str) or not self.model or len(self.model) > 4096 or "\x00" in self.model:
                raise ValueError("speculative_config.model: method 'draft_model' needs the draft checkpoint's path "
                                 "(a directory or .gguf file, or 'default' for the embedded model)")
        elif self.model is not None:
            raise ValueError("speculative_config.model is only for method 'draft_model'")
        if self.draft_quantization not in QUANTIZATION_CHOICES:
            raise ValueError(f"speculative_config.draft_quantization must be one of "
                             f"{', '.join(QUANTIZATION_CHOICES)}; got {self.draft_quantization!r}")
        if self.draft_num_kv_blocks is not None:
            _int("draft_num_kv_blocks", self.draft_num_kv_blocks, 1, 2**24)
        if self.disable_by_batch_size is not None:
            _int("disable_by_batch_size", self.disable_by_batch_size, 1, 65536)
        if self.policy not in ("cost", "always"):
            raise ValueError(f"speculative_config.policy must be 'cost' or 'always', got {self.policy!r}")
        m = self.min_acceptance
        if not (isinstance(m, (int, float)) and not isinstance(m, bool) and math.isfinite(m) and 0 <= m < 1):
            raise ValueError(f"speculative_config.min_acceptance must be a number in [0, 1), got {m!r}")

    @property
    def draft_path(self) -> str | None:
        """The draft checkpoint as the loader takes it (None: the embedded default model)."""
        return None if self.model == "default" else self.model


def _int(name: str, value: object, lo: int, hi: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        shown = value if isinstance(value, (int, float)) and abs(value) < 2**64 else "(out of range)"
        raise ValueError(f"speculative_config.{name} must be an integer from {lo} to {hi}, got {shown!r}")


FIELDS = frozenset(f.name for f in fields(SpeculativeConfig))


def parse_speculative_config(value: str | dict[str, Any] | SpeculativeConfig | None) -> SpeculativeConfig | None:
    """A JSON object (text, or already parsed) as a `SpeculativeConfig`; None or "" for none."""
    if value is None or isinstance(value, SpeculativeConfig):
        return value
    if isinstance(value, str):
        if not value.strip():
            return None
        if len(value) > MAX_CONFIG_CHARS:
            raise ValueError(f"speculative_config: at most {MAX_CONFIG_CHARS} characters of JSON")
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"speculative_config is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError("speculative_config must be a JSON object, e.g. "
                         '{"method": "ngram", "num_speculative_tokens": 4}')
    unknown = sorted(str(k)[:64] for k in value if k not in FIELDS)
    if unknown:
        raise ValueError(f"speculative_config: unknown field(s) {', '.join(unknown)} "
                         f"(known: {', '.join(sorted(FIELDS))})")
    if "method" not in value:
        raise ValueError("speculative_config.method is required: 'ngram' or 'draft_model'")
    return SpeculativeConfig(**value)
