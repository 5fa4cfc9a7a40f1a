"""Pooling requests (embeddings) against transformers (float32, a random-weight Llama): the mean of
the final-normed hidden states, L2-normalized, through every way a prompt reaches the model: one
batch, in chunks, recomputed after preemption, with its prefix in the cache; the native quantized
path against the PyTorch path on the same tables; the fake runner; what the KV cache keeps."""
from __future__ import annotations

import math
import random

import pytest
import torch

from lockgate import LLM, SamplingParams
from lockgate.engine.native import build
from tests.engine.tiny_models import make_checkpoint

TOL = 1e-4
SMALL = dict(dtype="float32", num_kv_blocks=64)


def prompts() -> list[list[int]]:
    rng = random.Random(11)
    shared = [rng.randrange(256) for _ in range(24)]  # a common prefix: the second prompt could hit it
    return [shared + [rng.randrange(256) for _ in range(9)],
            shared + [rng.randrange(256) for _ in range(14)],
            [rng.randrange(256) for _ in range(5)],
            [rng.randrange(256)]]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """The checkpoint and transformers' pooled vector of every prompt: the mean of
    `hidden_states[-1]` (after the final norm), normalized."""
    path = tmp_path_factory.mktemp("embed-llama")
    model = make_checkpoint(path, "llama3.1")
    refs = []
    with torch.no_grad():
        for p in prompts():
            h = model(torch.tensor([p]), output_hidden_states=True).hidden_states[-1][0].float()
            refs.append(torch.nn.functional.normalize(h.mean(dim=0), dim=0))
    return path, refs


def assert_idle(llm: LLM) -> None:
    s = llm.engine.stats()
    assert s.num_running == 0 and s.num_waiting == 0 and s.num_free_blocks == s.num_total_blocks


MODES = {
    "default": dict(),
    "chunked_prefill": dict(max_num_batched_tokens=6, block_size=4),  # chunks of 6 over blocks of 4
}
POOL = SamplingParams(max_tokens=0, embed=True)


def assert_matches(embedding: list[float] | None, ref: torch.Tensor) -> None:
    assert embedding is not None
    got = torch.tensor(embedding)
    assert got.shape == ref.shape and torch.allclose(got, ref, atol=TOL), (got - ref).abs().max()


@pytest.mark.parametrize("mode", sorted(MODES))
def test_pooled_vectors_match_transformers(ckpt, mode):
    path, refs = ckpt
    llm = LLM(str(path), **{**SMALL, **MODES[mode]})
    for _ in range(2):  # the second pass finds every prompt's blocks in the prefix cache
        outs = llm.generate(prompts(), POOL)
        for out, ref in zip(outs, refs):
            assert_matches(out.embedding, ref)
            assert out.outputs[0].token_ids == [] and out.num_cached_tokens == 0  # computed, never read from the cache
    assert_idle(llm)  # no KV block held once they finished


def test_a_preempted_prefill_pools_each_position_once(ckpt):
    """56 KV slots: the first prompt (the least important) starts alone, then the others arrive and
    preempt it in the middle of its prefill; its recompute adds no position twice and loses none."""
    path, refs = ckpt
    llm = LLM(str(path), dtype="float32", num_kv_blocks=14, block_size=4, max_num_batched_tokens=12,
              scheduling_policy="priority")
    eng, ps = llm.engine, prompts()
    eng.add_request("a", ps[0], POOL, priority=1)
    eng.step()  # 12 of its 33 positions
    for rid, p in zip("bcd", ps[1:]):
        eng.add_request(rid, p, POOL, priority=0)
    done = {}
    while eng.has_unfinished_requests():
        done.update({o.request_id: o for o in eng.step() if o.finished})
    assert eng.stats().num_preemptions > 0
    for rid, ref in zip("abcd", refs):
        assert_matches(done[rid].embedding, ref)
    assert_idle(llm)


def test_llm_embed_two_prompts_in_one_batch(ckpt):
    path, refs = ckpt
    llm = LLM(str(path), **SMALL)
    steps = []
    real = llm.engine.core.runner.execute
    llm.engine.core.runner.execute = lambda batch, masks=None: (steps.append(len(batch)), real(batch, masks))[1]
    vectors = llm.embed(prompts()[:2])
    assert steps == [2]  # both prompts in one step, as prefills batch
    for v, ref in zip(vectors, refs):
        assert isinstance(v, list) and len(v) == 64 and all(isinstance(x, float) for x in v)
        assert abs(math.sqrt(sum(x * x for x in v)) - 1.0) < 1e-5
        assert torch.allclose(torch.tensor(v), ref, atol=TOL)
    # A text prompt is tokenized as generate tokenizes it.
    text = llm.embed("hello there")[0]
    ids = llm.tokenizer.encode("hello there")
    assert text == llm.embed([ids])[0]


def test_its_blocks_are_cached_for_others_and_freed(ckpt):
    path, _ = ckpt
    llm = LLM(str(path), **SMALL, block_size=4)
    ps = prompts()
    llm.embed([ps[1]])
    assert_idle(llm)
    plain = SamplingParams(temperature=0.0, max_tokens=1)
    again = llm.generate(ps[1], plain)[0]  # a plain request reads the pooling request's prompt blocks
    assert again.num_cached_tokens == (len(ps[1]) - 1) // 4 * 4
    hits = llm.engine.stats().prefix_cache_hits
    llm.embed([ps[1]])  # ...but a pooling request never reads them: it needs every position's state
    assert llm.engine.stats().prefix_cache_hits == hits
    assert_idle(llm)


def test_bad_pooling_params_are_refused():
    with pytest.raises(ValueError, match="embed needs max_tokens=0"):
        SamplingParams(embed=True)
    with pytest.raises(ValueError, match="embed needs n=1"):
        SamplingParams(max_tokens=0, n=2, embed=True)
    with pytest.raises(ValueError, match="embed cannot be combined"):
        SamplingParams(max_tokens=0, prompt_logprobs=1, embed=True)
    with pytest.raises(ValueError, match="embed must be a boolean"):
        SamplingParams(max_tokens=0, embed=1)


@pytest.mark.skipif(build.load() is None, reason="no C compiler for the native kernels")
def test_native_path_pools_as_the_pytorch_path_does(ckpt):
    """int4 on the native kernels (its fused step returns every row's hidden state): the vectors
    equal the PyTorch model's on the same quantized tables."""
    path, refs = ckpt
    llm = LLM(str(path), **SMALL, quantization="int4", block_size=4, max_num_batched_tokens=16)
    runner = llm.engine.core.runner
    assert runner.native is not None
    native_calls = []
    real = runner.native_step
    runner.native_step = lambda batch: (native_calls.append(1), real(batch))[1]
    fused = llm.embed(prompts())
    assert native_calls
    runner.native = None  # the same tables, one PyTorch op at a time
    plain = llm.embed(prompts())
    for a, b, ref in zip(fused, plain, refs):
        a, b = torch.tensor(a), torch.tensor(b)
        assert torch.allclose(a, b, atol=2e-3), (a - b).abs().max()
        assert float(a @ ref) > 0.9  # int4 weights: close to the float model's, not equal
    assert_idle(llm)


def test_fake_runner_gives_deterministic_unit_vectors(ckpt):
    path, _ = ckpt
    llm = LLM(str(path), load_format="fake", num_kv_blocks=64, max_num_batched_tokens=8)  # chunks of 8
    ps = prompts()
    vs = llm.embed(ps)
    assert [len(v) for v in vs] == [64] * 4
    assert all(abs(sum(x * x for x in v) - 1.0) < 1e-5 for v in vs)
    assert llm.embed(ps) == vs  # deterministic
    whole = LLM(str(path), load_format="fake", num_kv_blocks=64).embed(ps)
    assert all(max(abs(a - b) for a, b in zip(x, y)) < 1e-6 for x, y in zip(whole, vs))  # chunks add up
    dot = [sum(a * b for a, b in zip(vs[0], v)) for v in vs]
    assert dot[1] > dot[2] and dot[1] > dot[3]  # sharing 24 tokens: closer than an unrelated prompt
    assert_idle(llm)
