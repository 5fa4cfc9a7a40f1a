"""Speculative decoding: greedy output identical with and without proposals (every family, the
native and the PyTorch paths, the default model), seeded sampling unchanged and the target's
distribution kept (chi-square), preemption and cancellation in the middle of speculation free
every block (the draft's too), a draft with another tokenizer refused, the counters exact."""
from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from lockgate import LLM, SamplingParams
from lockgate.engine.config import EngineConfig
from lockgate.engine.spec.config import parse_speculative_config
from lockgate.engine.spec.cost import StepCostCurve, break_even_batch, plan
from lockgate.engine.spec.ngram import TokenBuffer, propose_ngram
from tests.engine.tiny_models import FAMILIES, byte_tokenizer, make_checkpoint

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3,
         "policy": "always"}
PATHS = {"torch": dict(dtype="float32"), "native": dict(quantization="int4")}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("spec")
    out = {}
    for family in sorted(FAMILIES):
        make_checkpoint(root / family, family)
        out[family] = root / family
    return out


def grounded_prompts(seed: int = 0) -> list[list[int]]:
    """Prompts whose text repeats (n-gram proposals hit) and random ones (they mostly miss)."""
    rng = random.Random(seed)
    out = []
    for n in (4, 9, 16, 23):
        block = [rng.randrange(256) for _ in range(n)]
        out.append(block * 3 + block[: n // 2])
    out += [[rng.randrange(256) for _ in range(n)] for n in (1, 6, 29, 70)]
    return out


def run(llm: LLM, prompts, params) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]


class Unspeculated:
    """`generate` on an engine with its speculator taken out for the call."""

    def __init__(self, llm: LLM) -> None:
        self.llm = llm

    def generate(self, prompts, params):
        core = self.llm.engine.core
        spec, core.speculator = core.speculator, None
        try:
            return self.llm.generate(prompts, params)
        finally:
            core.speculator = spec


def run_without_speculation(llm: LLM, prompts, params) -> list[list[int]]:
    """The same engine (weights, runner, batch-invariant setting) with its speculator taken out:
    decoding without speculation, one model load instead of two."""
    core = llm.engine.core
    spec, core.speculator = core.speculator, None
    try:
        return run(llm, prompts, params)
    finally:
        core.speculator = spec


def assert_nothing_held(llm: LLM) -> None:
    st = llm.engine.stats()
    assert st.num_running == 0 and st.num_waiting == 0
    assert st.num_free_blocks == st.num_total_blocks  # rejected rows' blocks came back too
    spec = llm.engine.core.speculator
    if spec is not None and spec.draft is not None:
        assert not spec.draft.shadows and spec.draft.kv.num_free_blocks == spec.draft.kv.num_blocks


# ---- configuration ------------------------------------------------------------------------------
@pytest.mark.parametrize("value, needle", [
    ('{"method": "eagle"}', "speculative_config.method must be one of ngram, draft_model"),
    ("[1, 2]", "must be a JSON object"),
    ("{nope", "not valid JSON"),
    ('{"method": "ngram", "num_speculative_tokens": 1180591620717411303424}',
     "num_speculative_tokens must be an integer from 1 to 16"),
    ('{"method": "ngram", "num_speculative_tokens": true}', "num_speculative_tokens must be an integer"),
    ('{"method": "ngram", "prompt_lookup_min": 4, "prompt_lookup_max": 2}', "prompt_lookup_min (4) must be <="),
    ('{"method": "ngram", "num_speculative_tokens": 4, "lookahead": 3}', "unknown field(s) lookahead"),
    ('{"num_speculative_tokens": 4}', "speculative_config.method is required"),
    ('{"method": "draft_model"}', "needs the draft checkpoint's path"),
    ('{"method": "ngram", "model": "x"}', "only for method 'draft_model'"),
    ('{"method": "ngram", "min_acceptance": 1.5}', "min_acceptance must be a number in [0, 1)"),
    ('{"method": "ngram", "policy": "sometimes"}', "policy must be 'cost' or 'always'"),
    ("x" * 70000, "at most 65536 characters"),
])
def test_bad_config_is_refused_naming_the_field(value, needle):
    with pytest.raises(ValueError) as e:
        EngineConfig(speculative_config=value)
    assert needle in str(e.value)


def test_config_round_trips_to_the_core_process():
    from lockgate.engine.messages import decode_config, encode_config

    cfg = EngineConfig(speculative_config=json.dumps({"method": "ngram", "num_speculative_tokens": 3}))
    back = decode_config(encode_config(cfg)).speculative_config
    assert back == cfg.speculative_config and back.num_speculative_tokens == 3
    assert parse_speculative_config("") is None and EngineConfig().speculative_config is None


def test_fake_engine_refuses_speculation():
    with pytest.raises(ValueError, match="needs a model"):
        LLM(load_format="fake", speculative_config={"method": "ngram"})


# ---- proposals and the cost plan ------------------------------------------------------------------
def test_ngram_takes_the_longest_most_recent_match():
    t = np.array([5, 1, 2, 3, 7, 8, 1, 2, 3, 9, 4, 2, 3], dtype=np.int32)
    # suffix [2, 3] (3-gram [4, 2, 3] never occurred): its most recent earlier occurrence is at 7
    assert propose_ngram(t, 1, 3, 3) == [9, 4, 2]
    t2 = np.array([1, 2, 3, 4, 0, 0, 2, 3, 4, 6, 0, 1, 2, 3, 4], dtype=np.int32)
    assert propose_ngram(t2, 2, 4, 2) == [0, 0]  # the 4-gram [1,2,3,4] wins over the later [2,3,4]
    assert propose_ngram(np.array([1, 2, 3], dtype=np.int32), 2, 5, 4) == []  # a miss proposes nothing
    assert propose_ngram(np.array([1, 2, 3], dtype=np.int32), 1, 1, 4) == []
    buf = TokenBuffer()
    assert buf.sync([1, 2], [3]).tolist() == [1, 2, 3]
    assert buf.sync([1, 2], list(range(3, 300))).tolist() == [1, 2] + list(range(3, 300))


def test_plan_follows_the_cost_curve():
    flat = StepCostCurve.from_points({1: 10.0, 64: 10.5})  # memory-bound: rows nearly free
    steep = StepCostCurve.from_points({1: 10.0, 2: 20.0, 8: 80.0})  # compute-bound: a row costs a token
    assert plan(flat, 1, 1, [(0.6, 4), (0.5, 4), (0.9, 0)]) == [4, 4, 0]
    assert plan(steep, 1, 1, [(0.95, 4)]) == [0]
    mid = StepCostCurve.from_points({1: 10.0, 2: 13.0, 4: 20.0, 8: 35.0, 16: 65.0, 32: 125.0})
    assert plan(mid, 1, 1, [(0.9, 4)])[0] >= 2  # well-accepted proposals pay at one stream
    assert plan(mid, 1, 1, [(0.2, 4)]) == [0]  # poorly accepted ones do not
    assert plan(mid, 1, 1, [(0.9, 4), (0.9, 4)], extra_cost=50.0) == [0, 0]  # a slow draft model never pays
    off = break_even_batch(mid, 0.8, 4)
    assert off is not None and sum(plan(mid, off, off, [(0.8, 4)] * off)) == 0
    assert sum(plan(mid, off // 2, off // 2, [(0.8, 4)] * (off // 2))) > 0
    assert break_even_batch(flat, 0.8, 4) is None
    # a noisy measurement never makes more rows look cheaper
    assert StepCostCurve.from_points({1: 10.0, 2: 9.0, 4: 12.0}).time(2) == 10.0


# ---- greedy exactness -------------------------------------------------------------------------------
# Each family once, each path twice (the native path is also the one of every other test here).
@pytest.mark.parametrize("family, path", [("llama3.1", "torch"), ("mistral", "native"), ("qwen2", "torch"),
                                          ("qwen3", "native")])
def test_greedy_output_identical_with_speculation(ckpts, family, path):
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    on = LLM(str(ckpts[family]), speculative_config=NGRAM, **PATHS[path])
    assert on.engine.core.runner.batch_invariant == (path == "torch")  # on by itself where it is needed
    assert (on.engine.core.runner.native is not None) == (path == "native")  # the fast path was kept
    prompts = grounded_prompts()
    ref = run_without_speculation(on, prompts, params)
    if path == "torch":  # a separate engine without speculation, batch-invariant, agrees
        assert run(LLM(str(ckpts[family]), batch_invariant=True, **PATHS[path]), prompts[:3], params) == ref[:3]
    for _ in range(2):  # the second pass reads the prompts from the prefix cache
        assert run(on, prompts, params) == ref
    st = on.engine.core.speculator.stats
    assert st.num_accepted_tokens > 0 and st.num_draft_tokens > st.num_accepted_tokens  # hits and misses
    assert on.engine.stats().prefix_cache_hits > 0
    assert_nothing_held(on)


@pytest.mark.parametrize("mode", [dict(max_num_batched_tokens=7), dict(num_kv_blocks=24, block_size=8)])
def test_chunked_prefill_and_preemption_with_speculation(ckpts, mode):
    """Native rows are batch-invariant: whatever the budget leaves to prefill chunks and whoever is
    preempted (by recompute, in the middle of speculating), greedy tokens are the same."""
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    prompts = grounded_prompts(1)
    ref = run(LLM(str(ckpts["qwen2"]), quantization="int4"), prompts, params)
    on = LLM(str(ckpts["qwen2"]), quantization="int4", speculative_config=NGRAM, **mode)
    assert run(on, prompts, params) == ref
    if "num_kv_blocks" in mode:
        assert on.engine.stats().num_preemptions > 0
    assert on.engine.core.speculator.stats.num_accepted_tokens > 0
    assert_nothing_held(on)


def test_default_model_greedy_identical(smollm_path):
    """The embedded model at its default precision (int4 on its own blocks, the fused native path):
    the same tokens with every proposal verified."""
    prompts = [
        "Repeat this sentence exactly, twice: The quick brown fox jumps over the lazy dog near the river bank.",
        "def add(a, b):\n    return a + b\n\n# the same function, renamed to plus:\ndef plus(a, b):\n",
    ]
    params = SamplingParams(temperature=0.0, max_tokens=32)
    on = LLM(speculative_config={"method": "ngram", "num_speculative_tokens": 4, "policy": "always"})
    assert on.engine.core.runner.native is not None
    ref = run_without_speculation(on, prompts, params)
    assert run(on, prompts, params) == ref  # every proposal verified
    assert on.engine.core.speculator.stats.num_accepted_tokens > 0
    assert_nothing_held(on)


def test_logprobs_stop_strings_and_n_with_speculation(ckpts):
    path = str(ckpts["llama3.1"])
    on = LLM(path, quantization="int4", speculative_config=NGRAM)
    off = Unspeculated(on)
    prompts = grounded_prompts(2)[:4]
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, logprobs=3)
    a, b = off.generate(prompts, params), on.generate(prompts, params)
    for x, y in zip(a, b):
        cx, cy = x.outputs[0], y.outputs[0]
        assert cx.token_ids == cy.token_ids
        assert [sorted(d.items()) for d in cx.logprobs] == [sorted(d.items()) for d in cy.logprobs]
    # a stop string inside an accepted run of proposals ends the text at the same place
    text = a[0].outputs[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    if stop.strip():
        p = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=[stop])
        assert off.generate(prompts[:1], p)[0].outputs[0].text == on.generate(prompts[:1], p)[0].outputs[0].text
    n2 = SamplingParams(temperature=0.8, max_tokens=24, ignore_eos=True, n=2, seed=7)
    assert ([c.token_ids for c in off.generate(prompts[:2], n2)[1].outputs]
            == [c.token_ids for c in on.generate(prompts[:2], n2)[1].outputs])
    assert on.engine.core.speculator.stats.num_drafts > 0
    assert_nothing_held(on)


# ---- sampling ------------------------------------------------------------------------------------------
def test_seeded_sampling_unchanged_by_speculation(ckpts):
    """Every position draws with the noise it would draw without speculation: a seeded request gives
    the same tokens with proposals as without, run after run (and a rewound generator shows it)."""
    path = str(ckpts["mistral"])
    prompts = grounded_prompts(3)
    params = [SamplingParams(temperature=0.3, top_p=0.95, max_tokens=32, ignore_eos=True, seed=s,
                             presence_penalty=0.3 * (s % 2)) for s in range(len(prompts))]
    on = LLM(path, quantization="int4", speculative_config=NGRAM)
    ref = run_without_speculation(on, prompts, params)
    assert run(on, prompts, params) == ref
    assert run(on, prompts, params) == ref
    st = on.engine.core.speculator.stats
    assert st.num_accepted_tokens > 0 and st.num_draft_tokens > st.num_accepted_tokens


def test_sampling_distribution_kept_chi_square(ckpts):
    """The first two generated tokens of a prompt whose n-gram proposes the second: over 2,000 seeds,
    their frequencies against the target model's own probabilities (transformers, over four allowed
    tokens); the second is drawn by the verify step, accepting or rejecting the proposal."""
    import transformers

    path = str(ckpts["llama3.1"])
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    allowed, n = [11, 42, 99, 7], 2000
    # Every allowed token occurs in the prompt, followed by another: whatever the first token, the
    # n-gram lookup proposes an allowed second one, which the verify row then accepts or rejects.
    prompt = allowed * 4 + allowed[:1]
    S = torch.tensor(allowed)

    def probs(ids: list[int]) -> list[float]:
        with torch.no_grad():
            return torch.softmax(hf(torch.tensor([ids])).logits[0, -1].float()[S], -1).tolist()

    expected = {(t1, t2): q1 * q2 for t1, q1 in zip(allowed, probs(prompt))
                for t2, q2 in zip(allowed, probs(prompt + [t1]))}
    llm = LLM(path, dtype="float32", speculative_config=NGRAM, max_num_seqs=n, max_num_batched_tokens=8192)
    # max_tokens=3: the second token is drawn by a verify row (a last token would get no proposal).
    outs = run(llm, [prompt] * n, [SamplingParams(temperature=1.0, allowed_token_ids=allowed, max_tokens=3,
                                                  ignore_eos=True, seed=s) for s in range(n)])
    counts: dict[tuple[int, int], int] = {}
    for o in outs:
        counts[(o[0], o[1])] = counts.get((o[0], o[1]), 0) + 1
    assert set(counts) <= set(expected)
    cells = sorted(expected)
    obs = np.array([counts.get(c, 0) for c in cells], dtype=float)
    exp = np.array([expected[c] * n for c in cells])
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    pvalue = float(torch.special.gammaincc(torch.tensor((len(cells) - 1) / 2), torch.tensor(chi2 / 2)))
    assert pvalue > 1e-3, (chi2, counts, expected)
    st = llm.engine.core.speculator.stats
    assert st.num_draft_tokens >= n  # every request verified proposals for its second token
    assert 0 < st.num_accepted_tokens < st.num_draft_tokens


# ---- cancellation, metrics ------------------------------------------------------------------------------
def test_cancel_in_the_middle_of_speculation_frees_every_block(ckpts):
    path = str(ckpts["qwen3"])
    llm = LLM(path, quantization="int4", speculative_config={**NGRAM, "method": "draft_model", "model": path,
                                                             "prompt_lookup_min": 2, "prompt_lookup_max": 5})
    eng = llm.engine
    for i, p in enumerate(grounded_prompts(4)):
        eng.add_request(f"r{i}", p, SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True))
    spec = eng.core.speculator
    while spec.stats.num_drafts < 8:
        eng.step()
    assert spec.draft.shadows  # the draft holds KV for the running requests
    for i in range(len(grounded_prompts(4))):
        eng.abort_request(f"r{i}")
    assert not eng.has_unfinished_requests()
    assert_nothing_held(llm)


def test_counters_match_the_requests(ckpts):
    path = str(ckpts["qwen2"])
    llm = LLM(path, quantization="int4", speculative_config=NGRAM)
    outs = llm.generate(grounded_prompts(5), SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    st = llm.engine.core.speculator.stats
    drafted = sum(t.num_draft_tokens for o in outs for t in o.engine_times)
    accepted = sum(t.num_accepted_tokens for o in outs for t in o.engine_times)
    assert (drafted, accepted) == (st.num_draft_tokens, st.num_accepted_tokens) and accepted > 0
    assert sum(st.accepted_per_pos) == st.num_accepted_tokens
    assert sum(st.proposed_per_pos) == st.num_draft_tokens and st.proposed_per_pos[0] == st.num_drafts
    assert all(a >= b for a, b in zip(st.accepted_per_pos, st.accepted_per_pos[1:]))  # position j needs j-1
    assert all(0 <= r <= 1 for r in st.acceptance_per_pos())
    assert st.mean_accepted_length == pytest.approx(1 + accepted / st.num_drafts)
    assert llm.engine.stats().spec == st


# ---- draft model -----------------------------------------------------------------------------------------
def test_draft_model_exact_and_fully_accepted_when_it_is_the_target(ckpts):
    path = str(ckpts["llama3.1"])
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    prompts = grounded_prompts(6)
    same = LLM(path, quantization="int4",
               speculative_config={"method": "draft_model", "model": path, "num_speculative_tokens": 3,
                                   "policy": "always", "draft_quantization": "int4"})
    ref = run_without_speculation(same, prompts, params)
    assert run(same, prompts, params) == ref
    st = same.engine.core.speculator.stats
    assert st.num_draft_tokens > 0 and st.num_accepted_tokens == st.num_draft_tokens  # its own greedy tokens
    other = LLM(path, quantization="int4",
                speculative_config={"method": "draft_model", "model": str(ckpts["qwen2"]),
                                    "num_speculative_tokens": 3, "policy": "always", "draft_num_kv_blocks": 6})
    assert run(other, prompts, params) == ref  # a poor (and starved) draft changes nothing but speed
    assert_nothing_held(same)
    assert_nothing_held(other)


def test_draft_with_another_tokenizer_is_refused(ckpts, tmp_path):
    other = tmp_path / "other"
    make_checkpoint(other, "qwen2")
    tok = byte_tokenizer()
    tok.add_special_tokens(["<extra>"])
    tok.save(str(other / "tokenizer.json"))
    target = str(ckpts["qwen2"])
    cfg = {"method": "draft_model", "model": str(other)}
    with pytest.raises(ValueError) as e:
        LLM(target, speculative_config=cfg)
    msg = str(e.value)
    assert "does not share the target model" in msg and str(other) in msg and target in msg
    from lockgate.engine.spec.draft_check import check_draft

    with pytest.raises(ValueError, match="does not share"):
        check_draft(EngineConfig(model=target, speculative_config=cfg))
    with pytest.raises(ValueError, match="does not exist"):
        check_draft(EngineConfig(model=target, speculative_config={**cfg, "model": str(tmp_path / "nope")}))
    check_draft(dataclasses.replace(EngineConfig(model=target), speculative_config=None))  # nothing to check


def test_native_rows_do_not_change_when_a_long_prefill_joins(ckpts):
    """A prompt too long for the native attention runs the PyTorch model, but the decodes (and
    verify rows) of its step still run the fused native step: a request's greedy tokens are the
    same alone as with a long prompt arriving in the middle of its decode, speculating or not."""
    path = str(ckpts["qwen3"])
    a = grounded_prompts(7)[1]
    long = [random.Random(8).randrange(256) for _ in range(400)]  # 400 x 400 pairs: past the native bound
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    alone = run(LLM(path, quantization="int4"), [a], params)[0]
    for spec in (None, NGRAM):
        llm = LLM(path, quantization="int4", speculative_config=spec)
        eng = llm.engine
        runner, splits = eng.core.runner, []
        split = runner.split_step
        runner.split_step = lambda b: splits.append(len(b)) or split(b)  # type: ignore[method-assign]
        eng.add_request("a", a, params)
        for _ in range(5):
            eng.step()
        eng.add_request("long", long, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
        done = {}
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.finished:
                    done[o.request_id] = o.outputs[0].token_ids
        assert done["a"] == alone
        assert splits  # the long prompt's step was split: its decode ran natively
        assert_nothing_held(llm)


def test_speculative_config_per_model_version():
    from lockgate.lifecycle.spec import VersionSpec, validate

    base = EngineConfig()
    cfg = validate(VersionSpec("m", "v1", engine={"speculative_config": {"method": "ngram",
                                                                          "num_speculative_tokens": 2}}), base)
    assert cfg.speculative_config.method == "ngram" and cfg.speculative_config.num_speculative_tokens == 2
    assert validate(VersionSpec("m", "v2"), base).speculative_config is None
    with pytest.raises(ValueError, match="speculative_config.num_speculative_tokens must be"):
        validate(VersionSpec("m", "v3", engine={"speculative_config": {"method": "ngram",
                                                                        "num_speculative_tokens": 0}}), base)


def test_priority_preemption_of_a_speculating_request(ckpts):
    """A more important request preempts one in the middle of speculating (scheduling_policy
    priority): both finish with the tokens they get alone, and every block comes back."""
    path = str(ckpts["mistral"])
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    low, high = grounded_prompts(9)[2], grounded_prompts(9)[3]
    ref = run(LLM(path, quantization="int4"), [low, high], params)
    llm = LLM(path, quantization="int4", speculative_config=NGRAM, scheduling_policy="priority", max_num_seqs=1)
    eng = llm.engine
    eng.add_request("low", low, params, priority=5)
    while eng.core.speculator.stats.num_drafts < 3:
        eng.step()
    eng.add_request("high", high, params, priority=0)
    done = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o.outputs[0].token_ids
    assert [done["low"], done["high"]] == ref
    assert eng.stats().num_preemptions >= 1
    assert_nothing_held(llm)


def test_constrained_requests_decode_without_proposals(ckpts):
    from lockgate.engine.structured_params import StructuredOutputs

    cost = {**NGRAM, "policy": "cost"}  # the measured plan: the step cost curve taken at start-up
    llm = LLM(str(ckpts["qwen2"]), quantization="int4", speculative_config=cost, max_num_seqs=4)
    curve = llm.engine.core.speculator.curve
    assert curve.rows == [1, 2, 3, 4, 6, 8, 12, 16, 20][:len(curve.rows)] and len(curve.rows) >= 8
    assert all(0 < a <= b for a, b in zip(curve.seconds, curve.seconds[1:]))
    p = SamplingParams(temperature=0.0, max_tokens=60, structured=StructuredOutputs(choice=["alpha beta", "gamma"]))
    out = llm.generate([grounded_prompts(10)[0]], p)[0]
    assert out.outputs[0].text in ("alpha beta", "gamma")
    assert sum(t.num_draft_tokens for t in out.engine_times) == 0
    assert_nothing_held(llm)
