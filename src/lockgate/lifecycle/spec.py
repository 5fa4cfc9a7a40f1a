"""What a model version is made of: name, version, checkpoint path, engine options, options.

One `VersionSpec` per engine-core process. They come from `lockgate serve --model`
(`PATH`, `NAME=PATH`, `NAME@VERSION=PATH`), from a `--config` file (models_config.py)
or from `POST /admin/models`; all three go through the same checks here, so a bad
option is refused the same way everywhere (ValueError / 400 with the same message).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from lockgate.engine.config import EngineConfig
from lockgate.engine.spec.draft_check import check_draft
from lockgate.gateway.routing import VERSION_SEPARATOR
from lockgate.lifecycle.autoscale_types import AutoscaleConfig
from lockgate.lifecycle.placement import Placement
from lockgate.lifecycle.settings import MAX_REPLICAS

DEFAULT_VERSION = "v1"
DEFAULT_PATH = "default"  # the embedded SmolLM2 (EngineConfig.model = None)
MAX_PATH_CHARS = 4096
# Model names may look like paths (a plain `--model ./dir` or `--model /abs/dir` is served under that
# name, as vLLM does).
NAME_RE = re.compile(r"^[A-Za-z0-9_./][A-Za-z0-9_.:/+-]{0,127}$")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

_INT = 2**31 - 1
_STRICT = ConfigDict(extra="forbid", strict=True)


class EngineOptions(BaseModel):
    """Engine options a version may set (EngineConfig fields; the rest are server-wide or test-only).
    Strict types and bounds: a typo, a string for a number or 2**70 is a 400 naming the field."""

    model_config = _STRICT
    dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None
    device: Annotated[str, StringConstraints(min_length=1, max_length=32)] | None = None
    load_format: Literal["auto", "dummy", "fake"] | None = None
    fake_step_delay_s: Annotated[float, Field(ge=0, le=60, allow_inf_nan=False)] | None = None
    fake_token_delay_s: Annotated[float, Field(ge=0, le=60, allow_inf_nan=False)] | None = None
    fake_stall_fraction: Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)] | None = None
    fake_stall_s: Annotated[float, Field(ge=0, le=60, allow_inf_nan=False)] | None = None
    quantization: Literal["auto", "none", "int4", "int8"] | None = None
    quantization_kernels: Literal["auto", "native", "torch"] | None = None
    quantization_activations: Literal["int8", "int16"] | None = None
    quantization_float_above: Annotated[int, Field(ge=0, le=_INT)] | None = None
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] | None = None
    block_size: Annotated[int, Field(ge=1, le=1024)] | None = None
    num_kv_blocks: Annotated[int, Field(ge=1, le=2**24)] | None = None
    kv_cache_memory_gb: Annotated[float, Field(gt=0, le=1024, allow_inf_nan=False)] | None = None
    kv_cache_dtype: Literal["auto", "float32", "bfloat16", "float16"] | None = None
    max_model_len: Annotated[int, Field(ge=1, le=2**24)] | None = None
    max_num_seqs: Annotated[int, Field(ge=1, le=65536)] | None = None
    max_num_batched_tokens: Annotated[int, Field(ge=1, le=2**24)] | None = None
    enable_prefix_caching: bool | None = None
    enable_chunked_prefill: bool | None = None
    max_prefill_tokens: Annotated[int, Field(ge=1, le=2**24)] | None = None
    priority_aging_s: Annotated[float, Field(ge=0, le=86400, allow_inf_nan=False)] | None = None
    max_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    num_threads: Annotated[int, Field(ge=1, le=1024)] | None = None
    # vLLM's speculative config object (engine/spec/config.py checks every field).
    speculative_config: dict[str, Any] | None = None


ENGINE_OPTION_NAMES = frozenset(EngineOptions.model_fields)


@dataclass(slots=True)
class GateSpec:
    """The quality gate a version must pass before it may take traffic (lifecycle/gate.py)."""

    against: str | None = None  # a version of the same model; None: the model's stable version
    min_agreement: float = 0.4  # greedy token agreement with `against` (eval/thresholds.py)
    max_accuracy_drop: float = 0.1  # accuracy on the bundled questions, at most this much below `against`'s
    min_accuracy: float = 0.0  # and at least this, absolute
    max_tokens: int = 16


@dataclass(slots=True)
class VersionSpec:
    name: str
    version: str = DEFAULT_VERSION
    path: str = DEFAULT_PATH
    engine: dict[str, Any] = field(default_factory=dict)  # EngineOptions given (the rest: the server's)
    traffic: float | None = None  # initial weight (config files); None: 100 for a model's first version
    aliases: list[str] = field(default_factory=list)  # more names for the model (--served-model-name)
    gate: GateSpec | None = None
    fail_fraction: float = 0.0  # TEST ONLY: fail this fraction of the version's requests (rollback tests)
    replicas: int = 1  # engine-core processes serving this version (lifecycle/fleet.py)
    placement: Placement = field(default_factory=Placement)  # what one replica asks of a Ray cluster
    autoscale: AutoscaleConfig | None = None  # None: a fixed number of replicas

    @property
    def ref(self) -> str:
        return f"{self.name}{VERSION_SEPARATOR}{self.version}"

    def engine_config(self, base: EngineConfig) -> EngineConfig:
        """The server's engine options, this version's on top; ValueError for a bad combination."""
        values = {f.name: getattr(base, f.name) for f in fields(EngineConfig)}
        values.update(self.engine)
        values["model"] = None if self.path == DEFAULT_PATH else self.path
        values["debug_hang_at_step"] = None  # a test hook of the first engine only
        return EngineConfig(**values)


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise ValueError(f"model name {_shown(name)} is invalid: 1-128 characters of letters, digits and "
                         "_ . : / + - (no '@': it separates the version)")
    return name


def check_version(version: str) -> str:
    if not VERSION_RE.match(version):
        raise ValueError(f"version {_shown(version)} is invalid: 1-64 characters of letters, digits and _ . - "
                         "starting with a letter or digit")
    return version


def check_replicas(replicas: object, param: str = "replicas") -> int:
    if not isinstance(replicas, int) or isinstance(replicas, bool) or not 1 <= replicas <= MAX_REPLICAS:
        shown = replicas if isinstance(replicas, (int, float)) and abs(replicas) < 2**64 else "(invalid)"
        raise ValueError(f"{param} must be an integer from 1 to {MAX_REPLICAS}, got {shown}")
    return replicas


def check_path(path: str) -> str:
    """`default` (the embedded model) or an existing file or directory."""
    if path == DEFAULT_PATH:
        return path
    if not path or len(path) > MAX_PATH_CHARS or "\x00" in path:
        raise ValueError(f"path must be 1-{MAX_PATH_CHARS} characters without NUL")
    if not Path(path).expanduser().exists():
        raise ValueError(f"model path {_shown(path)} does not exist (a checkpoint directory, a .gguf file, "
                         f"or {DEFAULT_PATH!r} for the embedded model)")
    return path


def engine_options(raw: dict[str, Any]) -> dict[str, Any]:
    """Validated engine options (only those given); ValueError naming the first bad one."""
    unknown = sorted(set(raw) - ENGINE_OPTION_NAMES)
    if unknown:
        raise ValueError(f"unknown engine option {_shown(unknown[0])}; known: {', '.join(sorted(ENGINE_OPTION_NAMES))}")
    try:
        opts = EngineOptions.model_validate(raw)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        where = ".".join(str(p) for p in err.get("loc", ())) or "engine options"
        raise ValueError(f"{where}: {err.get('msg', 'invalid value')}") from None
    return opts.model_dump(exclude_unset=True)


def validate(spec: VersionSpec, base: EngineConfig) -> EngineConfig:
    """Every check a version gets before anything is started; returns its engine config."""
    check_name(spec.name)
    check_version(spec.version)
    check_path(spec.path)
    spec.engine = engine_options(spec.engine)
    if not 0.0 <= spec.fail_fraction <= 1.0:
        raise ValueError(f"fail_fraction must be in [0, 1], got {spec.fail_fraction}")
    check_replicas(spec.replicas)
    if spec.traffic is not None and not 0 <= spec.traffic <= 100:
        raise ValueError(f"traffic must be in [0, 100], got {spec.traffic}")
    config = spec.engine_config(base)
    check_draft(config)  # a draft model's path and tokenizer, before anything starts
    return config


def parse_model_arg(value: str) -> tuple[str | None, str | None, str]:
    """`--model` value -> (name, version, path): `PATH`, `NAME=PATH` or `NAME@VERSION=PATH`.

    A value that exists as a path is a path even when it holds "=" (a file named a=b)."""
    if "=" not in value or Path(value).expanduser().exists():
        return None, None, value
    ref, _, path = value.partition("=")
    name, sep, version = ref.rpartition(VERSION_SEPARATOR)
    if not sep:
        name, version = ref, ""
    if not name or not path or (sep and not version):
        raise ValueError(f"--model {value!r}: expected PATH, NAME=PATH or NAME@VERSION=PATH")
    return name, version or None, path


def _shown(value: str) -> str:
    """A client's string in an error message: short and printable, never 10 MB echoed back."""
    if len(value) <= 80 and value.isprintable():
        return repr(value)
    return repr(value[:40] + "...") if value[:40].isprintable() else "(invalid)"
