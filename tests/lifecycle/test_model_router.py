"""Router models without a server: the models config's `routers:` checked strictly at load
(errors name the router and the rule), and the pure choice of a model from a request's features."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lockgate.gateway.model_router import DEFAULT_RULE, Choice, ModelRouter, parse_routers
from lockgate.gateway.prompt_features import PromptFeatures, PromptText
from lockgate.lifecycle import models_config
from lockgate.lifecycle.build import plan_from_args

MODELS = [{"name": "small", "versions": [{"version": "v1"}]},
          {"name": "coder", "aliases": ["code-model"], "versions": [{"version": "v1"}, {"version": "v2"}]},
          {"name": "multi", "versions": [{}]}]
AUTO = {"name": "auto", "default": "small", "rules": [
    {"name": "code", "when": {"code": True}, "model": "coder@v2"},
    {"name": "vip", "when": {"tenants": ["acme"], "header": {"X-Tier": "gold"}}, "model": "multi"},
    {"name": "other-languages", "when": {"not_languages": ["en"], "max_prompt_tokens": 1000}, "model": "multi"},
    {"name": "long", "when": {"min_prompt_tokens": 50}, "model": "code-model"},
]}


def write(tmp_path: Path, routers: Any, models: Any = None, yaml: bool = False) -> str:
    body = {"models": models or MODELS, "routers": routers}
    f = tmp_path / ("m.yaml" if yaml else "m.json")
    if yaml:
        import yaml as y

        f.write_text(y.safe_dump(body))
    else:
        f.write_text(json.dumps(body))
    return str(f)


def routers_of(tmp_path: Path, routers: Any) -> Any:
    path = write(tmp_path, routers)
    specs, _ = models_config.load(path)
    return models_config.load_routers(path, specs)


def test_config_loads_routers_yaml_and_into_the_plan(tmp_path: Path) -> None:
    path = write(tmp_path, [AUTO], yaml=True)
    plan = plan_from_args([], path, [])
    assert plan is not None
    auto = plan.routers.get("auto")
    assert auto is not None and auto.default == "small"
    assert [r.name for r in auto.rules] == ["code", "vip", "other-languages", "long"]
    assert auto.rules[1].when.header == {"x-tier": "gold"}  # header names ignore case
    assert auto.needs == {"code", "language", "prompt_tokens"} and auto.costly
    assert auto.models == {"small", "coder@v2", "multi", "code-model"}
    # a rule may also name a --model given beside the config
    path = write(tmp_path, [{"name": "r", "rules": [{"name": "x", "when": {}, "model": "extra"}]}])
    plan = plan_from_args(["extra=default"], path, [])
    assert plan is not None and plan.routers.get("r") is not None
    assert models_config.load_routers(write(tmp_path, None), []).routers == {}  # no routers: none


@pytest.mark.parametrize("routers,message", [
    ([{**AUTO, "rules": [{"name": "x", "model": "nope"}]}], "router 'auto' rule 'x': unknown model 'nope'"),
    ([{**AUTO, "default": "coder@v9"}], "router 'auto' default: unknown model 'coder@v9'"),
    ([{"name": "small", "default": "coder"}], "router 'small': the name is a served model's"),
    ([{"name": "code-model", "default": "coder"}], "router 'code-model': the name is a served model's"),
    ([AUTO, {**AUTO}], "router 'auto' is listed twice"),
    ([{**AUTO, "rules": [AUTO["rules"][0], AUTO["rules"][0]]}], "router 'auto' rule 'code': the name is listed twice"),
    ([{**AUTO, "rules": [{"name": "default", "model": "small"}]}], "rule 'default': the name is reserved"),
    ([{**AUTO, "rules": [{"name": "x", "when": {"colour": "red"}, "model": "small"}]}],
     "router 'auto' rule 'x': when.colour: Extra inputs are not permitted"),
    ([{**AUTO, "rules": [{"name": "x", "when": {"min_prompt_tokens": "10"}, "model": "small"}]}],
     "router 'auto' rule 'x': when.min_prompt_tokens: Input should be a valid integer"),
    ([{**AUTO, "rules": [{"name": "x", "when": {"code": "yes"}, "model": "small"}]}],
     "rule 'x': when.code: Input should be a valid boolean"),
    ([{**AUTO, "rules": [{"name": "x", "when": {"languages": ["french"]}, "model": "small"}]}],
     "rule 'x': when.languages: Value error, unknown language 'french'"),
    ([{**AUTO, "rules": [{"name": "x", "when": {"min_prompt_tokens": 9, "max_prompt_tokens": 3}, "model": "small"}]}],
     "min_prompt_tokens \\(9\\) is above max_prompt_tokens \\(3\\)"),
    ([{**AUTO, "rules": [{"name": "x", "when": {"header": {"bad header": "v"}}, "model": "small"}]}],
     "'bad header' is not a valid header name"),
    ([{**AUTO, "rules": [{"name": "x", "when": {"min_prompt_tokens": 2**80}, "model": "small"}]}],
     "rule 'x': when.min_prompt_tokens: Input should be less than or equal to"),
    ([{"name": "r1", "default": "r2"}, {"name": "r2", "default": "small"}], "router 'r1' default: model 'r2' is a router"),
    ([{"name": "r1", "rules": [{"name": "x", "model": "r1"}]}], "router 'r1' rule 'x': model 'r1' is a router"),
    ([{"name": "empty"}], "router 'empty': it has no rules and no default"),
    ([{"name": "auto@v1", "default": "small"}], "router 'auto@v1': name: String should match pattern"),
    ([{"name": "auto", "default": "small", "extra": 1}], "router 'auto': extra: Extra inputs are not permitted"),
    ([{"name": "auto", "rules": "all", "default": "small"}], "router 'auto': rules: Input should be a valid list"),
    ([{**AUTO, "rules": [{"name": "x", "when": {}}]}], "router 'auto' rule 'x': model: Field required"),
    (["auto"], "routers.0: Input should be a valid dictionary"),
    ({"auto": AUTO}, "routers: Input should be a valid list"),
])
def test_config_errors_name_the_router_and_rule(tmp_path: Path, routers: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        routers_of(tmp_path, routers)
    assert str(info.value).startswith("--config ")


def feats(text: str = "Hello, how are you today?", tenant: str | None = None, headers: dict[str, str] | None = None,
          tokens: int | None = None) -> PromptFeatures:
    encode = (lambda t: [0] * tokens) if tokens is not None else (lambda t: t.split())
    return PromptFeatures(PromptText([text], text), tenant_id="t-" + (tenant or "x"), tenant_name=tenant,
                          headers=headers or {}, encode=encode)


def test_choose_first_matching_rule_else_default(tmp_path: Path) -> None:
    auto: ModelRouter = routers_of(tmp_path, [AUTO]).get("auto")
    assert auto.choose(feats()) == Choice("auto", DEFAULT_RULE, "small")
    assert auto.choose(feats("def f(x):\n    return x + 1;\n\nprint(f(2));")).model == "coder@v2"
    assert auto.choose(feats("Quelle est la capitale de la France ?")) == Choice("auto", "other-languages", "multi")
    # a non-English prompt over the rule's max_prompt_tokens: on to the long-prompt rule
    assert auto.choose(feats("Quelle est la capitale de la France ?", tokens=5000)).rule == "long"
    assert auto.choose(feats(tokens=50)).model == "code-model"
    assert auto.choose(feats(tokens=49)).rule == DEFAULT_RULE
    # both of the vip rule's conditions must hold: tenant (name or id) and header
    assert auto.choose(feats(tenant="acme", headers={"x-tier": "gold"})).rule == "vip"
    assert auto.choose(feats(tenant="acme", headers={"x-tier": "silver"})).rule == DEFAULT_RULE
    assert auto.choose(feats(tenant="other", headers={"x-tier": "gold"})).rule == DEFAULT_RULE
    by_id = PromptFeatures(PromptText(["hi there friend"], "hi there friend"), tenant_id="acme", headers={"x-tier": "gold"})
    assert auto.choose(by_id).rule == "vip"
    assert auto.hits == {}  # choosing is pure; counting is the caller's once the request is served
    c = auto.choose(feats())
    assert c is not None
    auto.count(c)
    auto.count(c)
    view = auto.to_json()
    assert view["default_hits"] == 2 and view["requests"] == 2 and view["rules"][0]["hits"] == 0


def test_only_asked_features_are_computed(tmp_path: Path) -> None:
    routers = routers_of(tmp_path, [{"name": "by-tenant", "default": "small",
                                     "rules": [{"name": "t", "when": {"tenants": ["acme"]}, "model": "multi"}]}])
    r = routers.get("by-tenant")
    assert not r.costly  # chosen on the event loop: nothing to tokenize or detect

    def boom() -> PromptText:
        raise AssertionError("the prompt was read")

    assert r.choose(PromptFeatures(boom, tenant_name="acme")).model == "multi"
    assert r.choose(PromptFeatures(boom, tenant_name="zeta")).model == "small"


def test_no_rule_and_no_default_chooses_nothing() -> None:
    routers = parse_routers([{"name": "r", "rules": [{"name": "code", "when": {"code": True}, "model": "m"}]}],
                            {"m"}.__contains__, {"m"})
    r = routers.get("r")
    assert r.choose(feats("def f():\n    return 1;\nx = f();")).model == "m"
    assert r.choose(feats("just words here")) is None
