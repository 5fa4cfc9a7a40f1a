"""Sampling defaults from the model's generation config (`--generation-config auto|vllm|PATH`):
what the loaders read, what each option resolves to, the embedded model's, what a request that
leaves a field out gets (server/params.py), and the offline `LLM`'s defaults on a tiny model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from lockgate.engine.config import EngineConfig
from lockgate.engine.generation_defaults import (
    EMBEDDED,
    GenerationDefaults,
    check_option,
    from_gguf_metadata,
    from_hf_file,
    resolve,
)
from lockgate.engine.loader import load_checkpoint
from lockgate.server.config import ServerConfig
from lockgate.server.errors import APIError
from lockgate.server.params import chat_params, completion_params
from lockgate.server.protocol import ChatCompletionRequest, CompletionRequest


def _gen_dir(tmp_path: Path, body: dict) -> Path:
    d = tmp_path / "gen"
    d.mkdir(exist_ok=True)
    (d / "generation_config.json").write_text(json.dumps(body))
    return d


def test_hf_generation_config_keys_become_sampling_fields(tmp_path: Path) -> None:
    d = _gen_dir(tmp_path, {"bos_token_id": 1, "do_sample": True, "temperature": 0.6, "top_p": 0.9, "top_k": 20,
                            "min_p": 0.05, "repetition_penalty": 1.1, "max_new_tokens": 64, "max_length": 4096})
    got = from_hf_file(d / "generation_config.json")
    assert got == {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1,
                   "max_tokens": 64}
    assert isinstance(got["top_k"], int) and isinstance(got["temperature"], float)
    assert from_hf_file(tmp_path / "missing.json") == {}


@pytest.mark.parametrize("body,needle", [
    ({"temperature": -1}, "temperature must be >= 0"),
    ({"top_p": 0}, "top_p must be in (0, 1]"),
    ({"top_k": 2.5}, "top_k must be an integer"),
    ({"temperature": "hot"}, "temperature must be a number"),
    ({"max_new_tokens": True}, "max_tokens must be a number"),
])
def test_a_bad_generation_config_names_the_file_and_field(tmp_path: Path, body: dict, needle: str) -> None:
    d = _gen_dir(tmp_path, body)
    with pytest.raises(ValueError) as e:
        from_hf_file(d / "generation_config.json")
    assert needle in str(e.value) and "generation_config.json" in str(e.value)


def test_gguf_sampling_metadata() -> None:
    fields = {"general.sampling.temp": 0.7, "general.sampling.top_k": 40, "general.sampling.penalty_repeat": 1.05,
              "general.sampling.mirostat": 0, "general.name": "x"}
    assert from_gguf_metadata(fields, "f.gguf") == {"temperature": 0.7, "top_k": 40, "repetition_penalty": 1.05}
    with pytest.raises(ValueError, match="f.gguf: top_p must be in"):
        from_gguf_metadata({"general.sampling.top_p": 2.0}, "f.gguf")


def test_options_resolve(tmp_path: Path) -> None:
    ckpt = {"temperature": 0.3}
    assert resolve("auto", ckpt, "x").values == ckpt
    assert resolve("vllm", ckpt, "x").values == {}
    d = _gen_dir(tmp_path, {"temperature": 0.0, "max_new_tokens": 3})
    assert resolve(str(d), ckpt, "x").values == {"temperature": 0.0, "max_tokens": 3}
    assert resolve(str(d / "generation_config.json"), None).values == {"temperature": 0.0, "max_tokens": 3}
    with pytest.raises(ValueError, match="no generation_config.json there"):
        resolve(str(tmp_path / "nowhere"), ckpt)
    assert "temperature=0.3" in resolve("auto", ckpt, "the file").describe()
    for bad in ("", "   ", 7, "a\x00b"):
        with pytest.raises(ValueError, match="generation_config must be 'auto', 'vllm' or a directory"):
            check_option(bad)
    with pytest.raises(ValueError, match="generation_config must be"):
        EngineConfig(generation_config="")


def test_the_embedded_model_gets_its_model_cards_settings() -> None:
    ckpt = load_checkpoint(None)  # config and tokenizer only: the weights load lazily
    assert ckpt.config.sampling_defaults == EMBEDDED == {"temperature": 0.2, "top_p": 0.9}


def test_a_request_keeps_what_it_sets_and_takes_the_rest_from_the_model() -> None:
    defaults = GenerationDefaults({"temperature": 0.2, "top_p": 0.9, "top_k": 40, "max_tokens": 7}, "test")
    cfg, engine = ServerConfig(), EngineConfig()
    msgs = [{"role": "user", "content": "hi"}]
    p = chat_params(ChatCompletionRequest.model_validate({"messages": msgs}), cfg, engine, defaults)
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens) == (0.2, 0.9, 40, 7)
    p = chat_params(ChatCompletionRequest.model_validate(
        {"messages": msgs, "temperature": 0, "top_k": 5, "max_completion_tokens": 9}), cfg, engine, defaults)
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens) == (0.0, 0.9, 5, 9)  # temperature 0: still greedy
    p = completion_params(CompletionRequest.model_validate({"prompt": "x", "top_p": 0.5}), cfg, engine, defaults)
    assert (p.temperature, p.top_p, p.max_tokens) == (0.2, 0.5, 7)
    p = completion_params(CompletionRequest.model_validate({"prompt": "x", "max_tokens": 16}), cfg, engine, defaults)
    assert p.max_tokens == 16  # set, even to OpenAI's default: the request's
    p = completion_params(CompletionRequest.model_validate({"prompt": "x"}), cfg, engine)  # no defaults: OpenAI's
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens) == (1.0, 1.0, 0, 16)
    # A default max_tokens never refuses the request's own min_tokens (it stretches to it).
    p = chat_params(ChatCompletionRequest.model_validate({"messages": msgs, "min_tokens": 20}), cfg, engine, defaults)
    assert (p.min_tokens, p.max_tokens) == (20, 20)
    with pytest.raises(APIError) as e:  # what the client sets is still checked: a 400 naming its field
        chat_params(ChatCompletionRequest.model_validate({"messages": msgs, "min_tokens": 20, "max_tokens": 5}),
                    cfg, engine, defaults)
    assert e.value.status == 400 and e.value.param == "min_tokens"


def test_offline_llm_uses_the_checkpoints_generation_config(tmp_path: Path) -> None:
    from lockgate import LLM, SamplingParams
    from tests.engine.tiny_models import make_checkpoint

    path = tmp_path / "tiny"
    make_checkpoint(path, "qwen2")
    (path / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "top_k": 3, "max_new_tokens": 5}))
    assert load_checkpoint(path).config.sampling_defaults == {"temperature": 0.0, "top_k": 3, "max_tokens": 5}
    llm = LLM(str(path), dtype="float32")
    d = llm.get_default_sampling_params()
    assert (d.temperature, d.top_k, d.max_tokens) == (0.0, 3, 5)
    prompt = [5, 17, 99, 3]
    out = llm.generate(prompt)[0].outputs[0]  # no sampling params: the model's (greedy, 5 tokens)
    ref = llm.generate(prompt, SamplingParams(temperature=0.0, max_tokens=5))[0].outputs[0]
    assert len(out.token_ids) == 5 and out.token_ids == ref.token_ids
    plain = LLM(str(path), dtype="float32", generation_config="vllm").get_default_sampling_params()
    assert (plain.temperature, plain.top_k, plain.max_tokens) == (1.0, 0, 16)  # SamplingParams' own
    with pytest.raises(ValueError, match="no generation_config.json there"):
        LLM(str(path), generation_config=str(tmp_path / "nowhere"))
