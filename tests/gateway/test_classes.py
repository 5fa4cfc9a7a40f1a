"""Priority classes: defaults, config files (YAML and JSON), and every bad config refused clearly."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lockgate.gateway.classes import DEFAULT_CLASS_NAMES, ClassTable

GOOD = {"default": "std", "classes": [
    {"name": "rt", "ttft_p95_s": 0.2, "tpot_p95_s": 0.05, "max_queued": 8},
    {"name": "std", "ttft_p95_s": 1, "tpot_p95_s": 0.2},
    {"name": "bulk", "ttft_p95_s": 60, "tpot_p95_s": 2, "max_queued": 10000, "objective": 0.5},
]}


def test_defaults_are_three_classes_in_rank_order() -> None:
    t = ClassTable()
    assert t.names == DEFAULT_CLASS_NAMES == ("interactive", "standard", "batch")
    assert [c.rank for c in t.classes] == [0, 1, 2]
    assert t.default.name == "standard"
    assert t.classes[0].ttft_s < t.classes[1].ttft_s < t.classes[2].ttft_s
    # Engine priority values past either end fall in the first or last class.
    assert t.of_priority(-7).name == "interactive" and t.of_priority(99).name == "batch"
    assert t.of_priority(1).name == "standard"


def test_met_checks_both_targets() -> None:
    c = ClassTable().get("interactive")
    assert c is not None
    assert c.met(0.1, 0.05)
    assert not c.met(0.6, 0.05)
    assert not c.met(0.1, 0.5)
    assert not c.met(None, None)  # never produced a token
    assert c.met(0.1, None)  # one output token: no TPOT


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_load_from_file(tmp_path: Path, suffix: str) -> None:
    p = tmp_path / f"classes{suffix}"
    if suffix == ".json":
        p.write_text(json.dumps(GOOD))
    else:
        import yaml
        p.write_text(yaml.safe_dump(GOOD))
    t = ClassTable.load(p)
    assert t.names == ("rt", "std", "bulk")
    assert t.default.name == "std"
    rt = t.get("rt")
    assert rt is not None and rt.ttft_s == 0.2 and rt.max_queued == 8 and rt.objective == 0.99
    bulk = t.get("bulk")
    assert bulk is not None and bulk.objective == 0.5


def _bad(data: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ClassTable.from_dict(data)


def test_bad_configs_are_refused_with_the_reason() -> None:
    _bad([], "expected a mapping")
    _bad({"classes": []}, "at least one")
    _bad({"classes": GOOD["classes"], "extra": 1}, "unknown keys")
    _bad({"classes": [{"name": "Bad Name", "ttft_p95_s": 1, "tpot_p95_s": 1}]}, "'name' must match")
    _bad({"classes": [{"name": "a", "ttft_p95_s": 0, "tpot_p95_s": 1}]}, "ttft_p95_s")
    _bad({"classes": [{"name": "a", "ttft_p95_s": float("nan"), "tpot_p95_s": 1}]}, "ttft_p95_s")
    _bad({"classes": [{"name": "a", "ttft_p95_s": 2**70, "tpot_p95_s": 1}]}, "ttft_p95_s")
    _bad({"classes": [{"name": "a", "ttft_p95_s": True, "tpot_p95_s": 1}]}, "ttft_p95_s")
    _bad({"classes": [{"name": "a", "ttft_p95_s": 1, "tpot_p95_s": 1, "max_queued": 0}]}, "max_queued")
    _bad({"classes": [{"name": "a", "ttft_p95_s": 1, "tpot_p95_s": 1, "colour": 1}]}, "unknown keys")
    _bad({"classes": [{"name": "a", "ttft_p95_s": 1, "tpot_p95_s": 1}] * 2}, "unique")
    _bad({"default": "nope", "classes": GOOD["classes"]}, "default class")
    _bad({"classes": [{"name": f"c{i}", "ttft_p95_s": 1, "tpot_p95_s": 1} for i in range(17)]}, "at most 16")


def test_unreadable_or_unparsable_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        ClassTable.load(tmp_path / "missing.json")
    p = tmp_path / "broken.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="does not parse"):
        ClassTable.load(p)
