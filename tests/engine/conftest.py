"""Fixtures shared by the engine tests."""
from __future__ import annotations

from pathlib import Path

import pytest

from lockgate.engine.loader import default_model_path


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    """The embedded SmolLM2 GGUF. `make test` installs it, so its absence is a failure, not a skip."""
    return default_model_path()
