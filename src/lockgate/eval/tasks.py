"""Evaluation tasks for `lockgate eval --task`: bundled ones (written for lockgate) or the user's JSONL.

Two kinds, the two that lm-evaluation-harness runs over an OpenAI-compatible server:

- multiple choice (`{"context", "choices": [...], "gold": index}` a line): each choice is
  scored by its log-likelihood after the context (the engine's prompt logprobs); the answer
  is the most likely choice (`acc`), or the most likely per character (`acc_norm`). The
  continuation is the target delimiter (a space) and the choice, as lm-eval builds it.
- generate until (`{"question", "answers": [...]}` a line): the question asked as chat,
  a greedy reply up to `max_gen_toks` tokens or a stop string; correct when it contains
  an accepted answer (case-insensitive).

Bundled: `lockgate_mc` (32 four-way questions: arithmetic and everyday facts) and
`lockgate_qa` (the 20 questions `lockgate eval` asks by default).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from lockgate.eval.data import Question, jsonl_values

MULTIPLE_CHOICE = "multiple_choice"
GENERATE_UNTIL = "generate_until"
TaskKind = Literal["multiple_choice", "generate_until"]
MAX_ITEMS = 10_000
MAX_CHOICES = 26
TARGET_DELIMITER = " "  # between a context and a choice (lm-eval's default)
MAX_GEN_TOKS = 24  # a reply to a question: the accepted answer comes first in a short reply
UNTIL = ["\n\n"]  # stop strings of a reply (a short answer ends before a blank line)

BUNDLED: dict[str, tuple[str, TaskKind]] = {
    "lockgate_mc": ("mc.jsonl", MULTIPLE_CHOICE),
    "lockgate_qa": ("questions.jsonl", GENERATE_UNTIL),
}


@dataclass(slots=True)
class ChoiceItem:
    context: str
    choices: list[str]
    gold: int


@dataclass(slots=True)
class Task:
    name: str
    kind: TaskKind
    source: str  # "bundled <file>" or the user's path
    items: list[ChoiceItem] = field(default_factory=list)  # multiple choice
    questions: list[Question] = field(default_factory=list)  # generate until
    target_delimiter: str = TARGET_DELIMITER
    max_gen_toks: int = MAX_GEN_TOKS
    until: list[str] = field(default_factory=lambda: list(UNTIL))

    def __len__(self) -> int:
        return len(self.items) if self.kind == MULTIPLE_CHOICE else len(self.questions)

    def head(self, limit: int | None) -> Task:
        """The first `limit` items (all with None)."""
        if limit is None:
            return self
        return Task(self.name, self.kind, self.source, self.items[:limit], self.questions[:limit],
                    self.target_delimiter, self.max_gen_toks, list(self.until))

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "source": self.source, "items": len(self)}
        if self.kind == MULTIPLE_CHOICE:
            out["target_delimiter"] = self.target_delimiter
        else:
            out.update(max_gen_toks=self.max_gen_toks, until=self.until)
        return out


def _lines(text: str, source: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for where, obj in jsonl_values(text, source):
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object")
        out.append((where, obj))
        if len(out) > MAX_ITEMS:
            raise ValueError(f"{source}: more than {MAX_ITEMS} items")
    if not out:
        raise ValueError(f"{source}: no items")
    return out


def _choice_item(where: str, obj: dict[str, Any]) -> ChoiceItem:
    context, choices, gold = obj.get("context"), obj.get("choices"), obj.get("gold")
    if not isinstance(context, str) or not context.strip():
        raise ValueError(f"{where}: `context` must be a non-empty string")
    if not (isinstance(choices, list) and 2 <= len(choices) <= MAX_CHOICES
            and all(isinstance(c, str) and c for c in choices)):
        raise ValueError(f"{where}: `choices` must be a list of 2 to {MAX_CHOICES} non-empty strings")
    if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(choices):
        raise ValueError(f"{where}: `gold` must be the index of the right choice (0 to {len(choices) - 1})")
    return ChoiceItem(context, list(choices), gold)


def _question(where: str, obj: dict[str, Any]) -> Question:
    question, answers = obj.get("question"), obj.get("answers")
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: `question` must be a non-empty string")
    if not (isinstance(answers, list) and answers and all(isinstance(a, str) and a for a in answers)):
        raise ValueError(f"{where}: `answers` must be a non-empty list of non-empty strings")
    return Question(question, [a.lower() for a in answers])


def parse_task(text: str, name: str, source: str) -> Task:
    """A task from JSONL; its kind from the first item's fields. ValueError naming the line."""
    lines = _lines(text, source)
    first = lines[0][1]
    if "choices" in first:
        return Task(name, MULTIPLE_CHOICE, source, items=[_choice_item(w, o) for w, o in lines])
    if "question" in first:
        return Task(name, GENERATE_UNTIL, source, questions=[_question(w, o) for w, o in lines])
    raise ValueError(f"{lines[0][0]}: expected a multiple-choice item (context, choices, gold) "
                     "or a question (question, answers)")


def load_task(spec: str) -> Task:
    """A bundled task by name, or a JSONL file (its name is the file's stem)."""
    if spec in BUNDLED:
        file, kind = BUNDLED[spec]
        text = resources.files("lockgate.eval").joinpath("data", file).read_text(encoding="utf-8")
        task = parse_task(text, spec, f"bundled {file}")
        assert task.kind == kind, spec
        return task
    p = Path(spec).expanduser()
    if not p.is_file():
        raise ValueError(f"--task {spec!r}: neither a bundled task ({', '.join(BUNDLED)}) nor a file")
    return parse_task(p.read_text(encoding="utf-8"), p.stem, spec)


def write_jsonl(task: Task, path: str | Path) -> Path:
    """The task's items as JSONL in the same fields (for a client tool's local data files)."""
    p = Path(path)
    if task.kind == MULTIPLE_CHOICE:
        rows: list[dict[str, Any]] = [{"context": i.context, "choices": i.choices, "gold": i.gold} for i in task.items]
    else:
        rows = [{"question": q.question, "answers": q.answers} for q in task.questions]
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return p
