"""lockgate: a paged, continuously batched LLM engine with an OpenAI-compatible server."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "__version__"]

if TYPE_CHECKING:
    from lockgate.engine.llm import LLM
    from lockgate.engine.outputs import CompletionOutput, RequestOutput
    from lockgate.engine.sampling_params import SamplingParams

_LAZY = {
    "LLM": "lockgate.engine.llm",
    "SamplingParams": "lockgate.engine.sampling_params",
    "RequestOutput": "lockgate.engine.outputs",
    "CompletionOutput": "lockgate.engine.outputs",
}


def __getattr__(name: str) -> Any:
    # Lazy, so `import lockgate.server` or the CLI's --help don't pay for torch.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lockgate' has no attribute {name!r}")
