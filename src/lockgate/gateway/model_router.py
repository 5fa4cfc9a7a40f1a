"""Router models: a served name that is a policy instead of a model (models config `routers:`).

    routers:
      - name: auto
        rules:
          - {name: code, when: {code: true}, model: coder}
          - {name: other-languages, when: {not_languages: [en]}, model: multi}
          - {name: long, when: {min_prompt_tokens: 2000}, model: long@v2}
        default: small

A request for `auto` goes to the model of the first rule whose conditions all hold (the
prompt's features, prompt_features.py: tokens, language, code; the tenant; a header), else
to `default`. The rules are checked strictly when the config loads (`parse_routers`); the
choice itself (`ModelRouter.choose`) is pure and computes only the features its rules ask for,
cheapest conditions first. A router never points at another router (no chains).
"""
from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lockgate.gateway.prompt_features import LANGUAGES, PromptFeatures

MAX_ROUTERS = 32
MAX_RULES = 64
MAX_TOKENS = 2**31  # prompt token bounds: far beyond any context
DEFAULT_RULE = "default"  # the rule name the ledger and metrics give the default
COSTLY = frozenset({"prompt_tokens", "language"})  # features worth computing off the event loop

_STRICT = ConfigDict(extra="forbid", strict=True)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")  # no '@' (versions) nor '/' (ROUTER/RULE in the ledger)
_HEADER = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # an HTTP token

Text = Annotated[str, Field(min_length=1, max_length=256)]


class WhenBody(BaseModel):
    """A rule's conditions; every one given must hold (none given: the rule always matches)."""

    model_config = _STRICT
    min_prompt_tokens: Annotated[int, Field(ge=0, le=MAX_TOKENS)] | None = None
    max_prompt_tokens: Annotated[int, Field(ge=0, le=MAX_TOKENS)] | None = None
    languages: Annotated[list[str], Field(min_length=1, max_length=len(LANGUAGES))] | None = None
    not_languages: Annotated[list[str], Field(min_length=1, max_length=len(LANGUAGES))] | None = None
    code: bool | None = None
    tenants: Annotated[list[Text], Field(min_length=1, max_length=256)] | None = None
    header: Annotated[dict[Annotated[str, Field(min_length=1, max_length=128)], Annotated[str, Field(max_length=1024)]],
                      Field(min_length=1, max_length=16)] | None = None

    @field_validator("languages", "not_languages")
    @classmethod
    def _known_languages(cls, v: list[str] | None) -> list[str] | None:
        for code in v or ():
            if code not in LANGUAGES:
                raise ValueError(f"unknown language {code!r}: ISO 639-1 codes, one of {', '.join(LANGUAGES)}")
        return v

    @field_validator("header")
    @classmethod
    def _header_names(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is None:
            return None
        for name in v:
            if not _HEADER.match(name):
                raise ValueError(f"{name!r} is not a valid header name")
        lowered = {k.lower(): val for k, val in v.items()}
        if len(lowered) != len(v):
            raise ValueError("a header is named twice (names ignore case)")
        return lowered

    @model_validator(mode="after")
    def _bounds(self) -> WhenBody:
        lo, hi = self.min_prompt_tokens, self.max_prompt_tokens
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"min_prompt_tokens ({lo}) is above max_prompt_tokens ({hi})")
        if self.languages and self.not_languages and set(self.languages) & set(self.not_languages):
            raise ValueError("a language is in both languages and not_languages")
        return self


class RuleBody(BaseModel):
    model_config = _STRICT
    name: Annotated[str, Field(min_length=1, max_length=64, pattern=_NAME.pattern)]
    when: WhenBody = Field(default_factory=WhenBody)
    model: Text


class RouterBody(BaseModel):
    model_config = _STRICT
    name: Annotated[str, Field(min_length=1, max_length=128, pattern=_NAME.pattern)]
    rules: Annotated[list[RuleBody], Field(max_length=MAX_RULES)] = Field(default_factory=list)
    default: Text | None = None


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    when: WhenBody
    model: str

    @property
    def needs(self) -> frozenset[str]:
        w, out = self.when, set()
        if w.min_prompt_tokens is not None or w.max_prompt_tokens is not None:
            out.add("prompt_tokens")
        if w.languages or w.not_languages:
            out.add("language")
        if w.code is not None:
            out.add("code")
        return frozenset(out)

    def matches(self, f: PromptFeatures) -> bool:
        """All conditions hold; the cheapest are checked first, so a failing one spares the rest."""
        w = self.when
        if w.tenants is not None and f.tenant_id not in w.tenants and f.tenant_name not in w.tenants:
            return False
        if w.header is not None and any(f.header(k) != v for k, v in w.header.items()):
            return False
        if w.code is not None and f.is_code != w.code:
            return False
        if w.min_prompt_tokens is not None or w.max_prompt_tokens is not None:
            n = f.prompt_tokens
            if (w.min_prompt_tokens is not None and n < w.min_prompt_tokens) or \
                    (w.max_prompt_tokens is not None and n > w.max_prompt_tokens):
                return False
        if w.languages is not None or w.not_languages is not None:
            lang = f.language  # None (not sure) matches no `languages` and every `not_languages`
            if w.languages is not None and lang not in w.languages:
                return False
            if w.not_languages is not None and lang in w.not_languages:
                return False
        return True

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "when": self.when.model_dump(exclude_none=True), "model": self.model}


@dataclass(frozen=True, slots=True)
class Choice:
    router: str
    rule: str  # DEFAULT_RULE for the default
    model: str  # a served name or NAME@VERSION

    @property
    def label(self) -> str:
        """The ledger's `router` column: ROUTER/RULE."""
        return f"{self.router}/{self.rule}"


@dataclass(slots=True)
class ModelRouter:
    name: str
    rules: list[Rule]
    default: str | None
    hits: dict[tuple[str, str], int] = field(default_factory=dict)  # (rule, model) -> requests routed
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def needs(self) -> frozenset[str]:
        return frozenset().union(*(r.needs for r in self.rules))

    @property
    def costly(self) -> bool:
        """Whether choosing may tokenize or detect a language: worth a worker thread."""
        return bool(self.needs & COSTLY)

    @property
    def models(self) -> set[str]:
        return {r.model for r in self.rules} | ({self.default} if self.default else set())

    def choose(self, features: PromptFeatures) -> Choice | None:
        """The first matching rule's model, else the default (None: neither). Pure: counts nothing."""
        for rule in self.rules:
            if rule.matches(features):
                return Choice(self.name, rule.name, rule.model)
        return Choice(self.name, DEFAULT_RULE, self.default) if self.default is not None else None

    def count(self, choice: Choice) -> None:
        """One request routed by `choice` (once it is known to be served: metrics and the admin view)."""
        key = (choice.rule, choice.model)
        with self._lock:  # `choose` may run on a worker thread; counting happens on the loop, but be safe
            self.hits[key] = self.hits.get(key, 0) + 1

    def to_json(self) -> dict[str, Any]:
        rule_hits: dict[str, int] = {}
        for (rule, _model), n in self.hits.items():
            rule_hits[rule] = rule_hits.get(rule, 0) + n
        return {"name": self.name, "router": True, "default": self.default,
                "rules": [{**r.to_json(), "hits": rule_hits.get(r.name, 0)} for r in self.rules],
                "default_hits": rule_hits.get(DEFAULT_RULE, 0), "requests": sum(rule_hits.values())}


@dataclass(slots=True)
class RouterSet:
    """Every router of a server, by served name."""

    routers: dict[str, ModelRouter] = field(default_factory=dict)

    def get(self, name: str | None) -> ModelRouter | None:
        return self.routers.get(name) if name is not None else None

    def __len__(self) -> int:
        return len(self.routers)

    @property
    def needs(self) -> frozenset[str]:
        return frozenset().union(*(r.needs for r in self.routers.values()))

    def to_json(self) -> list[dict[str, Any]]:
        return [r.to_json() for r in self.routers.values()]


def parse_routers(raw: Any, known: Callable[[str], bool], served: Iterable[str]) -> RouterSet:
    """The config's `routers:` list, checked: `known(ref)` says whether a rule's model (a served
    name or NAME@VERSION) exists; `served` are the models' served names and aliases (a router may
    not take one). ValueError naming the router and the rule."""
    if raw is None:
        return RouterSet()
    if not isinstance(raw, list):
        raise ValueError("routers: expected a list of {name, rules, default}")
    if len(raw) > MAX_ROUTERS:
        raise ValueError(f"routers: at most {MAX_ROUTERS} routers")
    served = set(served)
    names = [b.get("name") if isinstance(b, dict) else None for b in raw]
    out = RouterSet()
    for i, item in enumerate(raw):
        body = _validate(i, item)
        where = f"router {body.name!r}"
        if body.name in out.routers:
            raise ValueError(f"{where} is listed twice")
        if body.name in served:
            raise ValueError(f"{where}: the name is a served model's (a router needs a name of its own)")
        if not body.rules and body.default is None:
            raise ValueError(f"{where}: it has no rules and no default: give at least one")
        seen: set[str] = set()
        for rule in body.rules:
            if rule.name in seen or rule.name == DEFAULT_RULE:
                why = "is listed twice" if rule.name in seen else "is reserved for the router's default"
                raise ValueError(f"{where} rule {rule.name!r}: the name {why}")
            seen.add(rule.name)
            _check_target(f"{where} rule {rule.name!r}", rule.model, names, known)
        if body.default is not None:
            _check_target(f"{where} default", body.default, names, known)
        out.routers[body.name] = ModelRouter(body.name, [Rule(r.name, r.when, r.model) for r in body.rules],
                                             body.default)
    return out


def _check_target(where: str, ref: str, routers: list[Any], known: Callable[[str], bool]) -> None:
    if ref in routers:
        raise ValueError(f"{where}: model {ref!r} is a router (a router's models must be models: no chains)")
    if not known(ref):
        raise ValueError(f"{where}: unknown model {ref!r} (a served name or NAME@VERSION of this config's models)")


def _validate(i: int, item: Any) -> RouterBody:
    """One router's body, or a ValueError naming it (and its rule) and the field."""
    try:
        return RouterBody.model_validate(item)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        loc = list(err.get("loc", ()))
        name = item.get("name") if isinstance(item, dict) else None
        where = f"router {name!r}" if isinstance(name, str) and len(name) <= 128 else f"routers.{i}"
        if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
            rules = item.get("rules") if isinstance(item, dict) else None
            rule = rules[loc[1]] if isinstance(rules, list) and loc[1] < len(rules) else None
            rname = rule.get("name") if isinstance(rule, dict) else None
            where += f" rule {rname!r}" if isinstance(rname, str) and len(rname) <= 64 else f" rules.{loc[1]}"
            loc = loc[2:]
        field_path = ".".join(str(x) for x in loc)
        msg = err.get("msg", "invalid value")
        raise ValueError(f"{where}: {field_path + ': ' if field_path else ''}{msg}") from None
