"""Pass/fail of an evaluation report: each check with its value, threshold and verdict."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(slots=True)
class Thresholds:
    # Greedy token agreement with the reference. Open-ended continuations part for good at the first
    # token that differs, so this is low even for a sound precision change (bundled set, 32 tokens,
    # against float32: bfloat16 0.58, int8 0.47, int4 0.71); a broken model scores near 0.
    min_agreement: float = 0.4
    max_accuracy_drop: float = 0.1  # accuracy at most this far below the reference's (1 question in 10)
    max_perplexity_ratio: float = 1.10  # perplexity at most 10% above the reference's
    min_accuracy: float = 0.0  # absolute floor
    max_perplexity: float | None = None  # absolute ceiling

    def __post_init__(self) -> None:
        for name in ("min_agreement", "max_accuracy_drop", "min_accuracy"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if not self.max_perplexity_ratio >= 1.0:
            raise ValueError(f"max_perplexity_ratio must be >= 1, got {self.max_perplexity_ratio}")
        if self.max_perplexity is not None and not self.max_perplexity > 0:
            raise ValueError(f"max_perplexity must be > 0, got {self.max_perplexity}")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _check(name: str, value: float | None, op: str, threshold: float) -> dict[str, Any]:
    ok = value is not None and (value >= threshold if op == ">=" else value <= threshold)
    return {"name": name, "value": None if value is None else round(value, 6), "op": op,
            "threshold": round(threshold, 6), "passed": ok}


def judge(t: Thresholds, accuracy: float | None, perplexity: float | None, ref_accuracy: float | None = None,
          ref_perplexity: float | None = None, agreement: float | None = None) -> dict[str, Any]:
    """`{"checks": [...], "passed": bool, "failures": [str]}` for what was measured (None: not run)."""
    checks = []
    if accuracy is not None:
        checks.append(_check("accuracy", accuracy, ">=", t.min_accuracy))
    if perplexity is not None and t.max_perplexity is not None:
        checks.append(_check("perplexity", perplexity, "<=", t.max_perplexity))
    if agreement is not None:
        checks.append(_check("token_agreement", agreement, ">=", t.min_agreement))
    if accuracy is not None and ref_accuracy is not None:
        checks.append(_check("accuracy_vs_reference", accuracy, ">=", ref_accuracy - t.max_accuracy_drop))
    if perplexity is not None and ref_perplexity is not None:
        checks.append(_check("perplexity_vs_reference", perplexity, "<=", ref_perplexity * t.max_perplexity_ratio))
    failures = [f"{c['name']} {c['value']} not {c['op']} {c['threshold']}" for c in checks if not c["passed"]]
    return {"checks": checks, "passed": not failures, "failures": failures}


def judge_tasks(t: Thresholds, accuracy: dict[str, float], ref_accuracy: dict[str, float] | None = None
                ) -> dict[str, Any]:
    """The same verdict for `--task` runs: each task's accuracy (`acc`) against the absolute floor,
    and against the reference's with at most `max_accuracy_drop` less."""
    checks = []
    for name, acc in accuracy.items():
        checks.append(_check(f"{name}.acc", acc, ">=", t.min_accuracy))
        if ref_accuracy is not None:
            checks.append(_check(f"{name}.acc_vs_reference", acc, ">=", ref_accuracy[name] - t.max_accuracy_drop))
    failures = [f"{c['name']} {c['value']} not {c['op']} {c['threshold']}" for c in checks if not c["passed"]]
    return {"checks": checks, "passed": not failures, "failures": failures}
