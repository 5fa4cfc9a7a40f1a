"""`StructuredOutputs`: what a request's output must match (vLLM's `structured_outputs`).

Exactly one constraint: a JSON schema (`json`, as JSON text), any JSON object
(`json_object`), a regular expression (`regex`), one of some strings (`choice`),
or a grammar (`grammar`: Lark, or GBNF/EBNF as llama.cpp and vLLM write it).
Plain field types only, so it crosses the socket inside `SamplingParams` with
msgspec (which runs `__post_init__` on decode: what arrives is checked again).
The grammar itself is compiled in the engine core (engine/structured/), never here.
"""
from __future__ import annotations

from dataclasses import dataclass

MAX_SPEC_CHARS = 256 * 1024  # a schema, regex or grammar's text
MAX_CHOICES = 1024
MAX_CHOICE_CHARS = 4096
KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(slots=True)
class StructuredOutputs:
    json: str | None = None  # a JSON schema as JSON text
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # Lark, or GBNF/EBNF (`root ::= ...`)
    # JSON between tokens: False (default) allows no optional whitespace, so a model cannot run away
    # in spaces and newlines (vLLM's disable_any_whitespace); True allows it.
    any_whitespace: bool = False

    def __post_init__(self) -> None:
        given = [k for k in KINDS if (getattr(self, k) not in (None, False))]
        if len(given) != 1:
            raise ValueError(f"structured_outputs: exactly one of {', '.join(KINDS)} must be given, got "
                             f"{', '.join(given) or 'none'}")
        if not isinstance(self.json_object, bool) or not isinstance(self.any_whitespace, bool):
            raise ValueError("structured_outputs: json_object and any_whitespace must be booleans")
        for name in ("json", "regex", "grammar"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, str):
                raise ValueError(f"structured_outputs.{name} must be a string, got {type(value).__name__}")
            if not value.strip():
                raise ValueError(f"structured_outputs.{name} must not be empty")
            if len(value) > MAX_SPEC_CHARS:
                raise ValueError(f"structured_outputs.{name} must be at most {MAX_SPEC_CHARS} characters, "
                                 f"got {len(value)}")
        if self.choice is not None:
            if not isinstance(self.choice, list) or not self.choice:
                raise ValueError("structured_outputs.choice must be a non-empty list of strings")
            if len(self.choice) > MAX_CHOICES:
                raise ValueError(f"structured_outputs.choice must have at most {MAX_CHOICES} entries, "
                                 f"got {len(self.choice)}")
            for c in self.choice:
                if not isinstance(c, str) or not c:
                    raise ValueError("structured_outputs.choice entries must be non-empty strings")
                if len(c) > MAX_CHOICE_CHARS:
                    raise ValueError(f"structured_outputs.choice entries must be at most {MAX_CHOICE_CHARS} "
                                     "characters")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def cache_key(self) -> tuple:
        """What identifies the compiled grammar (the tokenizer is the core's own)."""
        return (self.kind, self.json, self.regex, tuple(self.choice or ()), self.grammar, self.any_whitespace)
