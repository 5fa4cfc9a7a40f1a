"""Vectorised sampling for one engine step.

`SamplingBatch.build` turns the step's per-request `SamplingParams` into device
tensors once (host work is proportional to the batch and the penalised token
lists, never to the vocabulary; no Python loop touches the vocabulary). `Sampler` then runs, in order
(vLLM's): grammar bitmasks (structured outputs, constrained rows only), allowed_token_ids,
bans (bad words, min_tokens), logit_bias, penalties, temperature, top-k, top-p, min-p and
the draw. Each stage is skipped when no row in
the batch uses it, so an all-greedy batch is one argmax. Logprobs are the model's own
(taken before any of these stages), as vLLM reports them.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch

from lockgate.engine.messages import TokenLogprob
from lockgate.engine.sampling_params import SamplingParams


@dataclass(slots=True)
class GrammarRows:
    """Structured outputs' token bitmasks for some rows of a step (engine/structured/)."""

    rows: list[int]  # the batch row of each bitmask row
    bitmask: np.ndarray  # [R, ceil(V'/32)] int32: bit t of word t // 32 set = token t allowed (V' >= V)
    complete: list[bool]  # that row's grammar allows only EOS (min_tokens must not ban it)


@dataclass(slots=True)
class SamplingBatch:
    batch_size: int
    vocab_size: int
    all_greedy: bool
    greedy: torch.Tensor | None  # [B] bool; None unless the batch mixes greedy and random rows
    temperature: torch.Tensor | None  # [B, 1] f32 (1.0 on greedy rows); None when all are 1.0
    top_k: torch.Tensor | None  # [B, 1] int64, 0 where disabled
    max_top_k: int
    top_p: torch.Tensor | None  # [B, 1] f32
    min_p: torch.Tensor | None  # [B, 1] f32
    # Penalties are sparse: flat indices (row * V + token) of the logits they touch, so their
    # cost follows the number of distinct seen tokens, not B x V.
    repetition_index: torch.Tensor | None  # [N] int64: tokens seen in prompt or output
    repetition_penalty: torch.Tensor | None  # [N] f32: that row's penalty
    penalty_index: torch.Tensor | None  # [M] int64: tokens seen in the output
    penalty_delta: torch.Tensor | None  # [M] f32: frequency * count + presence, subtracted
    # [K] int64: flat indices set to -inf: stop/eos tokens under min_tokens, and bad words
    # (a one-token word always; a longer one's last token when the output ends with the rest).
    banned_index: torch.Tensor | None
    bias_index: torch.Tensor | None  # [L] int64: flat indices of logit_bias entries
    bias_value: torch.Tensor | None  # [L] f32: added to those logits
    allowed_rows: torch.Tensor | None  # [R] int64: rows with allowed_token_ids
    allowed_mask: torch.Tensor | None  # [R, V] bool: True where that row may sample
    grammar_rows: torch.Tensor | None  # [G] int64: constrained rows (structured outputs)
    grammar_banned: torch.Tensor | None  # [G, V] bool: True where the grammar forbids the token
    grammar_all_rows: bool  # the constrained rows are the whole batch, in order (no gather/scatter)
    seeded: list[tuple[int, torch.Generator]]  # random rows that draw from their own generator
    max_num_logprobs: int | None  # K = largest `logprobs` in the batch; None: nobody asked

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        generators: list[torch.Generator | None],
        vocab_size: int,
        device: torch.device,
        eos_token_ids: list[int],
        grammar: GrammarRows | None = None,
    ) -> SamplingBatch:
        B, V = len(params), vocab_size
        if not (len(prompt_token_ids) == len(output_token_ids) == len(generators) == B):
            raise ValueError("params, prompt_token_ids, output_token_ids and generators need one entry per row")
        greedy = [p.is_greedy for p in params]
        all_greedy = all(greedy)
        random_rows = [p for p, g in zip(params, greedy) if not g]

        def col(values: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device).unsqueeze(1)

        # Greedy rows get neutral values: their token is the argmax taken before these stages.
        temperature = top_k = top_p = min_p = None
        if any(p.temperature != 1.0 for p in random_rows):
            temperature = col([1.0 if g else p.temperature for p, g in zip(params, greedy)])
        ks = [0 if g or not p.top_k_enabled or p.top_k >= V else p.top_k for p, g in zip(params, greedy)]
        max_top_k = max(ks, default=0)
        if max_top_k:
            top_k = col(ks, torch.int64)
        if any(p.top_p < 1.0 for p in random_rows):
            top_p = col([1.0 if g else p.top_p for p, g in zip(params, greedy)])
        if any(p.min_p > 0.0 for p in random_rows):
            min_p = col([0.0 if g else p.min_p for p, g in zip(params, greedy)])

        # Penalties apply to greedy rows too (they change the argmax).
        repetition_index = repetition_penalty = None
        rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
        if rows:
            index, row_of, _ = _unique_tokens([prompt_token_ids[i] + output_token_ids[i] for i in rows], rows, V)
            per_row = np.array([p.repetition_penalty for p in params], dtype=np.float32)
            repetition_index = torch.from_numpy(index).to(device)
            repetition_penalty = torch.from_numpy(per_row[row_of]).to(device)

        penalty_index = penalty_delta = None
        rows = [i for i, p in enumerate(params) if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0]
        if rows:
            index, row_of, counts = _unique_tokens([output_token_ids[i] for i in rows], rows, V)
            freq = np.array([p.frequency_penalty for p in params], dtype=np.float32)
            pres = np.array([p.presence_penalty for p in params], dtype=np.float32)
            delta = freq[row_of] * counts + pres[row_of]  # OpenAI: freq * count + presence * (count > 0)
            penalty_index = torch.from_numpy(index).to(device)
            penalty_delta = torch.from_numpy(delta.astype(np.float32)).to(device)

        # min_tokens: ban every token that would end the request early (as vLLM: the
        # stop_token_ids and, unless ignore_eos, the eos ids).
        banned: list[int] = []
        # A complete grammar allows only EOS: min_tokens yields to it (or nothing could be sampled).
        done = {r for r, c in zip(grammar.rows, grammar.complete) if c} if grammar is not None else ()
        for i, p in enumerate(params):
            if len(output_token_ids[i]) < p.min_tokens and i not in done:
                ids = set(p.stop_token_ids or ())
                if not p.ignore_eos:
                    ids.update(eos_token_ids)
                banned.extend(i * V + t for t in ids if 0 <= t < V)
        bias_index = bias_value = allowed_rows = allowed_mask = None
        if any(p.has_logit_processors for p in params):
            bias_index, bias_value, allowed_rows, allowed_mask = _logit_processors(
                params, output_token_ids, V, device, banned)
        banned_index = torch.tensor(banned, dtype=torch.int64, device=device) if banned else None
        grammar_rows = grammar_banned = None
        if grammar is not None and grammar.rows:
            grammar_rows = torch.tensor(grammar.rows, dtype=torch.int64, device=device)
            grammar_banned = _grammar_banned(grammar.bitmask, V, device)

        wanted = [p.logprobs for p in params if p.logprobs is not None]
        return cls(
            batch_size=B,
            vocab_size=V,
            all_greedy=all_greedy,
            greedy=torch.tensor(greedy, dtype=torch.bool, device=device) if any(greedy) and not all_greedy else None,
            temperature=temperature,
            top_k=top_k,
            max_top_k=max_top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_index=repetition_index,
            repetition_penalty=repetition_penalty,
            penalty_index=penalty_index,
            penalty_delta=penalty_delta,
            banned_index=banned_index,
            bias_index=bias_index,
            bias_value=bias_value,
            allowed_rows=allowed_rows,
            allowed_mask=allowed_mask,
            grammar_rows=grammar_rows,
            grammar_banned=grammar_banned,
            grammar_all_rows=grammar is not None and grammar.rows == list(range(B)),
            seeded=[(i, g) for i, g in enumerate(generators) if g is not None and not greedy[i]],
            max_num_logprobs=max(wanted) if wanted else None,
        )

    @property
    def needs_logit_edits(self) -> bool:
        return (
            self.repetition_index is not None
            or self.penalty_index is not None
            or self.banned_index is not None
            or self.bias_index is not None
            or self.allowed_rows is not None
            or self.grammar_rows is not None
        )


def _logit_processors(params: list[SamplingParams], output_token_ids: list[list[int]], V: int,
                      device: torch.device, banned: list[int]) -> tuple[torch.Tensor | None, ...]:
    """logit_bias, allowed_token_ids and bad words of the rows that have them (ids outside [0, V)
    are ignored here: the frontend and the core refuse them). Bad words' bans go into `banned`."""
    bias_idx: list[int] = []
    bias_val: list[float] = []
    allowed: list[tuple[int, list[int]]] = []
    for i, p in enumerate(params):
        if p.logit_bias:
            for t, b in p.logit_bias.items():
                if 0 <= t < V:
                    bias_idx.append(i * V + t)
                    bias_val.append(b)
        if p.allowed_token_ids is not None:
            allowed.append((i, [t for t in p.allowed_token_ids if 0 <= t < V]))
        if p.bad_words_token_ids:
            out = output_token_ids[i]
            for word in p.bad_words_token_ids:
                last, prefix = word[-1], word[:-1]
                # vLLM's rule: the prefix must be the output's tail (prompt tokens never count).
                if 0 <= last < V and len(prefix) <= len(out) and (not prefix or out[-len(prefix):] == prefix):
                    banned.append(i * V + last)
    bias_index = bias_value = allowed_rows = allowed_mask = None
    if bias_idx:
        bias_index = torch.tensor(bias_idx, dtype=torch.int64, device=device)
        bias_value = torch.tensor(bias_val, dtype=torch.float32, device=device)
    if allowed:
        mask = np.zeros((len(allowed), V), dtype=np.bool_)
        for j, (_, ids) in enumerate(allowed):
            mask[j, ids] = True
        allowed_rows = torch.tensor([i for i, _ in allowed], dtype=torch.int64, device=device)
        allowed_mask = torch.from_numpy(mask).to(device)
    return bias_index, bias_value, allowed_rows, allowed_mask


def _unique_tokens(token_lists: list[list[int]], rows: list[int], V: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct (row, token) pairs as flat indices row * V + token, with their rows and counts.

    Host-side in numpy: the lists come from Python anyway, and numpy is many times faster
    than torch's CPU indexing for arrays this small. Ids outside [0, V) are ignored, since
    a tokenizer may know ids the model's logits don't cover.
    """
    lengths = np.fromiter(map(len, token_lists), dtype=np.int64, count=len(token_lists))
    ids = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=np.int64, count=int(lengths.sum()))
    row_of = np.repeat(np.asarray(rows, dtype=np.int64), lengths)
    keep = (ids >= 0) & (ids < V)
    flat, counts = np.unique(row_of[keep] * V + ids[keep], return_counts=True)
    return flat, flat // V, counts.astype(np.float32)


@dataclass(slots=True)
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None  # [B] raw logprob of the sampled token
    top_ids: torch.Tensor | None  # [B, K]
    top_logprobs: torch.Tensor | None  # [B, K]

    def to_token_logprobs(self, requested: list[int | None]) -> list[TokenLogprob | None]:
        """Host-side conversion; `requested[i]` is row i's `logprobs` (None: not wanted)."""
        if self.logprobs is None:
            return [None] * len(requested)
        sampled = self.logprobs.tolist()
        top_ids = self.top_ids.tolist() if self.top_ids is not None else None
        top_lps = self.top_logprobs.tolist() if self.top_logprobs is not None else None
        out: list[TokenLogprob | None] = []
        for i, k in enumerate(requested):
            if k is None:
                out.append(None)
            elif k == 0 or top_ids is None:
                out.append(TokenLogprob(logprob=sampled[i]))
            else:
                out.append(TokenLogprob(logprob=sampled[i], top=list(zip(top_ids[i][:k], top_lps[i][:k]))))
        return out


class Sampler:
    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != batch.batch_size or logits.shape[1] != batch.vocab_size:
            raise ValueError(
                f"logits shape {tuple(logits.shape)} does not match batch ({batch.batch_size}, {batch.vocab_size})"
            )
        edits = batch.needs_logit_edits or not batch.all_greedy
        if not edits and batch.max_num_logprobs is None:
            # Fast path: argmax is exact in the model's dtype, no float32 copy needed.
            return SamplerOutput(token_ids=logits.argmax(dim=-1), logprobs=None, top_ids=None, top_logprobs=None)
        # Work in float32; copy when we will edit in place so the caller's tensor is untouched.
        x = logits.to(torch.float32, copy=edits).contiguous()
        logprobs = top_ids = top_logprobs = None
        if batch.max_num_logprobs is not None:
            # Logprobs of the model's own distribution, before penalties and temperature.
            all_lp = torch.log_softmax(x, dim=-1)
            if batch.max_num_logprobs > 0:
                top_logprobs, top_ids = all_lp.topk(batch.max_num_logprobs, dim=-1)

        if batch.needs_logit_edits:
            _apply_penalties(x, batch)

        if batch.all_greedy:
            tokens = x.argmax(dim=-1)
        else:
            greedy_tokens = x.argmax(dim=-1) if batch.greedy is not None else None
            tokens = _sample(x, batch)
            if greedy_tokens is not None:
                tokens = torch.where(batch.greedy, greedy_tokens, tokens)

        if batch.max_num_logprobs is not None:
            logprobs = all_lp.gather(1, tokens.unsqueeze(1)).squeeze(1)
        return SamplerOutput(token_ids=tokens, logprobs=logprobs, top_ids=top_ids, top_logprobs=top_logprobs)


def _apply_penalties(x: torch.Tensor, b: SamplingBatch) -> None:
    """Every logit edit, in place on contiguous float32 logits `x`, in vLLM's order: grammar
    bitmasks, allowed tokens, bans, logit_bias, then the repetition/frequency/presence penalties."""
    flat = x.view(-1)
    if b.grammar_rows is not None:
        assert b.grammar_banned is not None
        if b.grammar_all_rows:
            x.masked_fill_(b.grammar_banned, float("-inf"))
        else:
            x[b.grammar_rows] = x[b.grammar_rows].masked_fill_(b.grammar_banned, float("-inf"))
    if b.allowed_rows is not None:
        x[b.allowed_rows] = x[b.allowed_rows].masked_fill_(~b.allowed_mask, float("-inf"))
    if b.banned_index is not None:
        flat[b.banned_index] = float("-inf")
    if b.bias_index is not None:
        flat[b.bias_index] += b.bias_value  # indices are unique (one entry per token and row)
    if b.repetition_index is not None:
        # HF / CTRL style: a seen token's logit moves toward "less likely" (divide if
        # positive, multiply if negative).
        vals = flat[b.repetition_index]
        r = b.repetition_penalty
        flat[b.repetition_index] = torch.where(vals > 0, vals / r, vals * r)
    if b.penalty_index is not None:
        flat[b.penalty_index] -= b.penalty_delta  # indices are unique, so no accumulation needed


def _grammar_banned(bitmask: np.ndarray, V: int, device: torch.device) -> torch.Tensor:
    """[R, W] int32 bitmask -> [R, V] bool, True where banned. On CPU numpy unpacks it (far faster
    than torch's integer ops there); on a GPU the 32x smaller bitmask is copied and unpacked there."""
    if device.type == "cpu":
        bits = np.unpackbits(np.ascontiguousarray(bitmask).view(np.uint8), axis=1, bitorder="little")
        banned = bits[:, :V] == 0
        if banned.shape[1] < V:  # a mask narrower than the logits allows nothing past its end
            banned = np.pad(banned, ((0, 0), (0, V - banned.shape[1])), constant_values=True)
        return torch.from_numpy(banned)
    return ~unpack_bitmask(torch.from_numpy(bitmask).to(device, non_blocking=True), V)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, W] int32 bitmask -> [R, vocab_size] bool (bit t of word t // 32, least significant first),
    on the bitmask's device; a mask narrower than the vocabulary allows nothing past its end."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = ((bitmask.unsqueeze(-1) >> shifts) & 1).bool().flatten(1)  # [R, 32 W]
    if bits.shape[1] >= vocab_size:
        return bits[:, :vocab_size]
    return torch.nn.functional.pad(bits, (0, vocab_size - bits.shape[1]), value=False)


# On CPU a full vocabulary sort is slow (~10 ms per 150k-token row); the nucleus nearly
# always lies within the top few hundred tokens, so top-k candidates are tried first.
_TOP_P_CANDIDATES = (1024, 16384)


def _sample(x: torch.Tensor, b: SamplingBatch) -> torch.Tensor:
    """Random draw for every row (the caller swaps in the argmax on greedy rows)."""
    if b.temperature is not None:
        x.div_(b.temperature)
    if b.top_k is not None:
        _apply_top_k(x, b.top_k, b.max_top_k)
    if b.top_p is not None:
        _apply_top_p(x, b.top_p)
    probs = x.softmax(dim=-1)
    if b.min_p is not None:
        floor = probs.amax(dim=-1, keepdim=True) * b.min_p
        probs.masked_fill_(probs < floor, 0.0)  # the argmax below needs no renormalisation

    # Exponential race: argmax_i(p_i / E_i) with E_i ~ Exp(1) picks i with probability p_i.
    # E = -log(U), U ~ U[0, 1): much faster than exponential_ on CPU, and U < 1 keeps E > 0
    # (U = 0 gives E = inf, which only makes that token lose). Seeded rows draw U from
    # their own generator, so their tokens do not depend on the rest of the batch.
    noise = torch.empty_like(probs)
    if len(b.seeded) < b.batch_size:
        noise.uniform_()
    for row, gen in b.seeded:
        noise[row].uniform_(generator=gen)
    # argmax(p / -log U) == argmin(p / log U): saves a pass over [B, V].
    return probs.div_(noise.log_()).argmin(dim=-1)


def _apply_top_k(x: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> None:
    """Keep each row's top_k logits (rows with top_k == 0 are untouched); ties at the cut survive."""
    top = x.topk(max_top_k, dim=-1).values  # sorted descending
    kth = top.gather(1, (top_k - 1).clamp(min=0))
    kth.masked_fill_(top_k == 0, float("-inf"))
    x.masked_fill_(x < kth, float("-inf"))


def _apply_top_p(x: torch.Tensor, top_p: torch.Tensor) -> None:
    """Keep the smallest set of most likely tokens whose mass reaches top_p (rows with 1.0 untouched)."""
    if x.device.type != "cpu":
        x.copy_(_top_p_sorted(x, top_p))  # GPU sorts fast, and this path never syncs
        return
    rows: torch.Tensor | None = None  # rows still unresolved (None: all)
    for k in _TOP_P_CANDIDATES:
        sub = x if rows is None else x[rows]
        fits = _top_p_within_top(sub, top_p if rows is None else top_p[rows], min(k, x.shape[1]))
        if rows is not None:
            x[rows] = sub
        if bool(fits.all()):  # host checks are free on CPU
            return
        left = (~fits).nonzero().squeeze(1)
        rows = left if rows is None else rows[left]
    x[rows] = _top_p_sorted(x[rows], top_p[rows])  # flat distributions: full sort


def _top_p_within_top(x: torch.Tensor, top_p: torch.Tensor, k: int) -> torch.Tensor:
    """Top-p for the rows whose nucleus lies within their top k tokens (in place).

    Returns [R] bool: which rows were resolved; the others are left untouched.
    """
    probs = x.softmax(dim=-1)
    vals = probs.topk(k, dim=-1).values  # sorted descending
    cum = vals.cumsum(dim=-1)
    off = top_p >= 1.0
    fits = (cum[:, -1:] >= top_p) | off
    # Token j survives when the mass strictly before it is < top_p; the last survivor sets the bar.
    n_keep = ((cum - vals) < top_p).sum(dim=-1, keepdim=True)
    bar = vals.gather(1, (n_keep - 1).clamp(min=0, max=k - 1))
    bar.masked_fill_(off | ~fits, 0.0)  # a bar of 0 keeps every token
    x.masked_fill_(probs < bar, float("-inf"))
    return fits.squeeze(1)


def _top_p_sorted(x: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Top-p by a full descending sort; returns the masked logits."""
    sorted_x, order = x.sort(dim=-1, descending=True)
    probs = sorted_x.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # mass strictly before each token
    sorted_x.masked_fill_((before >= top_p) & (top_p < 1.0), float("-inf"))
    return torch.empty_like(x).scatter_(1, order, sorted_x)
