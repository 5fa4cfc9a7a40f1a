"""Processes that run no model never import torch (~1.5 s of CPU each).

The API server reads only the checkpoint's config and tokenizer (the weights are a lazy
callable, called in the engine-core process), and a fake-engine core (`load_format="fake"`)
runs no model at all. Each check runs in a fresh interpreter, so what this test process
has imported does not count.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap

TORCH_ABSENT = 'assert "torch" not in sys.modules, "torch was imported"\nprint("ok")\n'
TORCH_PRESENT = 'assert "torch" in sys.modules, "torch was not imported"\nprint("ok")\n'


def _run(code: str, check: str) -> None:
    """Run `code` (indented as in a test) then `check` in a fresh interpreter."""
    script = "import sys\n" + textwrap.dedent(code) + check
    proc = subprocess.run([sys.executable, "-c", script],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


def test_api_process_loads_checkpoint_without_torch() -> None:
    _run("""
        import lockgate.server.app
        import lockgate.lifecycle.fleet
        import lockgate.engine.frontend.client
        from lockgate.engine.loader import load_checkpoint

        ckpt = load_checkpoint(None, "auto")  # the embedded GGUF: config + tokenizer, weights stay lazy
        assert ckpt.config.vocab_size > 0 and ckpt.tokenizer.encode("Hello")
        assert callable(ckpt.weights)
    """, TORCH_ABSENT)


def test_fake_engine_core_runs_without_torch() -> None:
    _run("""
        import lockgate.engine.core.proc  # the engine-core process's entry module
        import lockgate.engine.core.scheduler, lockgate.engine.core.kv_cache, lockgate.engine.sim
        from lockgate.engine.config import EngineConfig
        from lockgate.engine.core.engine_core import EngineCore
        from lockgate.engine.messages import EngineCoreRequest
        from lockgate.engine.sampling_params import SamplingParams

        core = EngineCore(EngineConfig(load_format="fake", num_kv_blocks=64))
        assert core.runner.device == "cpu"
        core.add_request(EngineCoreRequest("r0", [1, 2, 3], SamplingParams(max_tokens=4), arrival_time=0.0))
        tokens, finish = [], None
        for _ in range(100):
            for out in core.step():
                tokens += out.new_token_ids
                finish = out.finish_reason or finish
            if not core.has_unfinished_requests():
                break
        assert len(tokens) == 4 and finish == "length", (tokens, finish)
    """, TORCH_ABSENT)


def test_control_real_paths_import_torch() -> None:
    """The checks above can fail: the lazy weights and the real runner do import torch."""
    _run("""
        from lockgate.engine.loader import load_checkpoint

        ckpt = load_checkpoint(None, "auto")
        assert "torch" not in sys.modules
        name, tensor = next(iter(ckpt.weights()))  # the weights make tensors: torch comes in now
        assert tensor.ndim >= 1
        import lockgate.engine.core.runner  # the real-model path imports (torch at module level)
    """, TORCH_PRESENT)
