"""Cheap features of a request's prompt, for router models (model_router.py): its length in
tokens, its language, whether it is source code, the tenant and the request's headers.

Each is computed at most once and only when a rule asks for it (`PromptFeatures`), and each
looks at a bounded part of the prompt, so a 10 MB prompt costs what a 10 KB one does:
- tokens: the first `TOKENIZE_CHARS` characters are tokenized; the rest is counted at the
  characters-per-token rate measured on that part (an estimate, close for one kind of text);
- language: the first `LANGUAGE_CHARS` characters of the focus text, with lingua (its own
  language models ship inside the wheel: nothing is downloaded) for `LANGUAGES`, in its high
  accuracy mode: the low accuracy mode is no faster once loaded (0.1-0.2 ms a call either way
  on the 2-core CI machine) but misreads a quarter of short English prompts. Its models load
  on first use per script (~1.5 s and ~250 MB for the Latin ones), so a server whose routers
  ask for languages warms it at start-up (`warm_language_detector`) and detects off the loop;
- code: a heuristic on the first `CODE_CHARS` characters (fenced blocks, code-shaped lines).
"""
from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

TOKENIZE_CHARS = 16_384  # tokenized exactly (~2 ms); beyond it, estimated
LANGUAGE_CHARS = 1_000
CODE_CHARS = 4_000

# ISO 639-1 codes a rule may name: the languages the detector knows (a bounded set keeps its memory and
# time bounded: each language's models are tens of MB).
LANGUAGES = ("ar", "de", "en", "es", "fr", "hi", "it", "ja", "ko", "nl", "pl", "pt", "ru", "tr", "uk", "vi", "zh")


@dataclass(slots=True)
class PromptText:
    """What a router looks at in one request: every text of the prompt (the messages' contents, or
    the prompts), the focus text that language and code detection read (the last user message, or
    the first text prompt), and the prompt tokens given as token ids (counted exactly)."""

    texts: list[str]
    focus: str
    token_ids: int = 0

    @classmethod
    def of_messages(cls, messages: list[Any]) -> PromptText:
        """From chat messages (objects with `role` and `content`: a string, or parts with `text`)."""
        texts: list[str] = []
        focus = ""
        for m in messages:
            content = getattr(m, "content", None)
            if isinstance(content, list):
                parts = [t for t in (getattr(p, "text", None) for p in content) if isinstance(t, str)]
                content = "\n".join(parts)
            if not isinstance(content, str):
                continue
            texts.append(content)
            if getattr(m, "role", None) == "user":
                focus = content
        return cls(texts, focus or (texts[-1] if texts else ""))

    @classmethod
    def of_prompt(cls, prompt: str | list[str] | list[int] | list[list[int]]) -> PromptText:
        """From a completion's `prompt`: a text, token ids, or a batch of either (the batch routes as
        one: its tokens are those of its longest prompt, its focus its first text)."""
        if isinstance(prompt, str):
            return cls([prompt], prompt)
        if not prompt or all(isinstance(x, int) for x in prompt):
            return cls([], "", len(prompt))
        texts = [p for p in prompt if isinstance(p, str)]
        ids = max((len(p) for p in prompt if isinstance(p, list)), default=0)
        longest = max(texts, key=len) if texts else ""
        return cls([longest] if texts else [], texts[0] if texts else "", ids)


class PromptFeatures:
    """One request's features, each computed on first use. `encode` tokenizes a text (the router's
    default model's tokenizer); without one, tokens are estimated at 4 characters each."""

    def __init__(self, prompt: PromptText | Callable[[], PromptText], *, tenant_id: str | None = None,
                 tenant_name: str | None = None, headers: Mapping[str, str] | None = None,
                 encode: Callable[[str], list[int]] | None = None) -> None:
        self._prompt = prompt
        self.tenant_id = tenant_id
        self.tenant_name = tenant_name
        self.headers = headers if headers is not None else {}
        self._encode = encode
        self._tokens: int | None = None
        self._language: str | None | bool = False  # False: not computed yet
        self._code: bool | None = None

    @property
    def prompt(self) -> PromptText:
        if callable(self._prompt):
            self._prompt = self._prompt()
        return self._prompt

    @property
    def prompt_tokens(self) -> int:
        if self._tokens is None:
            p = self.prompt
            if len(p.texts) > 1:  # the texts joined, up to what is tokenized
                parts, room = [], TOKENIZE_CHARS
                for t in p.texts:
                    if room <= 0:
                        break
                    parts.append(t[:room])
                    room -= len(parts[-1]) + 1
                self._tokens = count_tokens("\n".join(parts), self._encode,
                                            sum(len(t) for t in p.texts) + len(p.texts) - 1)
            else:
                self._tokens = count_tokens(p.texts[0], self._encode) if p.texts else 0
            self._tokens = max(self._tokens, p.token_ids)
        return self._tokens

    @property
    def language(self) -> str | None:
        """ISO 639-1 code of the focus text's language, None when unsure (too short, code, digits)."""
        if self._language is False:
            self._language = detect_language(self.prompt.focus)
        return self._language  # type: ignore[return-value]

    @property
    def is_code(self) -> bool:
        if self._code is None:
            self._code = looks_like_code(self.prompt.focus)
        return self._code

    def header(self, name: str) -> str | None:
        """A request header (names are lower case here; starlette's Headers ignore case anyway)."""
        return self.headers.get(name)


def count_tokens(text: str, encode: Callable[[str], list[int]] | None, total_chars: int | None = None) -> int:
    """Tokens of `text` (of `total_chars` characters in all, when only a part is given): its first
    TOKENIZE_CHARS characters tokenized, the rest estimated at the rate measured on them."""
    total = len(text) if total_chars is None else total_chars
    if not total:
        return 0
    head = text[:TOKENIZE_CHARS]
    if encode is None:
        return -(-total // 4)
    n = len(encode(head))
    if total <= len(head) or not head:
        return n
    return n + round((total - len(head)) * n / len(head))


_detector: Any = None
_detector_lock = threading.Lock()


def _build_detector() -> Any:
    global _detector
    with _detector_lock:
        if _detector is None:
            from lingua import IsoCode639_1, LanguageDetectorBuilder

            codes = [getattr(IsoCode639_1, c.upper()) for c in LANGUAGES]
            _detector = LanguageDetectorBuilder.from_iso_codes_639_1(*codes).build()
    return _detector


def warm_language_detector() -> None:
    """Build the detector and load its Latin-script models now (~1.5 s): at start-up, in a thread."""
    _build_detector().detect_language_of("What language is this? Quelle langue? Welche Sprache?")


_WORDY = re.compile(r"[^\W\d_]{2,}")


def detect_language(text: str) -> str | None:
    """The ISO 639-1 code of the language of `text`'s first LANGUAGE_CHARS characters (one of
    LANGUAGES), or None when it has no words to judge by or lingua cannot tell."""
    head = text[:LANGUAGE_CHARS]
    if not _WORDY.search(head):
        return None
    found = (_detector or _build_detector()).detect_language_of(head)
    return None if found is None else found.iso_code_639_1.name.lower()


_FENCE = re.compile(r"^\s*(```|~~~)", re.MULTILINE)
_KEYWORD_LINE = re.compile(
    r"^\s*(def |class |import |from \S+ import |return\b|if \(|for \(|while \(|elif |else:|try:|except\b|"
    r"function\b|const |let |var |public |private |protected |static |#include|#define|fn |func |package |"
    r"using |namespace |struct |enum |impl |pub |val |interface |SELECT |INSERT |UPDATE |DELETE |CREATE |"
    r"@\w+|//|/\*|\*/|<\?php|<script|<div|</)")
_CODE_END = re.compile(r"[;{}]\s*$|\)\s*:\s*$|=>\s*\{?\s*$")
_OPERATORS = re.compile(r"==|!=|->|=>|::|&&|\|\||\+=|-=|:=|\w\(\)|\w\[\w*\]|\w\.\w+\(")
_CODE_CHARS = frozenset("{}[]();=<>&|*/\\_#$")


def looks_like_code(text: str) -> bool:
    """Whether the text is (or holds) source code: a fenced block, or enough lines shaped like
    code (keywords at the start, `;`/`{`/`}` at the end, operators) with code punctuation dense
    enough; prose with a stray parenthesis or semicolon is not code."""
    head = text[:CODE_CHARS]
    if len(_FENCE.findall(head)) >= 2:  # an opened and closed fenced block
        return True
    lines = [ln for ln in head.splitlines() if ln.strip()]
    if not lines:
        return False
    codey = sum(1 for ln in lines if _KEYWORD_LINE.match(ln) or _CODE_END.search(ln)
                or len(_OPERATORS.findall(ln)) >= 2)
    density = sum(1 for ch in head if ch in _CODE_CHARS) / max(1, len(head))
    if len(lines) == 1:  # a one-liner: code only when it is plainly shaped like code
        return bool(codey) and density >= 0.06
    return codey >= 2 and codey / len(lines) >= 0.4 and density >= 0.03
