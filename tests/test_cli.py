"""The `lockgate` CLI as a user runs it: generate, chat REPL, bad model path."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

LOCKGATE = [sys.executable, "-m", "lockgate.cli"]


def run(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(LOCKGATE + args, input=stdin, capture_output=True, text=True, timeout=300)


def test_generate_chat_prints_the_answer():
    r = run(["generate", "--chat", "--max-tokens", "24", "What is the capital of Japan?"])  # France: test_llm.py
    assert r.returncode == 0, r.stderr
    assert "Tokyo" in r.stdout


def test_chat_repl_streams_and_exits():
    r = run(["chat", "--temperature", "0"], stdin="What is the capital of Japan?\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert "Tokyo" in r.stdout


def test_missing_model_path_is_a_clear_error(tmp_path: Path):
    r = run(["generate", "--model", str(tmp_path / "nope"), "hello"])
    assert r.returncode == 2
    assert "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_serve_refuses_unknown_kernels_before_loading(tmp_path: Path):
    r = run(["serve", "--quantization", "int8", "--quantization-kernels", "gpu", "--port", "0",
             "--data-dir", str(tmp_path / "data")])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "quantization_kernels must be 'auto', 'native' or 'torch', got 'gpu'" in r.stderr
    assert not (tmp_path / "data").exists()  # refused before the store was opened
    r = run(["serve", "--quantization", "fp8", "--port", "0", "--data-dir", str(tmp_path / "data")])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "quantization must be one of auto, none, int4, int8; got 'fp8'" in r.stderr
    assert not (tmp_path / "data").exists()


def test_unsupported_architecture_names_the_supported_ones(tmp_path: Path):
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    r = run(["generate", "--model", str(tmp_path), "hello"])
    assert r.returncode == 2
    assert "LlamaForCausalLM" in r.stderr and "Traceback" not in r.stderr


def test_serve_refuses_bad_replicas_before_loading(tmp_path: Path):
    r = run(["serve", "--replicas", "33", "--port", "0", "--data-dir", str(tmp_path / "data")])
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "--replicas must be an integer from 1 to 32, got 33" in r.stderr
    r = run(["serve", "--replicas", "two", "--port", "0"])
    assert r.returncode == 2 and "Traceback" not in r.stderr and "replicas" in r.stderr
    assert not (tmp_path / "data").exists()  # refused before the store was opened
