"""`StructuredOutputs` -> an llguidance grammar, and its validation (no tokenizer needed).

JSON schemas compile with llguidance's JSON compiler: with `any_whitespace` False
(the default) no optional whitespace at all and compact separators (`,` and `:`),
so a model cannot run away in spaces or newlines; unknown keywords are errors
(not `lenient`). `json_object` is the schema `{"type": "object"}`. A choice is a
Lark alternation of the literal strings. A grammar is Lark as given, or GBNF/EBNF
(text containing `::=`) converted with llguidance's `gbnf_to_lark`.

Every error is a ValueError whose message starts with `structured_outputs.<kind>`
(the field the client set) and holds at most `MAX_ERROR_CHARS` of llguidance's text.
"""
from __future__ import annotations

import json
import threading
from collections import OrderedDict

from llguidance import LLMatcher, LLParserLimits
from llguidance.gbnf_to_lark import gbnf_to_lark

from lockgate.engine.structured.deadline import DeadlinePool
from lockgate.engine.structured_params import StructuredOutputs

MAX_ERROR_CHARS = 400
# Grammars validated recently (their cache keys): a repeated schema is not validated twice.
_VALID_KEYS = 1024
# The frontend's check is bounded in time: llguidance's limits (`parser_limits`) bound a grammar's
# size and lexer work, not every compile (a 200 KB schema of 8000 optional properties with
# additionalProperties false passes them and takes ~2.6 s to check, ~14 s to compile with the
# tokenizer, measured on the 2-core CI machine). Over the limit the request gets a 400 at once;
# the check goes on on one of `_CHECK_THREADS` threads and its grammar is remembered as too slow.
VALIDATE_TIMEOUT_S = 10.0
_CHECK_THREADS = 2

COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
FLEXIBLE_JSON = {"whitespace_flexible": True}


def parser_limits() -> LLParserLimits:
    """llguidance's bounds on a grammar's size and lexer work (its defaults, written down so they are
    ours): they bound a compile's time and memory, the frontend's check and the core's alike."""
    return LLParserLimits(max_items_in_row=2000, initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000,
                          step_max_items=50_000, max_lexer_states=250_000, max_grammar_size=500_000,
                          verbose_errors=False)


def _field(so: StructuredOutputs) -> str:
    return f"structured_outputs.{so.kind}"


def _short(text: str) -> str:
    text = text.strip()
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + "..."


def to_grammar(so: StructuredOutputs) -> str:
    """The llguidance grammar (its JSON text) for `so`; ValueError when it cannot be built."""
    kind = so.kind
    try:
        if kind in ("json", "json_object"):
            text = '{"type": "object"}' if kind == "json_object" else so.json
            assert text is not None
            schema = json.loads(text)
            if not isinstance(schema, (dict, bool)):
                raise ValueError(f"the schema must be a JSON object, got {type(schema).__name__}")
            opts = FLEXIBLE_JSON if so.any_whitespace else COMPACT_JSON
            return LLMatcher.grammar_from_json_schema(text, overrides=opts)  # type: ignore[arg-type]
        if kind == "regex":
            assert so.regex is not None
            return LLMatcher.grammar_from_regex(so.regex)
        if kind == "choice":
            assert so.choice is not None
            # json.dumps writes each choice as a Lark string literal (same escapes).
            return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in so.choice))
        assert so.grammar is not None
        lark = gbnf_to_lark(so.grammar) if "::=" in so.grammar else so.grammar
        return LLMatcher.grammar_from_lark(lark)
    except (ValueError, TypeError, RecursionError, AssertionError) as exc:
        raise ValueError(f"{_field(so)} is invalid: {_short(str(exc))}") from None
    except Exception as exc:  # noqa: BLE001 - gbnf_to_lark is Python and may fail in any way on hostile text
        raise ValueError(f"{_field(so)} is invalid: {_short(f'{type(exc).__name__}: {exc}')}") from None


class _Validated:
    """A small LRU of grammars known to be valid (thread-safe: validation may run off the event loop)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.keys: OrderedDict[tuple, None] = OrderedDict()
        self.lock = threading.Lock()

    def __contains__(self, key: tuple) -> bool:
        with self.lock:
            if key in self.keys:
                self.keys.move_to_end(key)
                return True
            return False

    def add(self, key: tuple) -> None:
        with self.lock:
            self.keys[key] = None
            while len(self.keys) > self.size:
                self.keys.popitem(last=False)


_validated = _Validated(_VALID_KEYS)
_too_slow = _Validated(_VALID_KEYS)  # grammars whose check ran over the limit: refused at once
_checks = DeadlinePool(_CHECK_THREADS, "grammar-check")


def validate(so: StructuredOutputs, timeout_s: float = VALIDATE_TIMEOUT_S) -> None:
    """Raise ValueError (naming the field) when `so` would not compile, or when checking it takes
    over `timeout_s`. A grammar check without the tokenizer (under a millisecond for small
    schemas, ~0.1 s for most 256 KiB ones), free for a grammar validated recently; it releases
    the GIL and runs on its own bounded threads, so the caller (a worker thread) never hangs."""
    key = so.cache_key()
    if key in _validated:
        return
    if key in _too_slow:
        raise ValueError(_slow_message(so, timeout_s))
    try:
        _checks.call(lambda: _check(so), timeout_s)
    except TimeoutError:
        _too_slow.add(key)
        raise ValueError(_slow_message(so, timeout_s)) from None
    _validated.add(key)


def _check(so: StructuredOutputs) -> None:
    grammar = to_grammar(so)
    error = LLMatcher.validate_grammar(grammar, None, limits=parser_limits())
    if error:
        raise ValueError(f"{_field(so)} is invalid: {_short(error)}")


def _slow_message(so: StructuredOutputs, timeout_s: float) -> str:
    return f"{_field(so)}: grammar check exceeded the {timeout_s:g} s limit"
