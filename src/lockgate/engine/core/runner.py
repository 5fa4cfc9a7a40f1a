"""Model runner: turns a scheduled step into one flattened batch, runs the model, samples.

Per step: token ids, positions and KV slots for every scheduled token
(decodes first), attention metadata, one forward pass for all prefill and
decode requests together, logits only for the rows that sample, then the
sampler. One device-to-host copy per step brings the sampled tokens back.

Prompt logprobs: for the requests that ask, the LM head also runs over the prompt
positions of their chunks in the step (in slices of bounded size), and each
position's next prompt token is scored (logprob, rank, top alternatives) from
the float32 log-softmax. Requests that do not ask add no row and no sync.

Pooling (embeddings): a request with `embed` sums the final-normed hidden states of
its prompt positions as its chunks run (both paths, PyTorch and native, return every
row's); when its prompt is complete, the mean, L2-normalized, is its embedding.
"""
from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np
import torch

from lockgate.engine.attention.torch_paged import AttentionMetadata, PrefillSeq, group_prefills
from lockgate.engine.config import EngineConfig, ModelConfig
from lockgate.engine.core.kv_cache import blocks_for
from lockgate.engine.core.request import Request
from lockgate.engine.core.sampler import GrammarRows, Sampler, SamplingBatch
from lockgate.engine.core.spec_rows import SpecRows
from lockgate.engine.core.scheduler import ScheduledBatch
from lockgate.engine.loader import LoadedCheckpoint
from lockgate.engine.messages import TokenLogprob
from lockgate.engine.models.llama import LlamaForCausalLM
from lockgate.engine.native.build import load as load_native
from lockgate.engine.native.build import set_activation_bits, set_tiles, tiles_usable
from lockgate.engine.native.decoder import NativeDecoder, why_not
from lockgate.engine.quant.precision import resolve_kernels, resolve_quantization, why_float
from lockgate.engine.quant.quantize import quantize_model
from lockgate.engine.threads import threads_per_engine, usable_cores

if TYPE_CHECKING:
    from lockgate.engine.structured.decoding import StepMasks

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Steps whose attention covers more (query, key) pairs than this run the PyTorch model: the
# native decoder attends row by row, fine for decodes and short prompts (a 64-token prompt is
# 2,080 pairs), slower than SDPA for long ones.
NATIVE_MAX_ATTENTION = 1 << 16
# Prompt logprobs: logits of at most this many elements (rows x vocabulary) at a time (64 MiB).
PROMPT_LOGITS_ELEMS = 1 << 24
# Batch-invariant steps pad every matmul to at least this many rows: PyTorch's CPU float32 GEMM
# computes a lone row (and 2-3 rows) with other arithmetic than 4 or more (measured on AVX2: rows
# bit-identical from 4 up to 128; tests/engine/test_speculative.py checks it where it runs).
INVARIANT_MIN_ROWS = 4

# What a step gives each request that sampled: its new tokens and their logprobs (None: nothing
# sampled, max_tokens=0).
Sampled = tuple[Request, list[int] | None, list[TokenLogprob | None] | None]

# A chunk's positions owing prompt logprobs: (request, first position, end position (exclusive),
# flattened row of the first position).
_PromptSpan = tuple[Request, int, int, int]


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """bf16 matmuls beat fp32 several-fold on CPUs with AVX512-BF16 or AMX, and lose without."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def native_planned(quantization: str | None, kernels: str) -> bool:
    """Whether `quantization` (resolved: int4 | int8 | None) will put the model on the native kernels
    (quantize_model's own choice: int4 unless told "torch", int8 only when told "native"), where
    they build."""
    q, k = quantization, kernels
    if not ((q == "int4" and k in ("auto", "native")) or (q == "int8" and k == "native")):
        return False
    from lockgate.engine.native.build import load

    return load() is not None


def native_isa() -> str:
    """The instruction set the native kernels were built for (for the start-up log and benchmarks)."""
    from lockgate.engine.native.build import load

    lib = load()
    if lib is None:
        return "unavailable"
    from lockgate.engine.native.build import isa_name

    return isa_name(lib)


def set_threads(requested: int | None) -> int:
    """The engine process's intra-op threads: `requested`, or the cores this process may use
    (engine/threads.py: affinity and cgroup quota; a server passes each engine its share). An
    explicit count above the usable cores is kept, with a warning: the threads would contend."""
    cores = usable_cores()
    threads = requested or threads_per_engine(1, cores)
    if requested and requested > cores:
        log.warning("num_threads %d is more than the %d cores this process may use (affinity, cgroup "
                    "quota): the threads will contend for them", requested, cores)
    torch.set_num_threads(threads)
    return threads


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available; use device='cpu'")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device, native_kernels: bool = False) -> torch.dtype:
    """`native_kernels`: a block-quantized model that may run on the native CPU kernels, which take
    float32 activations: "auto" is float32 there even where bf16 matmuls are fast (AVX512-BF16),
    or every step would fall back to the PyTorch model."""
    if name != "auto":
        return DTYPES[name]
    if device.type == "cpu" and native_kernels:
        return torch.float32
    if device.type == "cuda" or cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


def resolve_kv_dtype(name: str, dtype_name: str, model_dtype: torch.dtype) -> torch.dtype:
    """The KV cache's element type. "auto" is 16-bit, except under an explicit dtype="float32" (a
    request for float32 numerics end to end, as vLLM's "auto" follows the model's dtype): the
    model's own dtype when it is 16-bit (nothing to convert), else float16 rather than bfloat16.
    Both convert cheaply on AVX2 (F16C's `vcvtph2ps`/`vcvtps2ph` one instruction per 8 values;
    bfloat16 a shift), and float16 keeps 3 more mantissa bits (relative rounding 2^-11 against
    2^-8). Its range (65,504) is ample for K/V; larger values are clamped on write, not stored
    as infinities."""
    if name != "auto":
        return DTYPES[name]
    if model_dtype in (torch.bfloat16, torch.float16):
        return model_dtype
    return torch.float32 if dtype_name == "float32" else torch.float16


@contextmanager
def _no_random_init() -> Iterator[None]:
    """Linear and Embedding layers skip their random init: `load_weights` sets every parameter
    (and refuses a checkpoint that leaves one out), so drawing ~135M random numbers was about
    0.5 s of the default model's cold start spent on values overwritten at once."""
    saved = torch.nn.Linear.reset_parameters, torch.nn.Embedding.reset_parameters
    torch.nn.Linear.reset_parameters = torch.nn.Embedding.reset_parameters = lambda self: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.nn.Linear.reset_parameters, torch.nn.Embedding.reset_parameters = saved  # type: ignore[method-assign]


@torch.no_grad()
def build_model(ckpt: LoadedCheckpoint, max_positions: int, device: torch.device, dtype: torch.dtype,
                skip: frozenset[str] = frozenset()) -> LlamaForCausalLM:
    """`skip`: checkpoint tensors that will be replaced by their stored blocks (never dequantized)."""
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build parameters directly in the target dtype
    try:
        with torch.device(device), _no_random_init():
            model = LlamaForCausalLM(ckpt.config, max_positions)
    finally:
        torch.set_default_dtype(prev)
    if skip:
        model.load_weights(ckpt.weights(skip), skipped=skip)  # type: ignore[call-arg]
    else:
        model.load_weights(ckpt.weights())
    return model.eval()


def stored_skip(ckpt: LoadedCheckpoint, quantization: str | None, native: bool, keep_float: bool) -> frozenset[str]:
    """The tensors a quantized native model takes as stored blocks, whose float copies would be
    dequantized only to be dropped (2.6 of the default model's 6 s of start-up): the projections
    stored in the method's own block type, and a Q8_0 embedding/LM head."""
    if not (native and quantization and not keep_float and ckpt.stored_types is not None):
        return frozenset()
    own = {"int4": ("Q4_0", "Q4_1"), "int8": ("Q8_0",)}[quantization]
    heads = ("model.embed_tokens.weight", "lm_head.weight")
    return frozenset(n for n, t in ckpt.stored_types().items()
                     if (t in own and n not in heads) or (t == "Q8_0" and n in heads))


def kv_block_bytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return cfg.num_hidden_layers * 2 * block_size * cfg.num_key_value_heads * cfg.head_dim * elem


class ModelRunner:
    def __init__(self, config: EngineConfig, ckpt: LoadedCheckpoint, max_model_len: int) -> None:
        self.config = config
        self.model_config = ckpt.config
        self.device = resolve_device(config.device)
        self.threads = set_threads(config.num_threads) if self.device.type == "cpu" else torch.get_num_threads()
        # What runs: the checkpoint's stored precision unless told (engine/quant/precision.py).
        stored = ckpt.stored_precision
        native_ok = self.device.type == "cpu" and stored is not None and load_native() is not None
        self.quantization = resolve_quantization(config.quantization, stored, self.device.type, native_ok)
        kernels = resolve_kernels(self.quantization, stored, config.quantization_kernels, native_ok)
        self.dtype = resolve_dtype(config.dtype, self.device,
                                   native_kernels=native_planned(self.quantization, kernels))
        self.block_size = config.block_size
        above = config.quantization_float_above
        skip = stored_skip(ckpt, self.quantization, native_planned(self.quantization, kernels), above is not None)
        self.model = build_model(ckpt, max_model_len, self.device, self.dtype, skip)
        self.kernels = "float"
        if self.quantization:
            self.kernels = quantize_model(self.model, self.quantization, self.device, stored=ckpt.quantized,
                                          keep_float=above is not None, max_rows=above or 0,
                                          kernels=kernels)
            if skip and not getattr(self.model, "all_stored", False):
                # Some skipped tensor was not taken as stored after all (a shape the kernels refuse,
                # a fused matrix with a part in another type): load every float weight and redo it.
                log.warning("not every skipped tensor was taken as stored: loading the float weights")
                self.model = build_model(ckpt, max_model_len, self.device, self.dtype)
                self.kernels = quantize_model(self.model, self.quantization, self.device, stored=ckpt.quantized,
                                              keep_float=above is not None, max_rows=above or 0,
                                              kernels=kernels)
        self.vocab_size = ckpt.config.vocab_size
        self.eos_token_ids = list(ckpt.tokenizer.eos_token_ids or ckpt.config.eos_token_ids)
        self.kv_dtype = resolve_kv_dtype(config.kv_cache_dtype, config.dtype, self.dtype)
        block_bytes = kv_block_bytes(ckpt.config, self.block_size, self.kv_dtype)
        self.num_blocks = config.num_kv_blocks or max(1, int(config.kv_cache_memory_gb * 2**30) // block_bytes)
        cfg = ckpt.config
        # One block past the pool, never handed out: the padding rows of a batch-invariant step
        # write their K/V there (and the step-cost calibration reads it).
        self.scratch_block = self.num_blocks
        shape = ((self.num_blocks + 1) * self.block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=self.kv_dtype, device=self.device),
                           torch.zeros(shape, dtype=self.kv_dtype, device=self.device))
                          for _ in range(cfg.num_hidden_layers)]
        log.info("KV cache: %d blocks of %d tokens, %s (%d bytes a value), %.2f GiB",
                 self.num_blocks, self.block_size, str(self.kv_dtype).removeprefix("torch."),
                 self.kv_dtype.itemsize, self.num_blocks * block_bytes / 2**30)
        self.sampler = Sampler()
        # Steps of a block-quantized model (decodes, short prefills) run in one native call.
        self.native: NativeDecoder | None = None
        self.path = "PyTorch model"  # which path the steps take, for the log and the benchmarks
        if self.kernels == "native":
            reason = why_not(self.model, self.kv_caches)
            if reason is None:
                self.native = NativeDecoder(self.model, self.kv_caches, self.block_size)
                self.path = "fused native decode (lg_decode)"
            else:  # ~3x slower: one OpenMP fork per matmul, PyTorch attention
                self.path = f"PyTorch model with native block matmuls, not the fused decode: {reason}"
                log.warning("%s runs off the fused native decode path (%s): every step runs the PyTorch "
                            "model layer by layer, about 3x slower (dtype %s; dtype auto picks what the "
                            "fused path takes)", self.quantization, reason, _name(self.dtype))
        self.batch_invariant = self._resolve_batch_invariant()
        # The native path's rows are batch-invariant by construction, except on AMX tiles (steps of
        # 16+ rows sum in another order): speculation and batch_invariant keep the tiles off.
        self.tiles = not (self.config.batch_invariant or self.config.speculative_config is not None)
        if self.kernels == "native":
            set_tiles(self.tiles)
        log.info("%s", self.describe(ckpt.stored_precision))

    def _resolve_batch_invariant(self) -> bool:
        """Whether the PyTorch path pads and attends row by row (EngineConfig.batch_invariant; the
        native path is batch-invariant by construction: every row's arithmetic is its own)."""
        asked = self.config.batch_invariant
        if asked is None:
            asked = self.config.speculative_config is not None and self.native is None
        if asked and self.device.type != "cpu":
            log.warning("batch_invariant: not available on %s (its matmul kernels split by batch size): a "
                        "request's greedy tokens may differ with the batch, speculation included", self.device)
            return False
        return bool(asked) and self.native is None

    def describe(self, stored: str | None) -> str:
        """The start-up line: the precision that runs and why, the steps' path, the kernels (and
        the instruction set they were built for), the dtypes and the threads."""
        config = self.config
        if self.quantization is None:
            why = why_float(config.quantization, stored, self.device.type)
            precision = f"precision none (float {_name(self.dtype)}: {why})"
        else:
            source = "the checkpoint's own blocks" if stored == self.quantization else "quantized at load"
            asked = "the stored precision" if config.quantization == "auto" else f"quantization={config.quantization!r}"
            precision = f"precision {self.quantization} ({asked}, {source})"
        kernels = f"native {native_isa()}" if self.kernels == "native" else self.kernels
        if self.kernels == "native":
            kernels += f", {config.quantization_activations} activations"
            if not self.tiles and tiles_usable():
                kernels += " (AMX tiles off: speculation and batch_invariant need every row computed alike in any batch)"
        if self.kernels == "torch":
            kernels = "PyTorch int kernels"
        invariant = "; batch-invariant rows (padded matmuls, row-wise attention)" if self.batch_invariant else ""
        return (f"{precision}; steps: {self.path}; kernels: {kernels}; dtype {_name(self.dtype)}, KV cache "
                f"{_name(self.kv_caches[0][0].dtype)}; {self.threads} threads ({usable_cores()} usable cores)"
                f"{invariant}")

    # ---- batch preparation -----------------------------------------------------
    def _slots(self, req: Request, start: int, end: int) -> np.ndarray:
        pos = np.arange(start, end)
        table = np.asarray(req.block_ids, dtype=np.int64)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, StepRows]:
        """Returns input ids, positions, attention metadata and the rows the head runs on. A decode
        with proposals (speculative decoding) is laid out as one decode row per position, so each
        verify row attends exactly as a one-row decode step would."""
        decodes = [i for i in range(len(batch)) if batch.num_tokens[i] == 1 or batch.requests[i].spec_token_ids]
        chosen = set(decodes)
        order = decodes + [i for i in range(len(batch)) if i not in chosen]
        ids: list[int] = []
        pos: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        decode_ctx: list[tuple[list[int], int]] = []  # (block table, context length)
        prefills: list[PrefillSeq] = []
        head = StepRows()
        t = 0
        for k, i in enumerate(order):
            req, start, n = batch.requests[i], batch.start[i], batch.num_tokens[i]
            end = start + n
            if k == len(decodes) and self.batch_invariant and t < INVARIANT_MIN_ROWS:
                t = self._pad_rows(INVARIANT_MIN_ROWS - t, ids, pos, slots, decode_ctx, t)
            ids.extend(req.token_ids(start, end))
            pos.append(np.arange(start, end))
            slots.append(self._slots(req, start, end))
            if i in chosen:
                for p in range(start + 1, end + 1):
                    decode_ctx.append((req.block_ids[: blocks_for(p, self.block_size)], p))
            else:
                table = req.block_ids[: blocks_for(end, self.block_size)]
                blocks = None if start == 0 else torch.tensor(table, device=self.device)
                prefills.append(PrefillSeq(t, n, end, blocks))
            if req.prompt_logprobs is not None:
                head.add_prompt_span(req, start, end, t)
            if req.params.embed:
                head.add_pool_span(req, start, end, t)
            t += n
            head.add_step_end(req, i, end, t - 1)
        if len(decodes) == len(order) and self.batch_invariant and t < INVARIANT_MIN_ROWS:
            t = self._pad_rows(INVARIANT_MIN_ROWS - t, ids, pos, slots, decode_ctx, t)
        meta = self._metadata(np.concatenate(slots), decode_ctx, prefills)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        positions = torch.from_numpy(np.concatenate(pos)).to(self.device)
        return input_ids, positions, meta, head

    def _metadata(self, slots: np.ndarray, decode_ctx: list[tuple[list[int], int]],
                  prefills: list[PrefillSeq]) -> AttentionMetadata:
        dev = self.device
        meta = AttentionMetadata(slot_mapping=torch.from_numpy(slots).to(dev),
                                 num_decodes=len(decode_ctx), prefills=prefills, block_size=self.block_size,
                                 prefill_groups=group_prefills(prefills, dev), row_invariant=self.batch_invariant)
        if decode_ctx:
            nb = max(len(b) for b, _ in decode_ctx)
            table = np.zeros((len(decode_ctx), nb), dtype=np.int64)
            for j, (b, _) in enumerate(decode_ctx):
                table[j, : len(b)] = b
            ctx = torch.tensor([c for _, c in decode_ctx], device=dev)
            meta.decode_blocks = torch.from_numpy(table).to(dev)
            meta.decode_max_len = max(c for _, c in decode_ctx)
            meta.decode_lens = [c for _, c in decode_ctx]
            meta.decode_mask = (torch.arange(nb * self.block_size, device=dev)[None, :] < ctx[:, None])[:, None, None, :]
        return meta

    @torch.inference_mode()
    def measure_rows(self, counts: list[int], context: int = 128, reps: int = 3) -> dict[int, float]:
        """Seconds of a step of M decode rows (model and LM head, each row at `context` tokens), for
        each M in `counts`: the cost curve speculative decoding plans with. Run at start-up, before
        any request holds a block (it reads pool blocks and writes only the scratch block)."""
        bs = self.block_size
        context = max(1, min(context, self.num_blocks * bs, self.model.rope.cos.shape[0]))
        table = list(range(blocks_for(context, bs)))
        slot = self.scratch_block * bs
        out = {m: float("inf") for m in counts}

        def one(m: int) -> float:
            ids = np.zeros(m, dtype=np.int64)
            pos = np.full(m, context - 1, dtype=np.int64)
            t0 = time.perf_counter()
            if self.native is not None:
                hidden = self.native(ids, pos, np.full(m, slot, dtype=np.int64),
                                     np.tile(np.asarray(table, dtype=np.int64), (m, 1)), pos + 1)
            else:
                meta = self._metadata(np.full(m, slot, dtype=np.int64), [(table, context)] * m, [])
                hidden = self.model(torch.from_numpy(ids).to(self.device), torch.from_numpy(pos).to(self.device),
                                    self.kv_caches, meta)
            self.logits(hidden).sum().item()  # waits for the device
            return time.perf_counter() - t0

        one(counts[0])  # warm-up
        # Rounds over all the counts, the best of each kept: a burst of load from another process
        # slows one round of every count, not every rep of one count, so the ratios survive it.
        for _ in range(reps):
            for m in counts:
                out[m] = min(out[m], one(m))
        return out

    def _pad_rows(self, count: int, ids: list[int], pos: list[np.ndarray], slots: list[np.ndarray],
                  decode_ctx: list[tuple[list[int], int]], t: int) -> int:
        """Batch-invariant steps: `count` dummy decode rows (token 0 at position 0, in the scratch
        block), so every matmul has at least INVARIANT_MIN_ROWS rows: the kernels change their
        arithmetic below that, and a row must not compute differently with fewer neighbours."""
        ids.extend([0] * count)
        pos.append(np.zeros(count, dtype=np.int64))
        slots.append(np.full(count, self.scratch_block * self.block_size, dtype=np.int64))
        decode_ctx.extend(([self.scratch_block], 1) for _ in range(count))
        return t + count

    # ---- the step ---------------------------------------------------------------
    def native_step(self, batch: ScheduledBatch, force: bool = False) -> tuple[torch.Tensor, StepRows] | None:
        """The step through the native decoder, or None when its attention would be too costly.

        Every scheduled token is a row with its own position and the block table of its sequence;
        all rows' K/V are written before any row attends, so a row attending to the cache up to its
        own position is causal attention for prefill chunks too. Returns the hidden states of every
        row (final-normed) and the rows the head runs on."""
        if not force and sum((s + n) * n for s, n in zip(batch.start, batch.num_tokens)) > NATIVE_MAX_ATTENTION:
            return None  # long prompts: PyTorch's fused SDPA does their attention far better
        bs = self.block_size
        total = batch.total_tokens
        ends = [s + n for s, n in zip(batch.start, batch.num_tokens)]
        nb = max(blocks_for(e, bs) for e in ends)
        ids = np.empty(total, dtype=np.int64)
        pos = np.empty(total, dtype=np.int64)
        slots = np.empty(total, dtype=np.int64)
        tables = np.zeros((total, nb), dtype=np.int64)
        head = StepRows()
        t = 0
        for i, (req, s, e) in enumerate(zip(batch.requests, batch.start, ends)):
            ids[t:t + e - s] = req.token_ids(s, e)
            pos[t:t + e - s] = np.arange(s, e)
            slots[t:t + e - s] = self._slots(req, s, e)
            table = req.block_ids[: blocks_for(e, bs)]
            tables[t:t + e - s, : len(table)] = table
            if req.prompt_logprobs is not None:
                head.add_prompt_span(req, s, e, t)
            if req.params.embed:
                head.add_pool_span(req, s, e, t)
            t += e - s
            head.add_step_end(req, i, e, t - 1)
        return self.native(ids, pos, slots, tables, pos + 1), head

    def split_step(self, batch: ScheduledBatch) -> tuple[torch.Tensor, StepRows] | None:
        """A step whose prefills are too long for the native attention: its decode rows (and verify
        rows) still run the fused native step, the prefills the PyTorch model (two calls, one
        hidden-state tensor). A decode row then computes the same whatever prefill shares its step,
        which keeps greedy output independent of the batch (and of speculation). None: nothing to split."""
        dec = [i for i in range(len(batch)) if batch.num_tokens[i] == 1 or batch.requests[i].spec_token_ids]
        if not dec or len(dec) == len(batch):
            return None
        taken = set(dec)
        rest = [i for i in range(len(batch)) if i not in taken]
        parts = []
        for idx in (dec, rest):
            sub = ScheduledBatch([batch.requests[i] for i in idx], [batch.num_tokens[i] for i in idx],
                                 [batch.start[i] for i in idx])
            parts.append(sub)
        hd, head_d = self.native_step(parts[0], force=True)  # type: ignore[misc]
        input_ids, positions, meta, head_p = self.prepare(parts[1])
        hp = self.model(input_ids, positions, self.kv_caches, meta)
        return torch.cat([hd, hp.to(hd.dtype)]), head_d.merged(dec, head_p, rest, hd.shape[0])

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch, masks: StepMasks | None = None) -> list[Sampled]:
        """(request, its new tokens, their logprobs) per request that reached the end of its known
        tokens: one token, or with proposals (speculative decoding) the accepted ones and the next
        (`req.spec_accepted` says how many were accepted); None for a request whose prompt finished
        with max_tokens=0 (nothing sampled). Prompt logprobs computed in the step are added to their
        requests. `masks`: the structured outputs' bitmasks of the constrained requests that sample."""
        if self.kernels == "native":  # the kernels' settings are per process; several LLMs may share them
            set_activation_bits(16 if self.config.quantization_activations == "int16" else 8)
            set_tiles(self.tiles)
        step = self.native_step(batch) if self.native is not None and batch.requests else None
        if step is None and self.native is not None and batch.requests:
            step = self.split_step(batch)
        if step is not None:
            hidden, head = step
        else:
            input_ids, positions, meta, head = self.prepare(batch)
            hidden = self.model(input_ids, positions, self.kv_caches, meta)
        if head.prompt_spans:
            self.prompt_logprobs(hidden, head.prompt_spans)
        if head.pool_spans:
            pool(hidden, head.pool_spans)
        out: list[Sampled] = []
        if head.samplers:
            out = self.sample(batch, hidden, head, masks)
        if head.no_sample:
            out.extend((req, None, None) for req in head.no_sample)
        return out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head over `hidden`'s rows (padded to the invariant minimum when batch-invariant)."""
        n = hidden.shape[0]
        if self.batch_invariant and n < INVARIANT_MIN_ROWS:
            hidden = torch.cat([hidden, hidden[:1].expand(INVARIANT_MIN_ROWS - n, -1)])
            return self.model.compute_logits(hidden)[:n]
        return self.model.compute_logits(hidden)

    def sample(self, batch: ScheduledBatch, hidden: torch.Tensor, head: StepRows,
               masks: StepMasks | None = None) -> list[Sampled]:
        logits = self.logits(hidden[torch.tensor(head.rows, device=self.device)])
        reqs = [batch.requests[i] for i in head.samplers]
        rows = SpecRows.lay_out(reqs, head.counts, self.device)
        sbatch = SamplingBatch.build(
            params=rows.params,
            prompt_token_ids=rows.prompts,
            output_token_ids=rows.outputs,
            generators=rows.generators,
            vocab_size=self.vocab_size,
            device=self.device,
            eos_token_ids=self.eos_token_ids,
            grammar=_grammar_rows(rows.requests, masks),
        )
        out = self.sampler(logits, sbatch)
        tokens = out.token_ids.tolist()  # the step's one device-to-host sync
        lps = out.to_token_logprobs([p.logprobs for p in rows.params])
        return rows.verify(reqs, head.counts, tokens, lps, self.vocab_size)

    def prompt_logprobs(self, hidden: torch.Tensor, spans: list[_PromptSpan]) -> None:
        """Score the next prompt token at each position of `spans`: its logprob (float32
        log-softmax over the vocabulary), its rank and the request's top-N alternatives; appended
        to each request's prompt logprobs in position order."""
        dev = self.device
        rows = np.concatenate([np.arange(r0, r0 + hi - lo) for _, lo, hi, r0 in spans])
        targets = np.concatenate([np.asarray(req.prompt_token_ids[lo + 1:hi + 1], dtype=np.int64)
                                  for req, lo, hi, _ in spans])
        k = max(req.params.prompt_logprobs or 0 for req, *_ in spans)
        head_q = self.model.head_q
        step = max(1, PROMPT_LOGITS_ELEMS // self.vocab_size)
        lps, ranks, top_lps, top_ids = [], [], [], []
        for a in range(0, len(rows), step):
            h = hidden[torch.from_numpy(rows[a:a + step]).to(dev)]
            t = torch.from_numpy(targets[a:a + step]).to(dev)[:, None]
            x = self.model.compute_logits(h).float()
            if head_q is not None:
                # A quantized head's logits are exact only for its best candidates: the scored
                # token's is recomputed exactly, as the sampled token's is when it is among them.
                x.scatter_(1, t, head_q.token_logits(h, t[:, 0])[:, None])
            target = x.gather(1, t)
            lse = torch.logsumexp(x, dim=-1, keepdim=True)
            lps.append((target - lse)[:, 0])
            ranks.append((x > target).sum(dim=-1) + 1)
            if k:
                v, i = x.topk(k, dim=-1)
                top_lps.append(v - lse)
                top_ids.append(i)
        lp = torch.cat(lps).tolist()  # one device-to-host copy per tensor, for these requests only
        rank = torch.cat(ranks).tolist()
        tl = torch.cat(top_lps).tolist() if k else None
        ti = torch.cat(top_ids).tolist() if k else None
        j = 0
        for req, lo, hi, _ in spans:
            n = req.params.prompt_logprobs or 0
            entries = req.prompt_logprobs
            assert entries is not None and lo == req.num_prompt_logprobs
            for r in range(j, j + hi - lo):
                top = list(zip(ti[r][:n], tl[r][:n])) if n else []
                entries.append(TokenLogprob(logprob=lp[r], top=top, rank=rank[r]))
            req.num_prompt_logprobs = hi
            j += hi - lo


def pool(hidden: torch.Tensor, spans: list[_PromptSpan]) -> None:
    """Pooling requests: add their rows' hidden states (float32) to their sums; a request whose
    prompt is complete gets its embedding, the mean over the prompt L2-normalized."""
    for req, lo, hi, r0 in spans:
        part = hidden[r0:r0 + hi - lo].float().sum(dim=0)
        req.pooled = part if req.pooled is None else req.pooled + part
        req.num_pooled = hi
        if hi == req.num_prompt_tokens:
            mean = req.pooled / hi
            vec = mean / mean.norm().clamp_min(1e-12)
            req.embedding = vec.cpu().numpy().astype("<f4").tobytes()
            req.pooled = None


def _grammar_rows(reqs: list[Request], masks: StepMasks | None) -> GrammarRows | None:
    # (`reqs`: one entry per sampling row; a constrained request never has proposals, so one row.)
    """The step's bitmasks in the sampler's row order (None: no constrained row)."""
    if masks is None:
        return None
    rows, index = [], []
    for j, r in enumerate(reqs):
        k = masks.rows.get(r.request_id)
        if k is not None:
            rows.append(j)
            index.append(k)
    if not rows:
        return None
    return GrammarRows(rows=rows, bitmask=np.ascontiguousarray(masks.bitmask[index]),
                       complete=[masks.complete[k] for k in index])


class StepRows:
    """The rows of a step's hidden states the LM head runs on, gathered while the batch is laid
    out: samplers (batch entries that sample) and their rows; requests whose prompt finished
    without sampling (max_tokens=0); prompt-logprob spans; pooling spans (embeddings)."""

    __slots__ = ("samplers", "rows", "counts", "no_sample", "prompt_spans", "pool_spans")

    def __init__(self) -> None:
        self.samplers: list[int] = []
        self.rows: list[int] = []  # every sampling row, a sampler's consecutively
        self.counts: list[int] = []  # sampling rows per sampler: 1, or 1 + its proposals
        self.no_sample: list[Request] = []
        self.prompt_spans: list[_PromptSpan] = []
        self.pool_spans: list[_PromptSpan] = []

    def add_step_end(self, req: Request, entry: int, end: int, row: int) -> None:
        """Entry `entry` computed up to position `end` (exclusive), its last row at `row`: it samples
        when that is the end of its known tokens, and every proposal's row with it."""
        k = len(req.spec_token_ids)
        if end != req.num_tokens + k:
            return  # a prefill chunk short of the end
        if not req.max_tokens:
            self.no_sample.append(req)
            return
        self.samplers.append(entry)
        self.rows.extend(range(row - k, row + 1))
        self.counts.append(k + 1)

    def merged(self, mine: list[int], other: StepRows, theirs: list[int], offset: int) -> StepRows:
        """These rows (of batch entries `mine`) and `other`'s (entries `theirs`, rows after `offset`)
        as one step's: entry indices back to the whole batch's, the other's rows shifted."""
        out = StepRows()
        out.samplers = [mine[i] for i in self.samplers] + [theirs[i] for i in other.samplers]
        out.rows = self.rows + [r + offset for r in other.rows]
        out.counts = self.counts + other.counts
        out.no_sample = self.no_sample + other.no_sample
        out.prompt_spans = self.prompt_spans + [(q, lo, hi, r0 + offset) for q, lo, hi, r0 in other.prompt_spans]
        out.pool_spans = self.pool_spans + [(q, lo, hi, r0 + offset) for q, lo, hi, r0 in other.pool_spans]
        return out

    def add_prompt_span(self, req: Request, start: int, end: int, row0: int) -> None:
        """Positions [start, end) of a request with prompt logprobs, position `start` at row `row0`."""
        lo, hi = req.prompt_logprob_span(start, end)
        if lo < hi:
            self.prompt_spans.append((req, lo, hi, row0 + lo - start))

    def add_pool_span(self, req: Request, start: int, end: int, row0: int) -> None:
        """Positions [start, end) of a pooling request, position `start` at row `row0`."""
        lo, hi = req.pool_span(start, end)
        if lo < hi:
            self.pool_spans.append((req, lo, hi, row0 + lo - start))
