"""Model runner: turns a scheduled step into one flattened batch, runs the model, samples.

Per step: token ids, positions and KV slots for every scheduled token
(decodes first), attention metadata, one forward pass for all prefill and
decode requests together, logits only for the rows that sample, then the
sampler. One device-to-host copy per step brings the sampled tokens back.
"""
from __future__ import annotations

import functools
import logging

import numpy as np
import torch

from lockgate.engine.attention.torch_paged import AttentionMetadata, PrefillSeq, group_prefills
from lockgate.engine.config import EngineConfig, ModelConfig
from lockgate.engine.core.kv_cache import blocks_for
from lockgate.engine.core.request import Request
from lockgate.engine.core.sampler import Sampler, SamplingBatch
from lockgate.engine.core.scheduler import ScheduledBatch
from lockgate.engine.loader import LoadedCheckpoint
from lockgate.engine.messages import TokenLogprob
from lockgate.engine.models.llama import LlamaForCausalLM
from lockgate.engine.native.decoder import NativeDecoder
from lockgate.engine.quant.quantize import quantize_model

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Steps whose attention covers more (query, key) pairs than this run the PyTorch model: the
# native decoder attends row by row, fine for decodes and short prompts (a 64-token prompt is
# 2,080 pairs), slower than SDPA for long ones.
NATIVE_MAX_ATTENTION = 1 << 16


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """bf16 matmuls beat fp32 several-fold on CPUs with AVX512-BF16 or AMX, and lose without."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available; use device='cpu'")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return DTYPES[name]
    if device.type == "cuda" or cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


@torch.no_grad()
def build_model(ckpt: LoadedCheckpoint, max_positions: int, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build parameters directly in the target dtype
    try:
        with torch.device(device):
            model = LlamaForCausalLM(ckpt.config, max_positions)
    finally:
        torch.set_default_dtype(prev)
    model.load_weights(ckpt.weights())
    return model.eval()


def kv_block_bytes(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return cfg.num_hidden_layers * 2 * block_size * cfg.num_key_value_heads * cfg.head_dim * elem


class ModelRunner:
    def __init__(self, config: EngineConfig, ckpt: LoadedCheckpoint, max_model_len: int) -> None:
        self.config = config
        self.model_config = ckpt.config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.block_size = config.block_size
        self.model = build_model(ckpt, max_model_len, self.device, self.dtype)
        self.kernels = "float"
        if config.quantization:
            above = config.quantization_float_above
            self.kernels = quantize_model(self.model, config.quantization, self.device, stored=ckpt.quantized,
                                          keep_float=above is not None, max_rows=above or 0,
                                          kernels=config.quantization_kernels)
        self.vocab_size = ckpt.config.vocab_size
        self.eos_token_ids = list(ckpt.tokenizer.eos_token_ids or ckpt.config.eos_token_ids)
        self.num_blocks = config.num_kv_blocks or max(
            1, int(config.kv_cache_memory_gb * 2**30) // kv_block_bytes(ckpt.config, self.block_size, self.dtype))
        cfg = ckpt.config
        shape = (self.num_blocks * self.block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                           torch.zeros(shape, dtype=self.dtype, device=self.device))
                          for _ in range(cfg.num_hidden_layers)]
        self.sampler = Sampler()
        # Steps of a block-quantized model (decodes, short prefills) run in one native call.
        self.native = NativeDecoder.build(self.model, self.kv_caches, self.block_size) \
            if self.kernels == "native" else None

    # ---- batch preparation -----------------------------------------------------
    def _slots(self, req: Request, start: int, end: int) -> np.ndarray:
        pos = np.arange(start, end)
        table = np.asarray(req.block_ids, dtype=np.int64)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int], list[int]]:
        """Returns input ids, positions, attention metadata, the batch entries that
        sample (in flattened order) and the flattened row of each one's last token."""
        order = sorted(range(len(batch)), key=lambda i: batch.num_tokens[i] != 1)  # decodes first
        ids: list[int] = []
        pos: list[np.ndarray] = []
        slots: list[np.ndarray] = []
        decode_ctx: list[tuple[list[int], int]] = []  # (block table, context length)
        prefills: list[PrefillSeq] = []
        samplers: list[int] = []
        rows: list[int] = []
        t = 0
        for i in order:
            req, start, n = batch.requests[i], batch.start[i], batch.num_tokens[i]
            end = start + n
            ids.extend(req.token_ids(start, end))
            pos.append(np.arange(start, end))
            slots.append(self._slots(req, start, end))
            table = req.block_ids[: blocks_for(end, self.block_size)]
            if n == 1:
                decode_ctx.append((table, end))
            else:
                blocks = None if start == 0 else torch.tensor(table, device=self.device)
                prefills.append(PrefillSeq(t, n, end, blocks))
            t += n
            if end == req.num_tokens:  # reached the end of what is known: sample the next token
                samplers.append(i)
                rows.append(t - 1)
        dev = self.device
        meta = AttentionMetadata(slot_mapping=torch.from_numpy(np.concatenate(slots)).to(dev),
                                 num_decodes=len(decode_ctx), prefills=prefills, block_size=self.block_size,
                                 prefill_groups=group_prefills(prefills, dev))
        if decode_ctx:
            nb = max(len(b) for b, _ in decode_ctx)
            table = np.zeros((len(decode_ctx), nb), dtype=np.int64)
            for j, (b, _) in enumerate(decode_ctx):
                table[j, : len(b)] = b
            ctx = torch.tensor([c for _, c in decode_ctx], device=dev)
            meta.decode_blocks = torch.from_numpy(table).to(dev)
            meta.decode_max_len = max(c for _, c in decode_ctx)
            meta.decode_mask = (torch.arange(nb * self.block_size, device=dev)[None, :] < ctx[:, None])[:, None, None, :]
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        positions = torch.from_numpy(np.concatenate(pos)).to(dev)
        return input_ids, positions, meta, samplers, rows

    # ---- the step ---------------------------------------------------------------
    def native_step(self, batch: ScheduledBatch) -> tuple[torch.Tensor, list[int], list[int]] | None:
        """The step through the native decoder, or None when its attention would be too costly.

        Every scheduled token is a row with its own position and the block table of its sequence;
        all rows' K/V are written before any row attends, so a row attending to the cache up to its
        own position is causal attention for prefill chunks too. Returns hidden states, the batch
        entries that sample and their rows."""
        if sum((s + n) * n for s, n in zip(batch.start, batch.num_tokens)) > NATIVE_MAX_ATTENTION:
            return None  # long prompts: PyTorch's fused SDPA does their attention far better
        bs = self.block_size
        total = batch.total_tokens
        ends = [s + n for s, n in zip(batch.start, batch.num_tokens)]
        nb = max(blocks_for(e, bs) for e in ends)
        ids = np.empty(total, dtype=np.int64)
        pos = np.empty(total, dtype=np.int64)
        slots = np.empty(total, dtype=np.int64)
        tables = np.zeros((total, nb), dtype=np.int64)
        samplers: list[int] = []
        rows: list[int] = []
        t = 0
        for i, (req, s, e) in enumerate(zip(batch.requests, batch.start, ends)):
            ids[t:t + e - s] = req.token_ids(s, e)
            pos[t:t + e - s] = np.arange(s, e)
            slots[t:t + e - s] = self._slots(req, s, e)
            table = req.block_ids[: blocks_for(e, bs)]
            tables[t:t + e - s, : len(table)] = table
            t += e - s
            if e == req.num_tokens:  # reached the end of what is known: sample the next token
                samplers.append(i)
                rows.append(t - 1)
        return self.native(ids, pos, slots, tables, pos + 1), samplers, rows

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> list[tuple[Request, int, TokenLogprob | None]]:
        step = self.native_step(batch) if self.native is not None and batch.requests else None
        if step is not None:
            hidden, samplers, rows = step
        else:
            input_ids, positions, meta, samplers, rows = self.prepare(batch)
            hidden = self.model(input_ids, positions, self.kv_caches, meta)
        if not samplers:
            return []
        logits = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)])
        reqs = [batch.requests[i] for i in samplers]
        for r in reqs:
            if r.params.seed is not None and r.generator is None:
                r.generator = torch.Generator(device=self.device).manual_seed(r.params.seed)
        sbatch = SamplingBatch.build(
            params=[r.params for r in reqs],
            prompt_token_ids=[r.prompt_token_ids for r in reqs],
            output_token_ids=[r.output_token_ids for r in reqs],
            generators=[r.generator for r in reqs],
            vocab_size=self.vocab_size,
            device=self.device,
            eos_token_ids=self.eos_token_ids,
        )
        out = self.sampler(logits, sbatch)
        tokens = out.token_ids.tolist()  # the step's one device-to-host sync
        lps = out.to_token_logprobs([r.params.logprobs for r in reqs])
        return list(zip(reqs, tokens, lps))
