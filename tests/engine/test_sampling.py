"""Sampler: greedy paths, filters, penalties against a naive reference, seeds, logprobs."""
from __future__ import annotations

import math

import pytest
import torch

from lockgate.engine.core.sampler import Sampler, SamplingBatch
from lockgate.engine.messages import TokenLogprob
from lockgate.engine.sampling_params import SamplingParams

CPU = torch.device("cpu")
V = 32
EOS = [3]


def make_batch(
    params: list[SamplingParams],
    prompts: list[list[int]] | None = None,
    outputs: list[list[int]] | None = None,
    vocab: int = V,
    eos: list[int] | None = None,
) -> SamplingBatch:
    B = len(params)
    gens = []
    for p in params:
        g = None
        if p.seed is not None:
            g = torch.Generator(device="cpu")
            g.manual_seed(p.seed)
        gens.append(g)
    return SamplingBatch.build(
        params,
        prompts if prompts is not None else [[] for _ in range(B)],
        outputs if outputs is not None else [[] for _ in range(B)],
        gens,
        vocab,
        CPU,
        EOS if eos is None else eos,
    )


def sample(logits: torch.Tensor, params: list[SamplingParams], **kw) -> torch.Tensor:
    return Sampler()(logits, make_batch(params, vocab=logits.shape[1], **kw)).token_ids


def rand_logits(B: int, vocab: int = V, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax_and_leaves_logits_untouched() -> None:
    logits = rand_logits(6)
    before = logits.clone()
    out = sample(logits, [SamplingParams(temperature=0.0)] * 6)
    assert out.dtype == torch.int64
    assert torch.equal(out, logits.argmax(-1))
    assert torch.equal(logits, before)


def test_greedy_bfloat16_fast_path() -> None:
    logits = rand_logits(4).to(torch.bfloat16)
    assert torch.equal(sample(logits, [SamplingParams(temperature=0.0)] * 4), logits.float().argmax(-1))


def test_top_k_one_equals_greedy_at_any_temperature() -> None:
    logits = rand_logits(8, seed=1)
    greedy = sample(logits, [SamplingParams(temperature=0.0)] * 8)
    for t in (0.3, 1.0, 2.0):
        assert torch.equal(sample(logits, [SamplingParams(temperature=t, top_k=1)] * 8), greedy)


def test_mixed_batch_greedy_rows_get_argmax() -> None:
    logits = rand_logits(6, seed=2)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.5)] * 3
    logits_before = logits.clone()
    out = sample(logits, params)
    assert torch.equal(out[0::2], logits.argmax(-1)[0::2])
    assert torch.equal(logits, logits_before)


def test_tiny_temperature_is_greedy() -> None:
    logits = rand_logits(5, seed=3)
    assert torch.equal(sample(logits, [SamplingParams(temperature=1e-6)] * 5), logits.argmax(-1))


def _support(params: SamplingParams, logits_row: torch.Tensor, n: int = 4000) -> set[int]:
    torch.manual_seed(1234)
    out = sample(logits_row.expand(n, -1).clone(), [params] * n)
    return set(out.tolist())


ROW = torch.tensor([4.0, 3.5, 3.0, 2.0, 1.0, 0.0, -1.0, -2.0])  # descending for readable expectations


@pytest.mark.parametrize("k", [2, 3, 5])
def test_top_k_restricts_support(k: int) -> None:
    got = _support(SamplingParams(temperature=1.5, top_k=k), ROW)
    assert got == set(range(k))


def test_top_p_restricts_support() -> None:
    probs = ROW.softmax(-1)
    p = 0.8
    # Smallest prefix (by probability) with mass >= p.
    cum = probs.cumsum(-1)
    keep = int((cum < p).sum().item()) + 1
    got = _support(SamplingParams(top_p=p), ROW)
    assert got == set(range(keep))
    assert _support(SamplingParams(top_p=1e-6), ROW) == {0}


def test_top_k_and_top_p_combined() -> None:
    # top_k=4 then top_p on the renormalised top-4 distribution.
    probs4 = ROW[:4].softmax(-1)
    cum = probs4.cumsum(-1)
    keep = int((cum < 0.93).sum().item()) + 1
    # Order matters: top_p alone at 0.93 would keep 4 tokens, after top_k=4 it keeps 3.
    assert keep == 3 and int((ROW.softmax(-1).cumsum(-1) < 0.93).sum()) + 1 == 4
    got = _support(SamplingParams(top_k=4, top_p=0.93), ROW)
    assert got == set(range(keep))


def test_min_p_restricts_support() -> None:
    probs = ROW.softmax(-1)
    min_p = 0.2
    allowed = {i for i in range(len(ROW)) if probs[i] >= min_p * probs.max()}
    assert 1 < len(allowed) < len(ROW)
    assert _support(SamplingParams(min_p=min_p), ROW) == allowed


def test_rows_with_different_filters_in_one_batch() -> None:
    torch.manual_seed(7)
    n = 2000
    params = [SamplingParams(top_k=2), SamplingParams(top_p=0.5), SamplingParams(), SamplingParams(min_p=0.5)]
    logits = ROW.expand(n * len(params), -1).clone()
    out = sample(logits, params * n).view(n, len(params))
    assert set(out[:, 0].tolist()) == {0, 1}
    assert set(out[:, 1].tolist()) <= {0, 1}
    assert len(set(out[:, 2].tolist())) >= 6  # unfiltered row ranges widely
    assert set(out[:, 3].tolist()) <= {0, 1, 2}


def test_temperature_one_follows_softmax() -> None:
    torch.manual_seed(0)
    row = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0])
    n = 20000
    out = sample(row.expand(n, -1).clone(), [SamplingParams()] * n)
    counts = torch.bincount(out, minlength=len(row)).double()
    expected = row.double().softmax(-1) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    # 5 degrees of freedom: P(chi2 > 25) is about 1e-4.
    assert chi2 < 25.0, (counts, expected)


def test_temperature_sharpens_distribution() -> None:
    torch.manual_seed(0)
    row = torch.tensor([1.0, 0.0, -1.0])
    n = 20000
    out = sample(row.expand(n, -1).clone(), [SamplingParams(temperature=0.5)] * n)
    freq = torch.bincount(out, minlength=3).double() / n
    expected = (row.double() / 0.5).softmax(-1)
    assert torch.allclose(freq, expected, atol=0.015)


def test_seeded_rows_are_reproducible_and_batch_independent() -> None:
    vocab = 1000
    target = rand_logits(1, vocab, seed=11)[0] / 3  # flat-ish: draws vary a lot

    def run(seeded: SamplingParams, neighbours: list[SamplingParams], position: int, steps: int = 6) -> list[int]:
        params = list(neighbours)
        params.insert(position, seeded)
        gens: list[torch.Generator | None] = []
        for p in params:
            gens.append(torch.Generator().manual_seed(p.seed) if p.seed is not None else None)
        tokens = []
        for step in range(steps):
            logits = rand_logits(len(params), vocab, seed=100 + step)
            logits[position] = target
            batch = SamplingBatch.build(params, [[1, 2]] * len(params), [[]] * len(params), gens, vocab, CPU, EOS)
            tokens.append(int(Sampler()(logits, batch).token_ids[position]))
        return tokens

    seeded = SamplingParams(seed=42, temperature=1.0, top_p=0.95)
    alone = run(seeded, [], 0)
    torch.manual_seed(999)  # global RNG state must not matter for the seeded row
    crowded = run(seeded, [SamplingParams(), SamplingParams(seed=7), SamplingParams(temperature=0.0),
                           SamplingParams(top_k=5)], 2)
    other = run(seeded, [SamplingParams(min_p=0.1, seed=1)] * 3, 3)
    assert alone == crowded == other
    assert len(set(alone)) > 1  # it really samples
    # A different seed gives a different sequence.
    assert run(seeded.replace(seed=43), [], 0) != alone


def test_unseeded_rows_follow_global_rng() -> None:
    logits = rand_logits(16, 500, seed=5) / 3
    torch.manual_seed(3)
    a = sample(logits, [SamplingParams()] * 16)
    torch.manual_seed(3)
    b = sample(logits, [SamplingParams()] * 16)
    assert torch.equal(a, b)


def naive_penalise(logits: torch.Tensor, params: list[SamplingParams], prompts: list[list[int]],
                   outputs: list[list[int]]) -> torch.Tensor:
    out = logits.clone()
    for i, p in enumerate(params):
        for t in set(prompts[i]) | set(outputs[i]):
            v = out[i, t]
            out[i, t] = v / p.repetition_penalty if v > 0 else v * p.repetition_penalty
        for t in set(outputs[i]):
            c = outputs[i].count(t)
            out[i, t] -= p.frequency_penalty * c + p.presence_penalty
    return out


def test_penalties_match_naive_reference() -> None:
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.3),
        SamplingParams(temperature=0.0, presence_penalty=1.5),
        SamplingParams(temperature=0.0, frequency_penalty=0.7),
        SamplingParams(temperature=0.0, repetition_penalty=0.8, presence_penalty=-0.5, frequency_penalty=1.1),
        SamplingParams(temperature=0.0),
    ]
    prompts = [[1, 2, 2, 5], [7, 8], [9], [1, 4, 4, 30], [0, 1, 2]]
    outputs = [[5, 6, 6], [8, 8, 8, 10], [11, 11, 9, 12], [4, 4, 31, 0], [1, 1]]
    logits = rand_logits(len(params), seed=21)
    batch = make_batch(params, prompts, outputs)
    x = logits.clone()
    from lockgate.engine.core.sampler import _apply_penalties

    _apply_penalties(x, batch)
    ref = naive_penalise(logits, params, prompts, outputs)
    assert torch.allclose(x, ref, atol=1e-6)
    # And the sampler's greedy choice is the argmax of the penalised logits.
    assert torch.equal(Sampler()(logits, batch).token_ids, ref.argmax(-1))


def test_penalty_changes_greedy_choice() -> None:
    logits = torch.tensor([[0.0, 5.0, 4.9, 0.0]])
    p = SamplingParams(temperature=0.0, frequency_penalty=1.0)
    assert sample(logits, [p], outputs=[[1]]).tolist() == [2]
    assert sample(logits, [p], outputs=[[]]).tolist() == [1]


def test_min_tokens_masks_eos_and_stop_token_ids() -> None:
    logits = torch.zeros(4, 8)
    logits[:, 3] = 10.0  # eos
    logits[:, 5] = 9.0  # a stop token id
    logits[:, 6] = 8.0
    params = [
        SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[5]),
        SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[5]),  # already has 2 outputs
        SamplingParams(temperature=0.0, min_tokens=2, stop_token_ids=[5], ignore_eos=True),
        SamplingParams(temperature=0.0, min_tokens=0, stop_token_ids=[5]),
    ]
    outputs = [[1], [1, 1], [], []]
    out = sample(logits, params, outputs=outputs, eos=[3])
    # ignore_eos: eos is not a stop, so min_tokens need not mask it (as vLLM).
    assert out.tolist() == [6, 3, 3, 3]


def test_min_tokens_masks_when_sampling() -> None:
    torch.manual_seed(0)
    logits = torch.zeros(500, 8)
    logits[:, 3] = 5.0
    out = sample(logits, [SamplingParams(min_tokens=1)] * 500, outputs=[[]] * 500, eos=[3])
    assert 3 not in out.tolist()


def test_ignore_eos_does_not_mask() -> None:
    logits = torch.zeros(1, 8)
    logits[0, 3] = 10.0
    assert sample(logits, [SamplingParams(temperature=0.0, ignore_eos=True)], eos=[3]).tolist() == [3]


def test_logprobs_are_raw_log_softmax_and_true_top_k() -> None:
    logits = rand_logits(4, seed=9)
    params = [
        SamplingParams(logprobs=5, temperature=0.7, repetition_penalty=1.5),
        SamplingParams(logprobs=0),
        SamplingParams(),
        SamplingParams(logprobs=2, temperature=0.0, presence_penalty=2.0),
    ]
    outputs = [[0, 1], [2], [], [logits[3].argmax().item()]]
    res = Sampler()(logits, make_batch(params, outputs=outputs))
    ref = torch.log_softmax(logits.double(), dim=-1)
    assert res.logprobs is not None and res.top_ids is not None and res.top_logprobs is not None
    assert res.top_ids.shape == (4, 5)
    sampled_ref = ref.gather(1, res.token_ids.unsqueeze(1)).squeeze(1)
    assert torch.allclose(res.logprobs.double(), sampled_ref, atol=1e-5)
    true_top = ref.topk(5, dim=-1)
    assert torch.equal(res.top_ids, true_top.indices)
    assert torch.allclose(res.top_logprobs.double(), true_top.values, atol=1e-5)

    lps = res.to_token_logprobs([p.logprobs for p in params])
    assert lps[2] is None
    assert isinstance(lps[1], TokenLogprob) and lps[1].top == []
    assert len(lps[0].top) == 5 and len(lps[3].top) == 2
    assert lps[0].top[0][0] == int(true_top.indices[0, 0])
    assert math.isclose(lps[3].logprob, float(sampled_ref[3]), abs_tol=1e-5)
    # Row 3 is greedy with a presence penalty on the raw argmax: it picks another token,
    # but its logprob still comes from the raw distribution.
    assert int(res.token_ids[3]) != int(logits[3].argmax())


def test_no_logprobs_requested() -> None:
    res = Sampler()(rand_logits(2), make_batch([SamplingParams(), SamplingParams(temperature=0.0)]))
    assert res.logprobs is None and res.top_ids is None and res.top_logprobs is None
    assert res.to_token_logprobs([None, None]) == [None, None]


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="shape"):
        Sampler()(torch.zeros(2, V + 1), make_batch([SamplingParams()] * 2))


def test_out_of_range_token_ids_are_ignored_for_penalties() -> None:
    # The tokenizer may know more ids than the model's logits cover (or the reverse).
    logits = torch.tensor([[1.0, 2.0, 0.5]])
    out = sample(logits, [SamplingParams(temperature=0.0, repetition_penalty=3.0, frequency_penalty=1.0)],
                 prompts=[[1, 99]], outputs=[[7]])
    assert out.tolist() == [0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_for_seeded_and_greedy() -> None:
    dev = torch.device("cuda")
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.2), SamplingParams(seed=5, top_k=10, top_p=0.9)]
    logits = rand_logits(2, 1000, seed=4)
    gens = [None, torch.Generator(device=dev).manual_seed(5)]
    batch = SamplingBatch.build(params, [[1, 2], [3]], [[4], []], gens, 1000, dev, EOS)
    a = Sampler()(logits.to(dev), batch).token_ids
    gens = [None, torch.Generator(device=dev).manual_seed(5)]
    batch = SamplingBatch.build(params + [SamplingParams()], [[1, 2], [3], []], [[4], [], []], gens + [None],
                                1000, dev, EOS)
    b = Sampler()(torch.cat([logits, rand_logits(1, 1000)]).to(dev), batch).token_ids
    assert a.device.type == "cuda"
    assert torch.equal(a, b[:2])
    assert int(a[0]) == int(sample(logits[:1], params[:1], prompts=[[1, 2]], outputs=[[4]])[0])


def test_cpu_top_p_candidates_match_full_sort(monkeypatch: pytest.MonkeyPatch) -> None:
    from lockgate.engine.core import sampler as sampling

    monkeypatch.setattr(sampling, "_TOP_P_CANDIDATES", (4, 64))  # exercise every stage on a small vocab
    g = torch.Generator().manual_seed(0)
    vocab = 512
    scales = [8.0, 3.0, 1.0, 0.05, 8.0, 0.05, 2.0, 0.5]  # peaked rows fit early, flat ones need the sort
    logits = torch.stack([torch.randn(vocab, generator=g) * s for s in scales])
    top_p = torch.tensor([0.9, 0.5, 0.95, 0.9, 1.0, 1.0, 0.3, 0.99]).unsqueeze(1)
    staged = logits.clone()
    sampling._apply_top_p(staged, top_p)
    reference = sampling._top_p_sorted(logits.clone(), top_p)
    assert torch.equal(torch.isfinite(staged), torch.isfinite(reference))
    kept = torch.isfinite(staged).sum(-1)
    assert kept[4] == kept[5] == vocab  # top_p = 1 keeps everything
    assert kept[0] < 10 and kept[3] > 64  # a peaked row and a flat one
    # The kept set is the smallest prefix (by probability) whose mass reaches top_p.
    probs = logits.softmax(-1)
    for i in range(len(scales)):
        if top_p[i] < 1:
            mass = probs[i][torch.isfinite(staged[i])].sum()
            smallest_kept = probs[i][torch.isfinite(staged[i])].min()
            assert mass >= top_p[i] - 1e-5 and mass - smallest_kept < top_p[i]


def test_empty_batch() -> None:
    out = Sampler()(torch.zeros(0, V), make_batch([]))
    assert out.token_ids.shape == (0,)


def test_mixed_penalties_and_random_rows() -> None:
    # Penalised greedy rows next to random rows: the greedy rows still see their penalties.
    torch.manual_seed(0)
    logits = torch.tensor([[0.0, 5.0, 4.9, 0.0]] * 4)
    params = [SamplingParams(temperature=0.0, presence_penalty=1.0), SamplingParams(top_k=2),
              SamplingParams(temperature=0.0), SamplingParams(temperature=0.5, repetition_penalty=2.0)]
    out = sample(logits, params, outputs=[[1], [], [1], [1]]).tolist()
    assert out[0] == 2 and out[2] == 1
    assert out[1] in (1, 2)
    assert out[3] in (0, 1, 2, 3)
