"""`lockgate eval-router`: a router model against one model on the bundled questions, offline on
the fake engine (the real tokenizer, no weights: the split and the token counts are the point,
not the answers); bad input exits 2 before any model loads."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lockgate.cli import app

FAKE = {"load_format": "fake", "fake_step_delay_s": 0.0, "num_kv_blocks": 256}


def write_config(tmp_path: Path) -> Path:
    cfg = {"models": [{"name": "small", "versions": [{"path": "default", "engine": FAKE}]},
                      {"name": "big", "versions": [{"path": "default", "engine": FAKE}]}],
           "routers": [{"name": "auto", "default": "small",
                        "rules": [{"name": "long", "when": {"min_prompt_tokens": 9}, "model": "big"}]}]}
    path = tmp_path / "models.json"
    path.write_text(json.dumps(cfg))
    return path


def test_router_against_one_model(tmp_path: Path) -> None:
    cfg = write_config(tmp_path)
    r = CliRunner().invoke(app, ["eval-router", "--config", str(cfg), "--router", "auto", "--against", "big",
                                 "--limit", "6", "--num-threads", "1", "--price", "small=1", "--price", "big=10"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout[r.stdout.index("{"):r.stdout.rindex("}") + 1])
    mine, theirs = report["router"], report["against"]
    assert mine["questions"] == theirs["questions"] == 6
    assert sum(mine["routed"].values()) == 6 and set(mine["routed"]) <= {"small@v1", "big@v1"}
    assert sum(mine["rules"].values()) == 6 and set(mine["rules"]) <= {"long", "default"}
    assert mine["routed"].get("big@v1", 0) == mine["rules"].get("long", 0)
    assert theirs["routed"] == {"big@v1": 6} and len(mine["routed"]) == 2  # the split uses both
    # every token priced at its model's price: the router's cost is below the big model's alone
    assert mine["cost_usd"] == pytest.approx(sum({"small@v1": 1, "big@v1": 10}[m] * n / 1e6
                                                 for m, n in mine["tokens"].items()))
    assert 0 < report["cost_ratio"] <= 1
    assert "accuracy" in r.stderr and "auto" in r.stderr


@pytest.mark.parametrize("args,message", [
    (["--router", "nope", "--against", "big"], "--router 'nope' is not a router"),
    (["--router", "auto", "--against", "huge"], "--against 'huge' is not a model"),
    (["--router", "auto", "--against", "big", "--price", "small"], "expected MODEL=USD_PER_MILLION_TOKENS"),
    (["--router", "auto", "--against", "big", "--price", "small=nan"], "expected MODEL=USD_PER_MILLION_TOKENS"),
    (["--router", "auto", "--against", "big", "--price", "tiny=1"], "--price names 'tiny'"),
    (["--router", "auto", "--against", "big", "--limit", "0"], "--limit must be >= 1"),
])
def test_bad_input_exits_2(tmp_path: Path, args: list[str], message: str) -> None:
    r = CliRunner().invoke(app, ["eval-router", "--config", str(write_config(tmp_path)), *args])
    assert r.exit_code == 2 and message in r.stderr, r.output
