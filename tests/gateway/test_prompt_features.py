"""Prompt features for router models (gateway/prompt_features.py): code detection on code in
several languages and on prose, language detection, token counts bounded on huge prompts, and
laziness (a feature no rule asks for is never computed)."""
from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from lockgate.gateway import prompt_features as pf
from lockgate.gateway.prompt_features import PromptFeatures, PromptText, count_tokens, detect_language, looks_like_code

PYTHON = '''def fib(n):
    if n < 2:
        return n
    return fib(n - 1) + fib(n - 2)

print(fib(10))
'''
JAVASCRIPT = '''const total = items.reduce((acc, x) => {
  return acc + x.price;
}, 0);
console.log(total);
'''
C = '''#include <stdio.h>
int main(void) {
    for (int i = 0; i < 10; i++) { printf("%d\\n", i); }
    return 0;
}
'''
SQL = '''SELECT name, COUNT(*) AS n
FROM orders o JOIN users u ON o.user_id = u.id
WHERE o.created_at > '2024-01-01'
GROUP BY name;
'''
FENCED = "Why does this fail?\n\n```\nx = [1, 2, 3]\nprint(x[3])\n```\n"
PROSE = [
    "Write me a short story about a lighthouse keeper who befriends a seagull. Make it warm and funny.",
    "Summarize the following article (about 300 words): The city council met on Tuesday; they voted to "
    "expand the bike lanes. Residents were pleased, though some shop owners worried about parking.",
    "What are three good reasons to learn a second language?\nPlease answer in bullet points.\nThanks!",
    "Dear team,\n\nThe meeting is moved to 3 pm (room B). Bring your notes; we'll review Q3 results.\n\nBest,\nAnna",
]


@pytest.mark.parametrize("code", [PYTHON, JAVASCRIPT, C, SQL, FENCED])
def test_code_is_code(code: str) -> None:
    assert looks_like_code(code)


@pytest.mark.parametrize("text", PROSE)
def test_prose_is_not_code(text: str) -> None:
    assert not looks_like_code(text)


def test_code_detection_reads_a_bounded_head() -> None:
    big = PROSE[0] + "\n" + PYTHON * 200_000  # ~17 MB: only the first CODE_CHARS characters are read
    t0 = time.perf_counter()
    assert not looks_like_code(PROSE[0] * 100 + PYTHON * 1000)  # code beyond the head is not seen
    looks_like_code(big)
    assert time.perf_counter() - t0 < 0.5


@pytest.mark.parametrize("text,lang", [
    ("What is the capital of France?", "en"),
    ("Quelle est la capitale de la France ?", "fr"),
    ("Kannst du mir bei den Hausaufgaben helfen?", "de"),
    ("¿Dónde está la biblioteca más cercana?", "es"),
    ("Привет, как у тебя дела сегодня?", "ru"),
])
def test_language(text: str, lang: str) -> None:
    assert detect_language(text) == lang


def test_language_none_without_words_and_fast_once_warm() -> None:
    assert detect_language("12345 + 678 = ?") is None
    assert detect_language("") is None
    pf.warm_language_detector()
    text = "Explique-moi la théorie de la relativité en termes simples, s'il te plaît. " * 100  # 7.5 KB
    detect_language(text)
    t0 = time.perf_counter()
    for _ in range(10):
        assert detect_language(text) == "fr"
    assert (time.perf_counter() - t0) / 10 < 0.02  # ~0.5 ms here: only the first LANGUAGE_CHARS are read


def test_count_tokens_exact_below_the_cap_and_estimated_beyond() -> None:
    calls: list[int] = []

    def encode(text: str) -> list[int]:  # one token per word
        calls.append(len(text))
        return text.split()

    assert count_tokens("one two three", encode) == 3
    huge = "word " * 2_000_000  # 10 MB
    n = count_tokens(huge, encode)
    assert calls[-1] == pf.TOKENIZE_CHARS  # only the head was tokenized
    assert abs(n - 2_000_000) / 2_000_000 < 0.01
    assert count_tokens("abcdefgh", None) == 2  # no tokenizer: 4 characters a token
    assert count_tokens("", encode) == 0


def test_features_are_lazy_and_computed_once() -> None:
    built: list[int] = []
    encoded: list[str] = []

    def prompt() -> PromptText:
        built.append(1)
        return PromptText(["hello world", "def f(x):\n    return x;\n"], "def f(x):\n    return x;\n")

    f = PromptFeatures(prompt, tenant_id="t1", tenant_name="acme", headers={"x-tier": "gold"},
                       encode=lambda t: encoded.append(t) or t.split())
    assert f.header("x-tier") == "gold" and f.tenant_name == "acme"
    assert built == []  # nothing about the prompt was needed yet
    assert f.is_code and f.is_code
    assert built == [1] and encoded == []
    assert f.prompt_tokens == f.prompt_tokens == 6  # both texts, joined
    assert len(encoded) == 1


def test_prompt_text_of_messages_and_prompts() -> None:
    msgs = [SimpleNamespace(role="system", content="You are helpful."),
            SimpleNamespace(role="user", content=[SimpleNamespace(type="text", text="Bonjour"),
                                                  SimpleNamespace(type="text", text="ça va ?")]),
            SimpleNamespace(role="assistant", content=None)]
    p = PromptText.of_messages(msgs)
    assert p.texts == ["You are helpful.", "Bonjour\nça va ?"] and p.focus == "Bonjour\nça va ?"
    assert PromptText.of_prompt("hi") == PromptText(["hi"], "hi")
    assert PromptText.of_prompt([1, 2, 3]).token_ids == 3
    batch = PromptText.of_prompt(["short", "a longer one", [5, 6, 7, 8]])
    assert batch.texts == ["a longer one"] and batch.focus == "short" and batch.token_ids == 4
    f = PromptFeatures(PromptText.of_prompt([1, 2, 3, 4, 5]), encode=lambda t: t.split())
    assert f.prompt_tokens == 5 and f.language is None and not f.is_code
