"""Fallback chains, first-token timeouts and breakers in the models config (lifecycle/models_config.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lockgate.lifecycle import models_config


def _load(tmp_path: Path, models: list[dict]) -> dict:
    p = tmp_path / "models.json"
    p.write_text(json.dumps({"models": models}))
    return models_config.load(str(p))[1]


def _m(name: str, **kw: object) -> dict:
    return {"name": name, "versions": [{"version": "v1"}], **kw}


def test_fallbacks_timeout_and_breaker_are_read(tmp_path: Path) -> None:
    settings = _load(tmp_path, [_m("a", fallbacks=["b-alias", "c"], first_token_timeout_s=1.5,
                                   breaker={"consecutive_failures": 2, "open_s": 3}),
                                _m("b", aliases=["b-alias"]), _m("c")])
    a = settings["a"]
    assert a.fallbacks == ["b-alias", "c"] and a.first_token_timeout_s == 1.5
    assert a.breaker.consecutive_failures == 2 and a.breaker.open_s == 3 and a.breaker.failure_rate == 0.5
    assert settings["b"].fallbacks == [] and settings["b"].breaker.enabled


@pytest.mark.parametrize("models,message", [
    ([_m("a", fallbacks=["nope"])], "model 'a': fallback 'nope' is not a model of this file"),
    ([_m("a", fallbacks=["a"])], "model 'a': falls back to itself"),
    ([_m("a", fallbacks=["b", "b"]), _m("b")], "fallback 'b' is listed twice"),
    ([_m("a", fallbacks=["b"]), _m("b", fallbacks=["c"]), _m("c", fallbacks=["a"])],
     "fallbacks form a cycle: a -> b -> c -> a"),
    ([_m("a", first_token_timeout_s=0)], "first_token_timeout_s"),
    ([_m("a", first_token_timeout_s=2**70)], "first_token_timeout_s"),
    ([_m("a", fallbacks=["b"] * 9), _m("b")], "fallbacks"),
    ([_m("a", breaker={"open_s": "soon"})], "breaker.open_s"),
])
def test_bad_fallback_config_is_refused_at_load(tmp_path: Path, models: list[dict], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        _load(tmp_path, models)
    assert str(e.value).startswith("--config ")
