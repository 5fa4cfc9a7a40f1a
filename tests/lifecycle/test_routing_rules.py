"""Routing, specs, config files, rollback rules and comparison figures: pure functions, no engine."""
from __future__ import annotations

import collections
import json
import re
from pathlib import Path

import pytest

from lockgate.engine.config import EngineConfig
from lockgate.eval.agreement import first_tokens_match, token_agreement
from lockgate.gateway.routing import pick, split_ref, sticky_point
from lockgate.lifecycle import models_config, rollback
from lockgate.lifecycle.build import plan_from_args
from lockgate.lifecycle.settings import RollbackRules, check_traffic
from lockgate.lifecycle.spec import VersionSpec, check_replicas, engine_options, parse_model_arg, validate
from lockgate.lifecycle.stats import Outcome, Pair, ShadowStats, VersionStats


def test_split_ref_takes_the_last_at() -> None:
    assert split_ref("smol@v2") == ("smol", "v2")
    assert split_ref("org@x@v1") == ("org@x", "v1")
    assert split_ref("smol") == ("smol", None)
    assert split_ref("@v1") == ("@v1", None) and split_ref("smol@") == ("smol@", None)


def test_split_follows_weights_and_is_sticky() -> None:
    keys = [f"user-{i}" for i in range(4000)]
    counts = collections.Counter(pick({"v1": 90, "v2": 10}, sticky_point("m", k)) for k in keys)
    assert 0.07 < counts["v2"] / len(keys) < 0.13
    assert all(pick({"v1": 90, "v2": 10}, sticky_point("m", k)) == pick({"v1": 90, "v2": 10}, sticky_point("m", k))
               for k in keys[:100])
    # 95/5 -> 90/10 moves only the keys of the moved slice, all from v1 to v2.
    moved = [k for k in keys if pick({"v1": 95, "v2": 5}, sticky_point("m", k)) != pick({"v1": 90, "v2": 10},
                                                                                          sticky_point("m", k))]
    assert 0.03 < len(moved) / len(keys) < 0.07
    assert all(pick({"v1": 90, "v2": 10}, sticky_point("m", k)) == "v2" for k in moved)


def test_a_version_that_is_down_hands_only_its_own_keys_to_the_others() -> None:
    w = {"a": 10, "b": 80, "c": 10}
    keys = [str(i) for i in range(3000)]
    for k in keys:
        full, partial = pick(w, sticky_point("m", k)), pick(w, sticky_point("m", k), {"b", "c"})
        assert partial in {"b", "c"}
        if full != "a":
            assert partial == full
    assert pick(w, 50.0, set()) is None and pick({}, 1.0) is None and pick({"a": 0}, 1.0) is None


def test_model_args_and_plan() -> None:
    assert parse_model_arg("./no/such/dir") == (None, None, "./no/such/dir")
    assert parse_model_arg("smol=default") == ("smol", None, "default")
    assert parse_model_arg("smol@v2=./x") == ("smol", "v2", "./x")
    with pytest.raises(ValueError):
        parse_model_arg("smol@=x")
    assert plan_from_args([], None, []) is None and plan_from_args(["/p"], None, ["name"]) is None
    with pytest.raises(ValueError, match="need names"):
        plan_from_args(["/a", "/b"], None, [])
    with pytest.raises(ValueError, match="served-model-name"):
        plan_from_args(["smol=default"], None, ["x"])
    plan = plan_from_args(["smol@v1=default", "smol@v2=default"], None, [])
    assert plan is not None and [s.ref for s in plan.specs] == ["smol@v1", "smol@v2"]


def test_version_specs_are_checked_before_anything_starts(tmp_path: Path) -> None:
    base = EngineConfig()
    cfg = validate(VersionSpec("smol", "v2", "default", engine={"dtype": "float32", "max_num_seqs": 4}), base)
    assert cfg.model is None and cfg.dtype == "float32" and cfg.max_num_seqs == 4
    bad = [({"name": "a@b"}, "model name"), ({"version": "-x"}, "version"), ({"path": str(tmp_path / "nope")},
           "does not exist"), ({"engine": {"bogus": 1}}, "unknown engine option"),
           ({"engine": {"max_num_seqs": 2**70}}, "max_num_seqs"), ({"engine": {"dtype": "x" * 10**6}}, "dtype"),
           ({"engine": {"num_threads": "1"}}, "num_threads"), ({"fail_fraction": 2.0}, "fail_fraction")]
    for change, message in bad:
        fields = {"name": "smol", "version": "v1", "path": "default", **change}
        with pytest.raises(ValueError, match=message) as e:
            validate(VersionSpec(**fields), base)
        assert len(str(e.value)) < 600  # never the client's 1 MB echoed back
    assert engine_options({"quantization": "int8"}) == {"quantization": "int8"}
    assert validate(VersionSpec(name="smol", engine={"quantization": "none"}), base).quantization == "none"
    assert validate(VersionSpec(name="smol"), base).quantization == "auto"  # the stored precision
    for bad in ("fp8", "INT4", 4):
        with pytest.raises(ValueError, match="quantization"):
            engine_options({"quantization": bad})
    kernels = {"quantization": "int8", "quantization_kernels": "native"}
    assert engine_options(kernels) == kernels
    assert validate(VersionSpec(name="smol", engine=kernels), base).quantization_kernels == "native"
    for bad in ("gpu", "x" * 10**6, 1):
        with pytest.raises(ValueError, match="quantization_kernels") as e:
            engine_options({"quantization_kernels": bad})
        assert len(str(e.value)) < 600


def test_config_file(tmp_path: Path) -> None:
    f = tmp_path / "lockgate.yaml"
    f.write_text("""
models:
  - name: smol
    aliases: [SmolLM2-135M-Instruct]
    versions:
      - {version: v1, path: default, traffic: 90}
      - {version: v2, path: default, traffic: 10, engine: {quantization: int8}}
    shadow: {version: v2, fraction: 0.25}
    rollback: {max_error_rate: 0.05, min_requests: 10}
""")
    specs, settings = models_config.load(str(f))
    assert [(s.ref, s.traffic, s.engine) for s in specs] == [("smol@v1", 90.0, {}),
                                                             ("smol@v2", 10.0, {"quantization": "int8"})]
    assert specs[0].aliases == ["SmolLM2-135M-Instruct"]
    assert settings["smol"].shadow.fraction == 0.25 and settings["smol"].rules.min_requests == 10
    for text, message in [
        ({"models": [{"name": "m", "versions": [{"traffic": 50}]}]}, "sum to 100"),
        ({"models": [{"name": "m", "versions": [{"version": "v1"}, {"version": "v1"}]}]}, "twice"),
        ({"models": [{"name": "m", "versions": [{}], "shadow": {"version": "v9", "fraction": 0.1}}]}, "not listed"),
        ({"models": [{"name": "m", "versions": [{}], "bogus": 1}]}, "models.0.bogus"),
        ({"models": []}, "models"),
    ]:
        g = tmp_path / "bad.json"
        g.write_text(json.dumps(text))
        with pytest.raises(ValueError, match=message):
            models_config.load(str(g))


def test_traffic_must_sum_to_100_over_known_versions() -> None:
    assert check_traffic({"v1": 95, "v2": 5}, {"v1", "v2"}) == {"v1": 95, "v2": 5}
    with pytest.raises(ValueError, match="sum to 100"):
        check_traffic({"v1": 95, "v2": 4}, {"v1", "v2"})
    with pytest.raises(ValueError, match="unknown version"):
        check_traffic({"v1": 95, "v9": 5}, {"v1", "v2"})


def _stats(outcomes: list[Outcome]) -> VersionStats:
    s = VersionStats()
    for o in outcomes:
        s.record(o)
    return s


def test_rollback_rules() -> None:
    rules = RollbackRules(min_requests=20)
    good = _stats([Outcome(True, 0.1, 0.01)] * 40)
    traffic, order = {"v1": 90, "v2": 10}, ["v1", "v2"]
    assert rollback.check(rules, traffic, order, {"v1": good, "v2": good}, None, set()) == []
    failing = _stats([Outcome(True, 0.1, 0.01)] * 17 + [Outcome(False)] * 3)
    [b] = rollback.check(rules, traffic, order, {"v1": good, "v2": failing}, None, set())
    assert (b.version, b.rule, b.figures["requests"], b.figures["errors"]) == ("v2", "error_rate", 20, 3)
    assert rollback.check(rules, traffic, order, {"v1": good, "v2": failing}, None, {"v2"}) == []  # already rolled back
    too_few = _stats([Outcome(False)] * 19)
    assert rollback.check(rules, traffic, order, {"v1": good, "v2": too_few}, None, set()) == []
    slow = _stats([Outcome(True, 0.3, 0.01)] * 40)
    [b] = rollback.check(rules, traffic, order, {"v1": good, "v2": slow}, None, set())
    assert b.rule == "ttft_p95_ratio" and b.figures["ratio"] == 3.0
    # The stable version (most traffic) is never rolled back, whatever its figures.
    assert rollback.check(rules, {"v1": 10, "v2": 90}, order, {"v1": good, "v2": failing}, None, set()) == []
    # Milliseconds of noise are not a regression.
    noisy = _stats([Outcome(True, 0.003, 0.001)] * 40)
    fast = _stats([Outcome(True, 0.001, 0.001)] * 40)
    assert rollback.check(rules, traffic, order, {"v1": fast, "v2": noisy}, None, set()) == []
    shadow = ShadowStats()
    for i in range(20):
        shadow.record(Pair(Outcome(True), Outcome(True), agreement=0.5 if i % 2 else 1.0, first_match=i % 2 == 0))
    [b] = rollback.check(rules, {"v1": 100}, ["v1", "v3"], {"v1": good}, ("v3", shadow), set())
    assert (b.version, b.rule, b.figures["agreement"]) == ("v3", "shadow_agreement", 0.75)
    assert rollback.check(RollbackRules(enabled=False), traffic, order, {"v1": good, "v2": failing}, None, set()) == []


def test_agreement_figures() -> None:
    assert token_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 0.75
    assert token_agreement([1, 2], [1, 2, 3, 4]) == 0.5 and token_agreement([], []) == 1.0
    assert first_tokens_match(list(range(40)), list(range(32)) + [0] * 8)
    assert not first_tokens_match([1, 2], [1, 3])


def test_replicas_from_the_command_line_and_the_config_file(tmp_path: Path) -> None:
    f = tmp_path / "models.json"
    f.write_text(json.dumps({"models": [{"name": "m", "versions": [
        {"version": "v1", "replicas": 3}, {"version": "v2"}]}]}))
    plan = plan_from_args(["other=default"], str(f), [], replicas=2)
    assert plan is not None
    assert {s.ref: s.replicas for s in plan.specs} == {"m@v1": 3, "m@v2": 2, "other@v1": 2}  # --replicas: the rest
    for bad in (0, 33, "2", 2**70, None, True):
        f.write_text(json.dumps({"models": [{"name": "m", "versions": [{"replicas": bad}]}]}))
        if bad is None:
            continue  # null: the default (serve's --replicas)
        with pytest.raises(ValueError, match="replicas"):
            models_config.load(str(f))
    for bad in (0, 33, -2, 2**70, True, 2.0, "3"):
        with pytest.raises(ValueError, match="replicas must be an integer from 1 to 32"):
            check_replicas(bad)


def test_placement_and_autoscale_in_the_config_file(tmp_path: Path) -> None:
    f = tmp_path / "models.yaml"
    f.write_text("""
models:
  - name: m
    versions:
      - version: v1
        replicas: 3
        placement: {num_cpus: 0.5, num_gpus: 1, resources: {gpu_80gb: 1}}
        autoscale: {min_replicas: 0, max_replicas: 2, policy: hpa}
      - version: v2
        autoscale: {min_replicas: 2, max_replicas: 4}
""")
    specs, _ = models_config.load(str(f))
    v1, v2 = specs
    assert (v1.placement.num_cpus, v1.placement.num_gpus, v1.placement.resources) == (0.5, 1, {"gpu_80gb": 1})
    assert v1.autoscale is not None and v1.autoscale.policy == "hpa" and v1.autoscale.min_replicas == 0
    assert v1.replicas == 2  # starts inside its bounds
    assert v2.autoscale is not None and v2.replicas == 2 and v2.placement.num_cpus == 1.0
    bad = [
        ("placement: {num_cpus: -1}", "placement.num_cpus"),
        ("placement: {resources: {CPU: 2}}", "num_cpus and num_gpus"),
        ("placement: {resources: {'a b': 1}}", "placement.resources"),
        ("placement: {num_gpus: .inf}", "placement.num_gpus"),
        ("autoscale: {min_replicas: 3, max_replicas: 2}", "above max_replicas"),
        ("autoscale: {max_replicas: 33}", "autoscale.max_replicas"),
        ("autoscale: {max_replicas: 2, policy: magic}", "autoscale.policy"),
        ("autoscale: {max_replicas: 2, interval_s: 0}", "autoscale.interval_s"),
        (f"autoscale: {{max_replicas: {2**70}}}", "autoscale.max_replicas"),
    ]
    for line, fragment in bad:
        f.write_text(f"models:\n  - name: m\n    versions:\n      - version: v1\n        {line}\n")
        with pytest.raises(ValueError, match=re.escape(fragment)):
            models_config.load(str(f))
