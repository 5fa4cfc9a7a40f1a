"""What each request asks for: prompt, output length, tenant, shared prefix, whether the client cancels it.

Synthetic prompts are common English words that are one token each (with their
leading space) in the usual BPE vocabularies (GPT-2, Llama 3, Qwen, SmolLM), so
N words are about N tokens and no tokenizer is needed. Request i is a pure
function of (seed, i): the same seed gives the same requests in any load shape.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lockgate.bench.tenants import DEFAULT, Tenant, pick

LEN_DISTS = ("fixed", "uniform", "lognormal")
UNIFORM_SPREAD = 0.5    # uniform lengths lie in [N (1 - s), N (1 + s)], mean N
LOGNORMAL_SIGMA = 0.9   # a ShareGPT-like long tail; mu is chosen so that the mean is N
LOGNORMAL_CAP = 8       # lengths above 8 N are clipped

WORDS = """
about add after against air all allow also an and animal another answer any appear are area as at
back be because been before being believe between bird black blue body book both bright bring build
but buy by came can car case center change city clear cold color come company consider continue cost
could course create cut dark day deep did die do door down each early easy end even expect face fact
fall family field fire first floor follow food for form free friend from full game garden get girl
glass go good great green group grow hand happen happy has have he head health hear heart heavy her
here his home horse house how idea if in include into is it its job just kill kind know land
language large last lead learn letter level life light like line little live local long lose lot
love made make man many market may me meet men might mind money more morning most move much music
must my name never new night no not now number of off offer office old on one only open or order
other our out over own paper part party pay people place plan play point power provide public
question quick quiet rate reach read reason red remain remember report right river road room run
said same school see send serve service set she ship short should show side simple since sit small
so soft some speak spend stand start state stay still stone stop story street strong such summer sun
table take team than that the their them then there these they thing this those three through time
to too tree turn two under understand up us used very voice wait walk warm was watch water way we
week well were what when where which while white wide will window winter with word work world would
write year years you your
""".split()


class WorkloadError(ValueError):
    """A bad workload option or prompts file."""


@dataclass(slots=True)
class PromptItem:
    """One line of a prompts file: a prompt or chat messages, optionally its own max_tokens."""
    prompt: str | None
    messages: list[dict[str, Any]] | None
    max_tokens: int | None


@dataclass(slots=True)
class RequestSpec:
    index: int
    prompt: str | None                       # completions text (None when only messages were given)
    messages: list[dict[str, Any]] | None    # chat messages (None for synthetic prompts)
    max_tokens: int
    tenant: Tenant
    cancel_after: int = 0    # >0: close the stream after this many content chunks
    prefix_group: int = -1   # -1: no shared prefix


@dataclass(slots=True)
class WorkloadConfig:
    input_len: int = 256
    output_len: int = 128
    len_dist: str = "fixed"
    prompts: list[PromptItem] | None = None
    prefix_groups: int = 0
    prefix_len: int = 0
    tenants: list[Tenant] = field(default_factory=lambda: [DEFAULT])
    cancel_fraction: float = 0.0
    seed: int = 0
    phase: int = 0   # sweep probes get their own requests (no prompt repeats into the prefix cache)


def sample_len(mean: int, kind: str, rng: random.Random) -> int:
    """A length >= 1 with the given mean (before clipping)."""
    if kind == "fixed":
        return mean
    if kind == "uniform":
        return rng.randint(max(1, round(mean * (1 - UNIFORM_SPREAD))), max(1, round(mean * (1 + UNIFORM_SPREAD))))
    if kind == "lognormal":
        mu = math.log(mean) - LOGNORMAL_SIGMA ** 2 / 2
        return max(1, min(LOGNORMAL_CAP * mean, round(rng.lognormvariate(mu, LOGNORMAL_SIGMA))))
    raise WorkloadError(f"unknown length distribution {kind!r}; expected one of {', '.join(LEN_DISTS)}")


def words(n: int, rng: random.Random) -> str:
    """About n tokens of plain text."""
    return " ".join(rng.choices(WORDS, k=n))


def load_prompts(path: str) -> list[PromptItem]:
    """A JSONL file: each line {"prompt": str} or {"messages": [...]}, with an optional "max_tokens"."""
    p = Path(path)
    try:
        lines = p.read_text().splitlines()
    except FileNotFoundError:
        raise WorkloadError(f"--prompts: no such file: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise WorkloadError(f"--prompts {path}: cannot read it ({e})") from None
    items: list[PromptItem] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"--prompts {path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise WorkloadError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise WorkloadError(f"{where}: expected an object")
        prompt, messages, mt = obj.get("prompt"), obj.get("messages"), obj.get("max_tokens")
        if (prompt is None) == (messages is None):
            raise WorkloadError(f"{where}: give exactly one of \"prompt\" or \"messages\"")
        if prompt is not None and (not isinstance(prompt, str) or not prompt):
            raise WorkloadError(f"{where}: \"prompt\" must be a non-empty string")
        if messages is not None and not (isinstance(messages, list) and messages and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) for m in messages)):
            raise WorkloadError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}}")
        if mt is not None and (not isinstance(mt, int) or isinstance(mt, bool) or mt < 1):
            raise WorkloadError(f"{where}: \"max_tokens\" must be an integer >= 1")
        items.append(PromptItem(prompt, messages, mt))
    if not items:
        raise WorkloadError(f"--prompts {path}: the file holds no prompts")
    return items


class Workload:
    def __init__(self, cfg: WorkloadConfig) -> None:
        self.cfg = cfg
        self._prefixes = [words(cfg.prefix_len, random.Random(f"{cfg.seed}:prefix:{g}"))
                          for g in range(cfg.prefix_groups)]
        self._order: list[int] = []
        if cfg.prompts:
            self._order = list(range(len(cfg.prompts)))
            random.Random(f"{cfg.seed}:order").shuffle(self._order)

    def spec(self, i: int) -> RequestSpec:
        c = self.cfg
        rng = random.Random(f"{c.seed}:{c.phase}:{i}")
        tenant = pick(c.tenants, rng)
        group = rng.randrange(c.prefix_groups) if c.prefix_groups else -1
        if c.prompts:
            item = c.prompts[self._order[i % len(self._order)]]
            prompt, messages = item.prompt, item.messages
            max_tokens = item.max_tokens or sample_len(c.output_len, c.len_dist, rng)
        else:
            prompt, messages = words(sample_len(c.input_len, c.len_dist, rng), rng), None
            max_tokens = sample_len(c.output_len, c.len_dist, rng)
        if group >= 0:
            prefix = self._prefixes[group]
            if prompt is not None:
                prompt = f"{prefix} {prompt}"
            if messages is not None:  # the shared part as a system message, ahead of the conversation
                messages = [{"role": "system", "content": prefix}, *messages]
        cancel = 0
        if c.cancel_fraction > 0 and max_tokens >= 2 and rng.random() < c.cancel_fraction:
            cancel = rng.randint(1, max_tokens - 1)
        return RequestSpec(i, prompt, messages, max_tokens, tenant, cancel, group)
