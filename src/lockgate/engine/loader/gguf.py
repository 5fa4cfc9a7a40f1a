"""GGUF files: config from metadata, weights dequantized (`gguf.quants`) and renamed to HF names.

Shapes: GGUF lists dims innermost first (ne = [in, out]); a tensor's `.data` is already in
numpy order, so a dequantized matrix is (out, in), the HF/torch layout.

The file is read with `gguf_header` (metadata as plain values, tensor data memory-mapped),
not `gguf.GGUFReader`, whose metadata parsing costs seconds on a large vocabulary.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import quants

from lockgate.engine.config import ModelConfig, RopeScaling
from lockgate.engine.generation_defaults import from_gguf_metadata
from lockgate.engine.loader.gguf_header import GGUFTensor, read_gguf_header
from lockgate.engine.loader.gguf_meta import meta
from lockgate.engine.loader.gguf_tokenizer import tokenizer_from_gguf
from lockgate.engine.loader.layout import check_tensors
from lockgate.engine.loader.progress import track
from lockgate.engine.quant import gguf_blocks
from lockgate.engine.quant.precision import stored_precision
from lockgate.engine.tokenizer import Tokenizer

if TYPE_CHECKING:
    import torch

# general.architecture -> HF architecture. Mistral v0.x files are written as "llama".
GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# llama.cpp's converter permutes attn_q/attn_k rows for these (its RoPE pairs adjacent dims).
PERMUTED_ARCHITECTURES = {"llama", "mistral"}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_PROJECTIONS = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"}
# Tensors llama.cpp writes that HF checkpoints have no counterpart for (read into the config instead).
_IGNORED = {"rope_freqs.weight"}

# Kept in their stored float dtype; everything else is dequantized to float32.
_FLOAT_TYPES = {Q.F32, Q.F16, Q.BF16}


def hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def can_dequantize(qtype: Q) -> bool:
    # gguf.quants has one class per type it can dequantize, named after the type.
    return qtype in (Q.F32, Q.F16) or isinstance(getattr(quants, qtype.name, None), type)


def numpy_shape(t: GGUFTensor | Any) -> tuple[int, ...]:
    """A tensor's dims in numpy (HF) order (GGUF lists them innermost first)."""
    return tuple(int(d) for d in reversed(list(t.shape)))


def tensor_to_numpy(t: GGUFTensor | Any) -> np.ndarray:
    """Dequantized (or stored float) data of one tensor (a `GGUFTensor` or `ReaderTensor`), in numpy (HF) dim order."""
    shape = numpy_shape(t)
    if t.tensor_type == Q.F32:
        return np.array(t.data, dtype=np.float32).reshape(shape)
    if t.tensor_type == Q.F16:
        return np.array(t.data, dtype=np.float16).reshape(shape)
    if t.tensor_type == Q.BF16:
        return np.array(t.data).view(np.int16).reshape(shape)  # reinterpreted as bfloat16 by the caller
    if len(shape) == 2 and gguf_blocks.decodable(t.tensor_type.name) and shape[1] % gguf_blocks.GROUP == 0:
        return gguf_blocks.dequantize(t.tensor_type.name, np.asarray(t.data), shape)  # the same values, faster
    return quants.dequantize(t.data, t.tensor_type).reshape(shape)


def to_torch(t: GGUFTensor | Any, arr: np.ndarray) -> torch.Tensor:
    import torch  # lazy: only where tensors are made

    out = torch.from_numpy(np.ascontiguousarray(arr))
    return out.view(torch.bfloat16) if t.tensor_type == Q.BF16 else out


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: within each head it stored rows as
    [0, half, 1, half+1, ...] (interleaved pairs); HF's rotate_half wants [first half | second half]."""
    rows = w.shape[0]
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def config_from_gguf(
    fields: Mapping[str, Any], tensors: Mapping[str, Any], tokenizer: Tokenizer
) -> ModelConfig:
    arch = meta(fields, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(GGUF_ARCHITECTURES)}")

    def key(name: str, default: Any = None) -> Any:
        return meta(fields, f"{arch}.{name}", default)

    hidden, heads = int(key("embedding_length")), int(key("attention.head_count"))
    embed = tensors.get("token_embd.weight")
    vocab = int(embed.shape[1]) if embed is not None else int(key("vocab_size", tokenizer.vocab_size))
    kv_heads = key("attention.head_count_kv", heads)
    if isinstance(kv_heads, list):  # per-layer list in some files; the family here is uniform
        kv_heads = kv_heads[0]
    window = key("attention.sliding_window")
    return ModelConfig(
        architecture=GGUF_ARCHITECTURES[arch],
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_hidden_layers=int(key("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(kv_heads),
        head_dim=int(key("attention.key_length", hidden // heads)),
        max_position_embeddings=int(key("context_length", 4096)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(arch, fields, tensors),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        qk_norm=arch == "qwen3",
        sliding_window=int(window) if window else None,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_ids=list(tokenizer.eos_token_ids),
    )


def _rope_scaling(arch: str, fields: Mapping[str, Any], tensors: Mapping[str, Any]) -> RopeScaling | None:
    kind = meta(fields, f"{arch}.rope.scaling.type", "none")
    if kind not in ("none", None, ""):
        raise ValueError(f"unsupported GGUF rope scaling {kind!r}; supported: none, llama3 (rope_freqs tensor)")
    freqs = tensors.get("rope_freqs.weight")
    if freqs is None:
        return None
    # Llama 3.1 files store the llama3 scaling as per-dim divisors, not parameters. Recover
    # them: factor is the largest divisor; the rest are Llama 3.1's, checked against the tensor.
    got = tensor_to_numpy(freqs).astype(np.float64)
    dim = int(meta(fields, f"{arch}.rope.dimension_count", 2 * got.size))
    base = float(meta(fields, f"{arch}.rope.freq_base", 10000.0))
    orig = int(meta(fields, f"{arch}.rope.scaling.original_context_length", 8192))
    s = RopeScaling("llama3", float(got.max()), 1.0, 4.0, orig)
    if not np.allclose(got, llama3_divisors(s, base, dim), rtol=1e-3):
        raise ValueError("GGUF rope_freqs tensor does not match Llama 3.1 style scaling; unsupported")
    return s


def llama3_divisors(s: RopeScaling, base: float, dim: int) -> np.ndarray:
    """How much llama3 scaling divides each RoPE frequency by (what rope_freqs stores)."""
    freq = base ** -(np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * np.pi / freq
    ctx = s.original_max_position_embeddings
    smooth = (ctx / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    mid = 1.0 / ((1 - smooth) / s.factor + smooth)
    out = np.where(wavelen > ctx / s.low_freq_factor, s.factor, mid)
    return np.where(wavelen < ctx / s.high_freq_factor, 1.0, out)


def projection_types(tensors: Iterable[GGUFTensor | Any]) -> list[str]:
    """The stored type names of a file's projection matrices (attention and MLP), the weights
    whose precision decides what `quantization="auto"` runs (not the embedding or norms)."""
    out = []
    for t in tensors:
        m = _BLOCK_RE.fullmatch(t.name)
        if m and m.group(3) == "weight" and m.group(2) in _PROJECTIONS:
            out.append(t.tensor_type.name)
    return out


def load_gguf(path: Path) -> tuple[ModelConfig, Tokenizer, Any, Any, str | None, Any]:
    try:
        header = read_gguf_header(path)
    except (ValueError, OSError) as e:
        raise ValueError(f"{path} is not a readable GGUF file: {e}") from e
    fields = header.metadata
    arch = meta(fields, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:  # before the tokenizer: the clearer error first
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(GGUF_ARCHITECTURES)}")
    tensors = {t.name: t for t in header.tensors}
    tokenizer = tokenizer_from_gguf(fields)
    config = config_from_gguf(fields, tensors, tokenizer)
    config.sampling_defaults = from_gguf_metadata(fields, f"{path}'s general.sampling metadata")

    bad = sorted({t.tensor_type.name for t in header.tensors if not can_dequantize(t.tensor_type)})
    if bad:
        ok = ", ".join(q.name for q in Q if can_dequantize(q))
        raise ValueError(f"{path}: unsupported tensor types {bad}; the gguf package can dequantize: {ok}")
    plan: list[tuple[GGUFTensor, str, int | None]] = []
    for t in header.tensors:
        name = hf_name(t.name)
        if name is None:
            if t.name not in _IGNORED:
                raise ValueError(f"{path}: unexpected tensor {t.name!r} for architecture {arch!r}")
            continue
        heads = None
        if arch in PERMUTED_ARCHITECTURES and ".attn_q." in t.name:
            heads = config.num_attention_heads
        elif arch in PERMUTED_ARCHITECTURES and ".attn_k." in t.name:
            heads = config.num_key_value_heads
        plan.append((t, name, heads))
    check_tensors({name: numpy_shape(t) for t, name, _ in plan}, config, str(path))

    def weights(skip: frozenset[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
        # The tensors' file map stays alive with this closure, so weights() can be called again.
        # `skip`: tensors the caller takes as stored blocks: never dequantized (seconds saved).
        todo = [e for e in plan if e[1] not in skip]
        for t, name, heads in track(todo, len(todo), f"loading {path.name}"):
            w = to_torch(t, tensor_to_numpy(t))
            yield name, (unpermute_rows(w, heads) if heads else w)

    def stored_types() -> dict[str, str]:
        return {name: t.tensor_type.name for t, name, _ in plan
                if gguf_blocks.decodable(t.tensor_type.name) and len(t.shape) == 2}

    def quantized() -> Iterator[tuple[str, Any]]:
        """The quantized tensors as stored (Q4_0/Q4_1/Q8_0), as codes and per-group scales,
        q/k rows un-permuted: what the int4/int8 paths run on without a float copy."""
        for t, name, heads in plan:
            if not gguf_blocks.decodable(t.tensor_type.name) or len(t.shape) != 2:
                continue
            shape = (int(t.shape[1]), int(t.shape[0]))
            groups = gguf_blocks.decode(t.tensor_type.name, t.data, shape)
            yield name, (groups.take_rows(gguf_blocks.unpermute_rows(shape[0], heads)) if heads else groups)

    return (config, tokenizer, weights, quantized, stored_precision(projection_types(header.tensors)),
            stored_types)
