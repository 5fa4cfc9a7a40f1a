"""The evaluation sets: bundled with the package (written for lockgate, small), or the user's.

- prompts: chat (`{"messages": [...]}`) or plain (`{"prompt": "..."}`) prompts, one JSON
  object a line, for greedy agreement between two models;
- questions: `{"question", "answers": [accepted substrings, lower case]}`, asked as chat;
  an answer is correct when it contains one of them (case-insensitive);
- passage: an English text for perplexity.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from lockgate.engine.tokenizer import Tokenizer

MAX_PROMPTS = 10_000
MAX_LINE_CHARS = 100_000


@dataclass(slots=True)
class Prompt:
    messages: list[dict[str, Any]] | None = None  # chat
    text: str | None = None  # plain completion


@dataclass(slots=True)
class Question:
    question: str
    answers: list[str] = field(default_factory=list)

    def correct(self, reply: str) -> bool:
        low = reply.lower()
        return any(a.lower() in low for a in self.answers)


def _bundled(name: str) -> str:
    return resources.files("lockgate.eval").joinpath("data", name).read_text(encoding="utf-8")


def jsonl_values(text: str, source: str) -> Iterator[tuple[str, Any]]:
    """Each non-blank line of a JSONL text as (`source:line`, its JSON value); ValueError naming
    the line for one too long or not JSON."""
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source}:{n}"
        if len(line) > MAX_LINE_CHARS:
            raise ValueError(f"{where}: line longer than {MAX_LINE_CHARS} characters")
        try:
            yield where, json.loads(line)
        except ValueError as e:
            raise ValueError(f"{where}: not JSON ({e})") from None


def parse_prompts(text: str, source: str) -> list[Prompt]:
    """JSONL prompts; ValueError naming the file and line for anything else."""
    out: list[Prompt] = []
    for where, obj in jsonl_values(text, source):
        if isinstance(obj, str):
            obj = {"prompt": obj}
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected an object with `prompt` or `messages`")
        if isinstance(obj.get("prompt"), str) and obj["prompt"]:
            out.append(Prompt(text=obj["prompt"]))
        elif isinstance(obj.get("messages"), list) and obj["messages"] and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in obj["messages"]):
            out.append(Prompt(messages=[{"role": m["role"], "content": m["content"]} for m in obj["messages"]]))
        else:
            raise ValueError(f"{where}: expected a non-empty `prompt` string or a `messages` list of "
                             "{role, content} strings")
        if len(out) > MAX_PROMPTS:
            raise ValueError(f"{source}: more than {MAX_PROMPTS} prompts")
    if not out:
        raise ValueError(f"{source}: no prompts")
    return out


def encode_prompts(tok: Tokenizer, prompts: list[Prompt]) -> list[list[int]]:
    """Token ids per prompt: chat messages through the template (it has the special tokens), text as is."""
    out = []
    for p in prompts:
        if p.messages is not None:
            out.append(tok.encode(tok.apply_chat_template(p.messages, add_generation_prompt=True),
                                  add_special_tokens=False))
        else:
            out.append(tok.encode(p.text or "", add_special_tokens=True))
    return out


def load_prompts(path: str | None = None) -> list[Prompt]:
    if path is None:
        return parse_prompts(_bundled("prompts.jsonl"), "bundled prompts.jsonl")
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--prompts {path!r}: no such file")
    return parse_prompts(p.read_text(encoding="utf-8"), path)


def load_questions() -> list[Question]:
    out = []
    for line in _bundled("questions.jsonl").splitlines():
        if line.strip():
            obj = json.loads(line)
            out.append(Question(obj["question"], [a.lower() for a in obj["answers"]]))
    return out


def load_passage() -> str:
    return _bundled("passage.txt")
