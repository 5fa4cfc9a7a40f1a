"""Greedy tokens identical to Hugging Face transformers, for every family and engine mode."""
from __future__ import annotations

import random

import pytest

from lockgate import LLM, SamplingParams
from tests.engine.tiny_models import FAMILIES, hf_greedy, make_checkpoint

MAX_NEW = 24
TIE = 1e-4  # a top-2 logit gap this small is a tie: either token is a correct greedy pick


def prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(256) for _ in range(40)]  # a common prefix for the prefix cache
    out = [shared + [rng.randrange(256) for _ in range(n)] for n in (3, 17, 33)]
    out += [[rng.randrange(256) for _ in range(n)] for n in (1, 5, 16, 29, 70)]
    return out


def assert_matches_hf(ours: list[int], ref: list[int], gaps: list[float]) -> None:
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a != b:
            assert gaps[i] < TIE, f"token {i}: lockgate {a} != transformers {b} (gap {gaps[i]:.2e})"
            return  # past a tie the continuations may legitimately differ
    assert len(ours) == len(ref)


MODES = {
    "default": dict(),
    "no_prefix_cache": dict(enable_prefix_caching=False),
    "chunked_prefill": dict(max_num_batched_tokens=7),  # forces prompts into many chunks
    "preemption": dict(num_kv_blocks=14, block_size=8),  # 112 slots for 8 requests of up to 97 tokens
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_ckpt(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    model = make_checkpoint(path, request.param)
    refs = [hf_greedy(model, p, MAX_NEW) for p in prompts()]
    return path, refs


@pytest.mark.parametrize("mode", sorted(MODES))
def test_greedy_matches_transformers(family_ckpt, mode):
    path, refs = family_ckpt
    llm = LLM(str(path), dtype="float32", **MODES[mode])
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    # Run twice: the second pass reads prompts back from the prefix cache.
    for _ in range(2):
        outs = llm.generate(prompts(), params)
        for out, (ref, gaps) in zip(outs, refs):
            assert_matches_hf(out.outputs[0].token_ids, ref, gaps)
    stats = llm.engine.stats()
    assert stats.num_running == 0 and stats.num_waiting == 0
    assert stats.num_free_blocks == stats.num_total_blocks  # nothing leaked
    if mode in ("default", "chunked_prefill"):
        assert stats.prefix_cache_hits > 0
    if mode == "no_prefix_cache":
        assert stats.prefix_cache_hits == 0
    if mode == "preemption":
        assert stats.num_preemptions > 0
