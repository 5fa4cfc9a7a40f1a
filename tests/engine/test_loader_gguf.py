"""GGUF loading: dequantization, name mapping, llama.cpp's q/k permutation, config from metadata."""
from __future__ import annotations

import collections
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from lockgate.engine.config import RopeScaling
from lockgate.engine.loader import load_checkpoint
from lockgate.engine.loader.gguf import hf_name, llama3_divisors
from lockgate.engine.loader.gguf_tokenizer import gpt2_byte_chars
from lockgate.engine.loader.layout import expected_shapes


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The permutation llama.cpp's convert_hf_to_gguf.py applies to llama q/k rows."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---------------------------------------------------------------- the real SmolLM2 file
@pytest.fixture(scope="module")
def smollm(smollm_path: Path):
    ck = load_checkpoint(None)
    return ck, dict(ck.weights())


@pytest.fixture(scope="module")
def smollm_reader(smollm_path: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(smollm_path)


def test_smollm_config(smollm) -> None:
    cfg = smollm[0].config
    assert cfg.architecture == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.vocab_size) == (576, 1536, 64, 49152)
    assert cfg.rope_theta == 100000.0 and cfg.rope_scaling is None
    assert cfg.max_position_embeddings == 8192
    assert cfg.rms_norm_eps == pytest.approx(1e-5)
    assert cfg.tie_word_embeddings and not cfg.attention_bias and not cfg.qk_norm
    assert cfg.bos_token_id == 1 and cfg.eos_token_ids == [2]


def test_smollm_names_and_shapes(smollm, smollm_reader) -> None:
    ck, weights = smollm
    expected = expected_shapes(ck.config)
    assert set(weights) == set(expected)
    assert {n: tuple(t.shape) for n, t in weights.items()} == expected
    types = collections.Counter(t.tensor_type.name for t in smollm_reader.tensors)
    assert types == {"Q4_1": 210, "F32": 61, "Q8_0": 1}


@pytest.mark.parametrize("gguf_name", [
    "token_embd.weight",  # Q8_0
    "blk.0.attn_q.weight",  # Q4_1, permuted (9 heads)
    "blk.7.attn_k.weight",  # Q4_1, permuted (3 KV heads)
    "blk.3.attn_v.weight",
    "blk.29.ffn_down.weight",
    "blk.0.attn_norm.weight",  # F32
    "output_norm.weight",
])
def test_smollm_tensor_equals_gguf_dequantize(smollm, smollm_reader, gguf_name: str) -> None:
    _, weights = smollm
    t = next(t for t in smollm_reader.tensors if t.name == gguf_name)
    ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
    ours = weights[hf_name(gguf_name)].numpy()
    if ".attn_q." in gguf_name:
        ours = llamacpp_permute(ours, 9)  # back to llama.cpp's row order
    elif ".attn_k." in gguf_name:
        ours = llamacpp_permute(ours, 3)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, ref)


def test_smollm_weights_callable_twice(smollm) -> None:
    ck, weights = smollm
    again = next(iter(ck.weights()))
    assert torch.equal(again[1], weights[again[0]])


# ---------------------------------------------------------------- files written here
TOKENS = gpt2_byte_chars() + ["Ġt", "he", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e"]
TYPES = [1] * 258 + [3, 3]


def write_gguf(path: Path, arch: str, dims: dict[str, int], tensors: dict[str, tuple[np.ndarray, Q | None]],
               extra: dict[str, object] | None = None) -> Path:
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(dims["layers"])
    w.add_context_length(256)
    w.add_embedding_length(dims["hidden"])
    w.add_feed_forward_length(dims["inter"])
    w.add_head_count(dims["heads"])
    w.add_head_count_kv(dims["kv_heads"])
    w.add_key_length(dims["head_dim"])
    w.add_value_length(dims["head_dim"])
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(500000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if arch.startswith("qwen") else "llama-bpe")
    w.add_token_list(TOKENS)
    w.add_token_types(TYPES)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(258)
    w.add_eos_token_id(259)
    for key, value in (extra or {}).items():
        w.add_uint32(key, value) if isinstance(value, int) else w.add_string(key, str(value))
    for name, (arr, qtype) in tensors.items():
        if qtype is None:
            w.add_tensor(name, arr)  # as given (float32, or an integer type to test rejection)
        elif qtype == Q.F32:
            w.add_tensor(name, arr.astype(np.float32))
        elif qtype == Q.F16:
            w.add_tensor(name, arr.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(arr.astype(np.float32), qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_tensors(dims: dict[str, int], qtypes: list[Q], bias: bool, qk_norm: bool, tied: bool,
                 rng: np.random.Generator) -> dict[str, tuple[np.ndarray, Q | None]]:
    h, d, inter, v = dims["hidden"], dims["head_dim"], dims["inter"], len(TOKENS)
    q, kv = dims["heads"] * d, dims["kv_heads"] * d
    out: dict[str, tuple[np.ndarray, Q | None]] = {}
    cycle = iter(qtypes * 100)

    def mat(rows: int, cols: int) -> tuple[np.ndarray, Q]:
        return rng.standard_normal((rows, cols)).astype(np.float32), next(cycle)

    def vec(n: int) -> tuple[np.ndarray, None]:
        return rng.standard_normal(n).astype(np.float32), None

    out["token_embd.weight"] = mat(v, h)
    for i in range(dims["layers"]):
        p = f"blk.{i}."
        out[p + "attn_norm.weight"] = vec(h)
        out[p + "attn_q.weight"], out[p + "attn_k.weight"] = mat(q, h), mat(kv, h)
        out[p + "attn_v.weight"], out[p + "attn_output.weight"] = mat(kv, h), mat(h, q)
        if bias:
            out[p + "attn_q.bias"], out[p + "attn_k.bias"], out[p + "attn_v.bias"] = vec(q), vec(kv), vec(kv)
        if qk_norm:
            out[p + "attn_q_norm.weight"], out[p + "attn_k_norm.weight"] = vec(d), vec(d)
        out[p + "ffn_norm.weight"] = vec(h)
        out[p + "ffn_gate.weight"], out[p + "ffn_up.weight"] = mat(inter, h), mat(inter, h)
        out[p + "ffn_down.weight"] = mat(h, inter)
    out["output_norm.weight"] = vec(h)
    if not tied:
        out["output.weight"] = mat(v, h)
    return out


DIMS = {"layers": 2, "hidden": 64, "inter": 96, "heads": 4, "kv_heads": 2, "head_dim": 16}
ALL_QTYPES = [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.F32]


@pytest.mark.parametrize("arch, bias, qk_norm, tied", [("qwen2", True, False, False), ("qwen3", False, True, True)])
def test_written_gguf_roundtrip(tmp_path: Path, arch: str, bias: bool, qk_norm: bool, tied: bool) -> None:
    tensors = tiny_tensors(DIMS, ALL_QTYPES, bias, qk_norm, tied, np.random.default_rng(0))
    ck = load_checkpoint(write_gguf(tmp_path / "m.gguf", arch, DIMS, tensors))
    cfg = ck.config
    assert cfg.architecture == {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[arch]
    assert (cfg.attention_bias, cfg.qk_norm, cfg.tie_word_embeddings) == (bias, qk_norm, tied)
    assert (cfg.vocab_size, cfg.head_dim) == (len(TOKENS), 16)
    assert (cfg.rope_theta, cfg.max_position_embeddings) == (500000.0, 256)
    assert cfg.bos_token_id == 258 and cfg.eos_token_ids == [259]
    loaded = dict(ck.weights())
    assert {n: tuple(t.shape) for n, t in loaded.items()} == expected_shapes(cfg)
    seen = set()
    for gname, (arr, qtype) in tensors.items():
        ours = loaded[hf_name(gname)]
        qtype = qtype or Q.F32
        seen.add(qtype)
        if qtype in (Q.F32, Q.F16):
            ref = torch.from_numpy(arr.astype(np.float16 if qtype == Q.F16 else np.float32))
            assert ours.dtype == ref.dtype and torch.equal(ours, ref), gname
        elif qtype == Q.BF16:
            assert ours.dtype == torch.bfloat16
            torch.testing.assert_close(ours.float(), torch.from_numpy(arr), rtol=1e-2, atol=0)
            assert torch.equal(ours, torch.from_numpy(arr).to(torch.bfloat16)), gname  # both round to nearest even
        else:  # no permutation for qwen: exactly gguf's own dequantization of the quantized data
            ref = gguf.quants.dequantize(gguf.quants.quantize(arr, qtype), qtype)
            assert ours.dtype == torch.float32 and np.array_equal(ours.numpy(), ref), gname
            tol = {Q.Q8_0: 0.03, Q.Q4_0: 0.5, Q.Q4_1: 0.5}[qtype]  # and close to the original values
            assert np.abs(ref - arr).max() < tol * np.abs(arr).max()
    assert seen == set(ALL_QTYPES)


def tiny_hf_llama(tmp_path: Path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(TOKENS), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                      rope_theta=500000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    return model


def hf_to_gguf_tensors(model) -> dict[str, tuple[np.ndarray, Q | None]]:
    reverse = {}
    for i in range(model.config.num_hidden_layers):
        for g in ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output",
                  "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"):
            reverse[hf_name(f"blk.{i}.{g}.weight")] = f"blk.{i}.{g}.weight"
    reverse.update({hf_name(n): n for n in ("token_embd.weight", "output_norm.weight", "output.weight")})
    out = {}
    for name, t in model.state_dict().items():
        arr = t.numpy()
        if ".q_proj." in name:
            arr = llamacpp_permute(arr, model.config.num_attention_heads)
        elif ".k_proj." in name:
            arr = llamacpp_permute(arr, model.config.num_key_value_heads)
        out[reverse[name]] = (arr, None)
    return out


def test_llama_qk_unpermute_matches_hf(tmp_path: Path) -> None:
    model = tiny_hf_llama(tmp_path)
    path = write_gguf(tmp_path / "llama.gguf", "llama", DIMS, hf_to_gguf_tensors(model))
    ck = load_checkpoint(path)
    loaded = dict(ck.weights())
    state = model.state_dict()
    assert set(loaded) == set(state)
    for name, t in state.items():
        assert torch.equal(loaded[name], t), name
    # The stored q rows really were permuted (the test would pass vacuously otherwise).
    raw = gguf.GGUFReader(path).tensors
    stored_q = next(t for t in raw if t.name == "blk.0.attn_q.weight").data
    assert not np.array_equal(stored_q, state["model.layers.0.self_attn.q_proj.weight"].numpy())

    # transformers' own GGUF reader undoes the permutation the same way.
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    ref = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight"):
        assert torch.equal(loaded[name], torch.as_tensor(ref[name])), name


def test_llama3_rope_freqs_become_rope_scaling(tmp_path: Path) -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    hf_cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16, max_position_embeddings=131072,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    plain = 1.0 / 500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    divisors = llama3_divisors(scaling, 500000.0, 16)
    np.testing.assert_allclose(divisors, (plain / scaled.double()).numpy(), rtol=1e-5)  # our formula is HF's

    tensors = tiny_tensors(DIMS, [Q.F32], False, False, True, np.random.default_rng(1))
    tensors["rope_freqs.weight"] = (divisors.astype(np.float32), None)
    ck = load_checkpoint(write_gguf(tmp_path / "l31.gguf", "llama", DIMS, tensors))
    assert ck.config.rope_scaling == scaling
    assert "rope_freqs.weight" not in dict(ck.weights())


def test_unsupported_architecture(tmp_path: Path) -> None:
    tensors = tiny_tensors(DIMS, [Q.F32], False, False, True, np.random.default_rng(2))
    path = write_gguf(tmp_path / "phi.gguf", "phi3", DIMS, tensors)
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'phi3'.*llama.*qwen2.*qwen3"):
        load_checkpoint(path)


def test_unsupported_tensor_type(tmp_path: Path) -> None:
    tensors = tiny_tensors(DIMS, [Q.F32], False, False, True, np.random.default_rng(3))
    tensors["output_norm.weight"] = (tensors["output_norm.weight"][0].astype(np.int32), None)  # stored as I32
    path = write_gguf(tmp_path / "int.gguf", "llama", DIMS, tensors)
    with pytest.raises(ValueError, match=r"unsupported tensor types \['I32'\].*Q4_1"):
        load_checkpoint(path)


def test_not_a_gguf_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(ValueError, match="broken.gguf"):
        load_checkpoint(bad)


# ---------------------------------------------------------------- gguf_header (the fast reader)
def test_fast_header_equals_gguf_reader(smollm_path: Path, smollm_reader) -> None:
    from lockgate.engine.loader.gguf_header import read_gguf_header
    from lockgate.engine.loader.gguf_meta import meta

    header = read_gguf_header(smollm_path)
    fields = smollm_reader.fields
    # GGUFReader adds synthetic GGUF.version/tensor_count/kv_count fields; the header keeps those as attributes.
    ref = {k: meta(fields, k) for k in fields if not k.startswith("GGUF.")}
    assert list(header.metadata) == list(ref)
    for key, value in ref.items():
        got = header.metadata[key]
        assert got == value and type(got) is type(value), key
        if isinstance(value, list):
            assert [type(v) for v in got] == [type(v) for v in value], key
    assert len(header.metadata["tokenizer.ggml.tokens"]) == 49152
    assert header.version == meta(fields, "GGUF.version")
    assert header.data_offset == smollm_reader.data_offset
    assert len(header.tensors) == len(smollm_reader.tensors)
    for ours, theirs in zip(header.tensors, smollm_reader.tensors, strict=True):
        assert (ours.name, ours.tensor_type, ours.data_offset) == (theirs.name, theirs.tensor_type, theirs.data_offset)
        assert list(ours.shape) == theirs.shape.tolist()
        assert ours.data.dtype == theirs.data.dtype and ours.data.shape == theirs.data.shape, ours.name
        np.testing.assert_array_equal(ours.data, theirs.data)


def test_default_model_metadata_paths_build_no_gguf_reader(smollm_path: Path, monkeypatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("GGUFReader built on a metadata path")

    monkeypatch.setattr(gguf.GGUFReader, "__init__", refuse)
    for fmt in ("auto", "dummy"):
        ck = load_checkpoint(None, load_format=fmt)
        assert ck.config.vocab_size == 49152 and ck.tokenizer.bos_token_id == 1


@pytest.mark.parametrize("keep", [0, 10, 23, 24, 40, 1000, 200_000, 1_785_000, -100])
def test_fast_header_truncated_file(smollm_path: Path, tmp_path: Path, keep: int) -> None:
    from lockgate.engine.loader.gguf_header import read_gguf_header

    data = smollm_path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:keep])
    with pytest.raises(ValueError, match="cut.gguf"):
        read_gguf_header(cut)


def _one_array_gguf(path: Path, elem_type: int, count: int) -> Path:
    import struct

    key = b"tokenizer.ggml.tokens"
    body = struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", 9, elem_type, count) + b"\0" * 64
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + body)
    return path


@pytest.mark.parametrize("elem_type", [8, 4, 9])  # strings, uint32s, arrays
def test_fast_header_bogus_array_count(tmp_path: Path, elem_type: int) -> None:
    from lockgate.engine.loader.gguf_header import read_gguf_header

    path = _one_array_gguf(tmp_path / "bogus.gguf", elem_type, 2**62)
    with pytest.raises(ValueError, match="array length is 4611686018427387904"):
        read_gguf_header(path)
    with pytest.raises(ValueError, match="bogus.gguf"):
        load_checkpoint(path)


def test_fast_header_bogus_counts_and_version(tmp_path: Path) -> None:
    import struct

    from lockgate.engine.loader.gguf_header import read_gguf_header

    path = tmp_path / "h.gguf"
    for header, msg in [
        (struct.pack("<IQQ", 3, 0, 2**40), "metadata key count"),
        (struct.pack("<IQQ", 3, 2**40, 0), "tensor count"),
        (struct.pack("<IQQ", 1, 0, 0), "unsupported GGUF version 1"),
        (struct.pack(">IQQ", 3, 0, 0), "big-endian"),
    ]:
        path.write_bytes(b"GGUF" + header + b"\0" * 64)
        with pytest.raises(ValueError, match=msg):
            read_gguf_header(path)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_whole_tensor_dequantize_is_bit_identical_to_ggml(qtype):
    """The loader's fast dequantization (one vectorised pass per tensor) gives the gguf package's
    block-by-block values bit for bit, NaN/inf scales and extreme codes included."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    from lockgate.engine.quant import gguf_blocks

    rng = np.random.default_rng(0)
    n, k = 7, 96
    size = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[qtype]
    raw = rng.integers(0, 256, size=(n, k // 32, size), dtype=np.uint8)
    scales = rng.normal(0, 0.05, size=(n, k // 32, 2)).astype(np.float16)
    scales[0, 0] = [np.inf, np.nan]  # whatever a file holds, both agree
    raw[..., 0:2] = scales[..., 0:1].view(np.uint8).reshape(n, k // 32, 2)
    if qtype == "Q4_1":
        raw[..., 2:4] = scales[..., 1:2].view(np.uint8).reshape(n, k // 32, 2)
    with np.errstate(invalid="ignore", over="ignore"):  # inf * 0 and the like, in both
        ours = gguf_blocks.dequantize(qtype, raw, (n, k))
        ref = quants.dequantize(raw.reshape(n, -1), GGMLQuantizationType[qtype]).reshape(n, k)
    assert ours.dtype == np.float32 and np.array_equal(ours.view(np.uint32), ref.astype(np.float32).view(np.uint32))
